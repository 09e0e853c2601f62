"""The real SmolLM2-135M-Instruct (Llama architecture, 49,152-token BPE vocabulary, ChatML, tied
embeddings, RoPE base 100,000), brought in as a GGUF through set_base_model: transformers turns it
into a Hugging Face folder, both engines load it with the same logits and the same greedy text,
a few training steps on a small task lower its held-out loss, and the trained adapter and its
exports agree in every engine (issue 15, items 1, 2, 5 and part of 7)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_export import SAME, gguf_logits, hf_logits, mlx_logits, prompt_ids

from conftest import mcp_ok, unwrap
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings

pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("mlx_lm")

WORDS = ("amber", "bridge", "cactus", "desert", "ember", "forest", "glacier", "hollow", "island", "jungle", "kettle",
         "lantern", "meadow", "nectar", "orchid", "pepper", "quartz", "river", "saddle", "thunder", "umber", "violet",
         "willow", "yonder", "zephyr", "anchor", "basket", "candle", "dragon", "engine", "falcon", "garden")


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_gguf):
    root = tmp_path_factory.mktemp("smol")
    shelf = root / "downloads"
    shelf.mkdir()
    gguf = shelf / smollm2_gguf.name
    gguf.write_bytes(smollm2_gguf.read_bytes())  # the user's download, inside the allowed roots
    (shelf / "spell.jsonl").write_text("".join(
        json.dumps({"instruction": f"Spell {w} with dashes.", "output": "-".join(w.upper())}) + "\n" for w in WORDS))
    server = build_server(Settings(output_dir=root / "projects", allowed_roots=[root]))
    project = mcp_ok(server, "generate_fine_tuning_project", {"project_name": "smol", "base_model": {"type": "llama"},
                                                             "training": {"num_stages": 1, "backend": "transformers",
                                                                          "max_seq_length": 128}})["project_path"]
    base = mcp_ok(server, "set_base_model", {"project_path": project, "source": str(gguf)})
    return {"server": server, "project": project, "base": base, "data": shelf / "spell.jsonl"}


@pytest.mark.slow
def test_a_gguf_becomes_the_base_model_and_both_engines_agree(smol):
    out, server, project = smol["base"], smol["server"], smol["project"]
    assert out["kind"] == "gguf" and out["local_path"] == "models/SmolLM2-135M-Instruct.Q4_1"
    verified = out["details"]["verified"]
    assert verified["mlx"] is True and verified["max_logit_difference"] < 1e-3 and verified["same_greedy_tokens"]
    model = Path(out["path"])
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] == 100000.0  # plain mlx-lm reads the top
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" in text
    # the same greedy answer from both engines, through the tool, stopping at the end of the turn
    # (8 tokens of 40 allowed: each engine stops at <|im_end|>, or text would follow)
    question = "What is the capital of France? Answer in one word."
    answers = {engine: unwrap(mcp_ok(server, "generate_text", {"project_path": project, "prompt": question,
                                                               "backend": engine, "max_tokens": 40})["response"])
               for engine in ("transformers", "mlx")}
    assert answers["transformers"] == answers["mlx"] == "The capital of France is Paris."


@pytest.mark.slow
def test_a_few_steps_teach_it_and_every_export_agrees(smol):
    server, project = smol["server"], smol["project"]
    at = {"project_path": project}
    mcp_ok(server, "import_data", {**at, "files": [str(smol["data"])], "replace_samples": True})
    mcp_ok(server, "prepare_dataset", at)
    run_id = mcp_ok(server, "configure_training_run", {**at, "run_name": "spell", "override_params": {
        "training": {"stage1": {"iterations": 12, "learning_rate": 2e-3, "warmup_steps": 2, "batch_size": 4},
                     "save_steps": 12, "eval_steps": 12, "log_steps": 4}}})["run_id"]
    out = mcp_ok(server, "start_training", {**at, "run_id": run_id, "async_mode": False})
    stage = out["result"]["stages"]["stage1"]
    assert stage["val_loss"] < 0.8 * stage["val_loss_before"], stage  # it learns the task, on held-out rows

    base, run = Path(smol["base"]["path"]), Path(project) / "runs" / run_id
    adapter = run / "stage1" / "adapters"
    ids = prompt_ids(base)
    tuned = hf_logits(base, ids, adapter)
    assert np.abs(tuned - hf_logits(base, ids)).max() > 0.1, "the adapter changes the model"
    exported = mcp_ok(server, "export_model", {**at, "run_id": run_id, "stage": 1, "export_format": "adapters"})
    mlx_tuned = mlx_logits(base, ids, Path(exported["export_path"]) / "mlx")  # the same adapter in mlx-lm
    assert np.abs(mlx_tuned - tuned).max() < 1e-2 and (mlx_tuned.argmax(-1) == tuned.argmax(-1)).all()
    merged = mcp_ok(server, "export_model", {**at, "run_id": run_id, "stage": 1, "export_format": "huggingface"})
    merged_logits = hf_logits(Path(merged["export_path"]), ids)
    np.testing.assert_allclose(merged_logits, tuned, atol=SAME * 100)
    fused = mcp_ok(server, "export_model", {**at, "run_id": run_id, "stage": 1, "export_format": "mlx"})
    fused_logits = mlx_logits(Path(fused["export_path"]), ids)  # fused by mlx-lm, loaded as plain mlx-lm would
    assert np.abs(fused_logits - tuned).max() < 1e-2 and (fused_logits.argmax(-1) == tuned.argmax(-1)).all()
    gguf = mcp_ok(server, "export_model", {**at, "run_id": run_id, "stage": 1, "export_format": "gguf",
                                           "quantization": "f16"})
    file = next(name for name in gguf["files"] if name.endswith(".gguf"))
    logits, _ = gguf_logits(Path(gguf["export_path"]) / file, ids, "")
    assert logits[-1].argmax() == merged_logits[-1].argmax()
    assert np.abs(logits[-1] - merged_logits[-1]).max() < 0.5  # f16 weights, llama.cpp's own kernels
    check = gguf["llama_cpp_check"]  # the export's own check: a chat answer, greedy, in both engines
    assert check["checked"] and check["same_greedy_text"] and check["llama_cpp_text"].startswith("<<<untrusted"), check
    assert check["stopped_at_end_of_turn"] and check["end_of_turn"] == "<|im_end|>", check
    figures = []
    for kind in ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"):  # llama.cpp's own quantizer past q8_0
        out = mcp_ok(server, "export_model", {**at, "run_id": run_id, "stage": 1, "export_format": "gguf",
                                              "quantization": kind})
        check, details = out["llama_cpp_check"], out["gguf_details"]
        assert check["checked"] and check["end_of_turn_token"] == "<|im_end|>", check
        assert check["end_of_turn_is_end_of_generation"] and check["gguf_chat_template_matches"], check
        # K-quants keep the answer and its end; legacy 4-bit q4_0 changes this small model's answer, and says so
        assert check["stopped_at_end_of_turn"] == ("warning" not in check), check
        assert (check["stopped_at_end_of_turn"] and check["same_greedy_text"]) or kind == "q4_0", kind
        # top-1 agreement over the prompt and answer positions (many near ties in the prompt's boilerplate);
        # measured 2026-12-05: q8_0 0.977, q6_k 0.907, q5_k_m 0.581, q4_k_m 0.814, q4_0 0.698
        assert check["top1_agreement"] >= {"q8_0": 0.95}.get(kind, 0.5), (kind, check)
        modelfile = Path(out["modelfile"]).read_text()
        assert f"FROM ./{details['gguf_file']}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
        # SmolLM2's template adds its own system prompt to conversations without one: so does Ollama, from SYSTEM
        assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
        assert details["modelfile"]["family"] == "chatml" and details["modelfile"]["system"].startswith("<<<untrusted")
        figures.append(f"{kind} {details['size_mb']:.1f} MB, {details.get('quantize', {}).get('seconds', 0):.1f} s, "
                       f"top-1 {check['top1_agreement']:.3f} over {check['agreement_positions']} positions, "
                       f"same greedy text {check['same_greedy_text']}, ends the turn {check['stopped_at_end_of_turn']}")
    print("SmolLM2 GGUF types: " + "; ".join(figures))
    print(f"SmolLM2 spell task: val loss {stage['val_loss_before']:.3f} -> {stage['val_loss']:.3f}; tuned logits "
          f"mlx vs transformers {np.abs(mlx_tuned - tuned).max():.2e}, merged "
          f"{np.abs(merged_logits - tuned).max():.2e}, fused mlx {np.abs(fused_logits - tuned).max():.2e}, "
          f"GGUF f16 last token "
          f"{np.abs(logits[-1] - merged_logits[-1]).max():.2e}")


@pytest.mark.slow
def test_mlx_learns_on_the_real_model_and_transformers_reads_its_adapter(smol):
    """A tiny share for mlx (about 3 tokens/s for training at this size on a Linux CPU): a few
    steps on two rows lower the loss on the same held-out rows, and the adapter mlx trained
    gives the same logits in transformers + peft."""
    server, project = smol["server"], smol["project"]
    at = {"project_path": project}
    mcp_ok(server, "import_data", {**at, "files": [str(smol["data"])], "replace_samples": True, "overwrite": True})
    mcp_ok(server, "prepare_dataset", at)
    run_id = mcp_ok(server, "configure_training_run", {**at, "run_name": "spell-mlx", "override_params": {
        "training": {"backend": "mlx", "max_seq_length": 64, "val_batches": 1, "save_steps": 3, "eval_steps": 3,
                     "log_steps": 1, "stage1": {"iterations": 3, "learning_rate": 2e-3, "warmup_steps": 0,
                                                "batch_size": 2}}}})["run_id"]
    out = mcp_ok(server, "start_training", {**at, "run_id": run_id, "async_mode": False})
    stage = out["result"]["stages"]["stage1"]
    assert out["result"]["backend"] == "mlx" and stage["val_loss"] < stage["val_loss_before"], stage

    base = Path(smol["base"]["path"])
    ids = prompt_ids(base)
    trained = mlx_logits(base, ids, Path(project) / "runs" / run_id / "stage1" / "adapters")
    exported = mcp_ok(server, "export_model", {**at, "run_id": run_id, "stage": 1, "export_format": "adapters"})
    in_peft = hf_logits(base, ids, Path(exported["export_path"]) / "peft")
    assert np.abs(trained - mlx_logits(base, ids)).max() > 1e-2, "the adapter changes the model"
    assert np.abs(in_peft - trained).max() < 1e-2 and (in_peft.argmax(-1) == trained.argmax(-1)).all()
    print(f"SmolLM2 on mlx, 3 steps: val loss {stage['val_loss_before']:.3f} -> {stage['val_loss']:.3f} at "
          f"{stage['tokens_per_second']:.1f} tokens/s; its adapter in peft vs mlx "
          f"{np.abs(in_peft - trained).max():.2e}")
