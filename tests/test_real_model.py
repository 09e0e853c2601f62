"""The real SmolLM2-135M-Instruct (Llama architecture, 49,152-token BPE vocabulary, ChatML, tied
embeddings, RoPE base 100,000) brought in as a GGUF through set_base_model: transformers turns it
into a Hugging Face folder, and both engines load it with the same logits and the same greedy
text (issue 15 items 1 and 5; the training and export checks on it come with the rest of 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import mcp_ok, unwrap
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings

pytest.importorskip("torch")
pytest.importorskip("gguf")
pytest.importorskip("mlx_lm")


@pytest.mark.slow
def test_a_gguf_becomes_the_base_model_and_both_engines_agree(tmp_path, smollm2_gguf):
    shelf = tmp_path / "downloads"
    shelf.mkdir()
    gguf = shelf / smollm2_gguf.name
    gguf.write_bytes(smollm2_gguf.read_bytes())  # the user's download, inside the allowed roots
    server = build_server(Settings(output_dir=tmp_path / "projects", allowed_roots=[tmp_path]))
    project = mcp_ok(server, "generate_fine_tuning_project", {"project_name": "smol",
                                                             "base_model": {"type": "llama"}})["project_path"]
    out = mcp_ok(server, "set_base_model", {"project_path": project, "source": str(gguf)})
    assert out["kind"] == "gguf" and out["local_path"] == "models/SmolLM2-135M-Instruct.Q4_1"
    verified = out["details"]["verified"]
    assert verified["mlx"] is True and verified["max_logit_difference"] < 1e-3 and verified["same_greedy_tokens"]
    model = Path(out["path"])
    config = json.loads((model / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 49152 and config["tie_word_embeddings"]
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" in text
    # the same greedy answer from both engines, through the tool, stopping at the end of the turn
    question = "What is the capital of France? Answer in one word."
    answers = {engine: unwrap(mcp_ok(server, "generate_text", {"project_path": project, "prompt": question,
                                                               "backend": engine, "max_tokens": 12})["response"])
               for engine in ("transformers", "mlx")}
    assert answers["transformers"] == answers["mlx"] == "The capital of France is Paris."
