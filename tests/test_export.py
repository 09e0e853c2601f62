"""Export through generated projects, verified by loading every export in the tool a user
would load it with: peft and mlx-lm for adapters, transformers for the merged model, mlx-lm
for the fused one, llama.cpp (llama-cpp-python) for GGUF; and each agrees with the trained
model. Adapters trained by either engine export to every format. Plus the refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_training import ARCHITECTURES, local, make_project, train

from conftest import script, snapshot

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx_lm")
pytest.importorskip("gguf")

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
# Tolerances on logits (the tiny models' logits are of order 1): engines in float32 agree to
# rounding; llama.cpp computes in its own kernels, f16 and q8_0 weights round further.
SAME = 1e-4
GGUF = {"f16": 0.02, "q8_0": 0.05}


def llama_cpp():
    """llama-cpp-python builds from source; CI installs it, elsewhere its tests skip without it."""
    if os.environ.get("CI"):
        import llama_cpp as module

        return module
    return pytest.importorskip("llama_cpp")


def prompt_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_logits(model_dir: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def mlx_logits(model_dir: Path, ids: list[int], adapter: Path | None = None) -> np.ndarray:
    import mlx.core as mx
    import mlx_lm

    model, _ = mlx_lm.load(str(model_dir), adapter_path=str(adapter) if adapter else None)
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def gguf_logits(file: Path, ids: list[int], text: str) -> tuple[np.ndarray, list[int]]:
    model = llama_cpp().Llama(model_path=str(file), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    tokens = model.tokenize(text.encode(), add_bos=False, special=True)
    model.eval(ids)
    return np.array(model.scores[:len(ids)]), tokens


def export(project: Path, run_id: str, stage: int, fmt: str, *extra: str) -> dict:
    code, out = script(project, "export.py", "--run-id", run_id, "--stage", str(stage), "--format", fmt, *extra)
    assert code == 0, out
    return out


def run_id_of(result: dict) -> str:
    return Path(result["manifest_path"]).parent.name


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("export"), "olmo", num_stages=2)


@pytest.fixture(scope="module")
def runs(project):
    return {backend: run_id_of(train(project, f"ex-{backend}", backend, "olmo",
                                     "--set", "training.stage2.iterations=20"))
            for backend in ("transformers", "mlx")}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_every_format_loads_and_agrees_with_the_trained_model(project, runs, backend):
    run_id, base = runs[backend], project / "models" / "tiny-olmo2"
    trained = project / "runs" / run_id / "stage2" / "adapters"
    ids = prompt_ids(base)
    reference = (mlx_logits(base, ids, trained) if backend == "mlx" else hf_logits(base, ids, trained))
    assert np.abs(reference - hf_logits(base, ids)).max() > 1e-2, "the adapter must change the model"

    adapters = export(project, run_id, 2, "adapters")
    folder = Path(adapters["export_path"])
    assert folder == project / "exports" / f"{run_id}-stage2-adapters" and not adapters["merged"]
    assert "The LoRA adapter only" in (folder / "README.md").read_text()
    np.testing.assert_allclose(hf_logits(base, ids, folder / "peft"), reference, atol=SAME)
    np.testing.assert_allclose(mlx_logits(base, ids, folder / "mlx"), reference, atol=SAME)

    merged = export(project, run_id, 2, "huggingface")
    merged_dir = Path(merged["export_path"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md"} <= set(
        merged["files"])
    merged_logits = hf_logits(merged_dir, ids)
    np.testing.assert_allclose(merged_logits, reference, atol=SAME)
    # the same adapter fused by mlx-lm gives the same next-token logits as the transformers merge
    fused = export(project, run_id, 2, "mlx")
    np.testing.assert_allclose(mlx_logits(Path(fused["export_path"]), ids), merged_logits, atol=SAME)

    text = _chat_text(base)
    for quantization in ("f16", "q8_0"):
        result = export(project, run_id, 2, "gguf", "--quantization", quantization)
        file = Path(result["export_path"]) / result["details"]["gguf_file"]
        assert file.suffix == ".gguf" and result["details"]["architecture"] == "olmo2"
        logits, tokens = gguf_logits(file, ids, text)
        assert tokens == ids, "llama.cpp must tokenize the chat prompt as transformers does"
        assert np.abs(logits - merged_logits).max() < GGUF[quantization]
        assert logits[-1].argmax() == merged_logits[-1].argmax()
        check = result["details"]["llama_cpp_check"]  # the export's own check, in a child process
        assert check["checked"] and check["same_first_token"] and "crash" not in check, check

    card = (merged_dir / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and run_id in card and "| 2 | stage1/adapters |" in card
    assert "## Usage" in card and str(merged_dir) in card
    manifest = json.loads((project / "runs" / run_id / "run-manifest.json").read_text())
    assert [e["export_format"] for e in manifest["exports"]] == ["adapters", "huggingface", "mlx", "gguf", "gguf"]
    assert manifest["exports"][1]["model_size_mb"] == merged["model_size_mb"] > 0
    assert not [p for p in (project / "exports").iterdir() if p.name.startswith(".tmp-")]


def _chat_text(base: Path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base).apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)


@pytest.mark.slow
def test_mlx_export_quantizes(project, runs):
    full = export(project, runs["mlx"], 1, "mlx")
    small = export(project, runs["mlx"], 1, "mlx", "--quantization", "q8")
    config = json.loads((Path(small["export_path"]) / "config.json").read_text())
    assert config["quantization"]["bits"] == 8 and small["quantization"] == "q8"
    ids = prompt_ids(project / "models" / "tiny-olmo2")
    quantized, reference = mlx_logits(Path(small["export_path"]), ids), mlx_logits(Path(full["export_path"]), ids)
    assert np.abs(quantized - reference).max() < 0.1


@pytest.mark.slow
def test_unmerged_exports_are_the_adapter_alone(project, runs):
    result = export(project, runs["transformers"], 1, "huggingface", "--no-merge")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(result["files"])
    assert not result["merged"] and "PeftModel.from_pretrained" in result["usage_instructions"]
    result = export(project, runs["transformers"], 1, "mlx", "--no-merge")  # converted to mlx-lm's format
    assert {"adapter_config.json", "adapters.safetensors"} <= set(result["files"])


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_gguf_agrees_with_the_merged_model(tmp_path_factory, model_type):
    project = make_project(tmp_path_factory.mktemp("gguf"), model_type)
    run_id = run_id_of(train(project, "g", "transformers", model_type, "--set", "training.stage1.iterations=10"))
    merged = Path(export(project, run_id, 1, "safetensors")["export_path"])
    base = project / "models" / f"tiny-{ARCHITECTURES[model_type]}"
    ids = prompt_ids(base)
    reference = hf_logits(merged, ids)
    for quantization in ("f16", "q8_0"):
        result = export(project, run_id, 1, "gguf", "--quantization", quantization)
        assert result["details"]["architecture"] == "llama"  # llama.cpp runs mistral as llama
        logits, tokens = gguf_logits(Path(result["export_path"]) / result["details"]["gguf_file"], ids,
                                     _chat_text(base))
        assert tokens == ids
        assert np.abs(logits - reference).max() < GGUF[quantization]
        assert logits[-1].argmax() == reference[-1].argmax()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["llama", "mistral", "olmo"])
def test_quantized_types_load_stop_agree_and_come_with_a_modelfile(tmp_path_factory, model_type):
    """llama.cpp's own quantizer takes the export to K-quants and the other common types; each file
    loads in llama.cpp, counts the template's end-of-turn token as an end of generation, renders the
    prompt with its own chat template to the very tokens transformers uses, and agrees with the
    merged model as stated; the Modelfile beside it follows Ollama's grammar and renders what the
    tokenizer's chat template renders."""
    llama_cpp()
    ollama, go = _project_module("export.ollama"), _project_module("export.go_template")
    project = make_project(tmp_path_factory.mktemp("quants"), model_type)
    run_id = run_id_of(train(project, "k", "transformers", model_type, "--set", "training.stage1.iterations=10"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(project / "models" / f"tiny-{ARCHITECTURES[model_type]}")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "A river?"}]
    kinds = ("q4_k_m", "q5_k_m", "q6_k", "q4_0", "q8_0") if model_type == "llama" else ("q4_k_m",)
    sizes = {}
    for kind in kinds:
        result = export(project, run_id, 1, "gguf", "--quantization", kind)
        details, check = result["details"], result["details"]["llama_cpp_check"]
        sizes[kind] = details["size_mb"]
        assert check["checked"] and "crash" not in check, check
        assert check["end_of_turn_is_end_of_generation"] and check["end_of_turn_token"] == "<|im_end|>", check
        assert check["gguf_chat_template_matches"], "llama.cpp's chat mode renders the prompt's very tokens"
        # tiny random models have near-flat logits, so 4-bit rounding flips some top tokens; q8_0 keeps them
        assert check["top1_agreement"] >= (0.9 if kind == "q8_0" else 0.3), (kind, check)
        if kind != "q8_0":
            assert details["quantize"]["quantizer"] == "llama.cpp llama_model_quantize"
            assert details["quantize"]["size_mb"] < details["quantize"]["source_mb"]
        parsed = ollama.parse(Path(result["modelfile"]).read_text())
        assert ("FROM", f"./{details['gguf_file']}") in parsed
        template = next(value for word, value in parsed if word == "TEMPLATE")
        rendered = go.render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]}
                                                     for m in conversation], "System": "Be brief."})
        assert rendered == tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        assert {("PARAMETER", "stop <|im_end|>"), ("PARAMETER", "temperature 0.0")} <= set(parsed)
        assert f"-f {result['modelfile']}" in result["usage_instructions"]  # ollama create NAME -f <Modelfile>
    if model_type == "llama":
        assert sizes["q4_k_m"] < sizes["q6_k"] and sizes["q4_0"] < sizes["q8_0"], sizes
    code, out = script(project, "export.py", "--run-id", run_id, "--stage", "1", "--format", "gguf",
                       "--quantization", "q4_k_z")
    assert code != 0 and "available: f32, f16, q8_0, q4_0" in out["error"]["message"] and "q4_k_m" in out[
        "error"]["message"]


CRASHING_LLAMA_CPP = """
import os, runpy, signal, sys
if sys.argv[3] == "1" or os.environ.get("CRASH_ALWAYS"):  # repacking on: die as llama.cpp does on AMX CPUs
    os.kill(os.getpid(), signal.SIGSEGV)
child = os.environ["GGUF_CHECK"]
sys.argv = [child] + sys.argv[1:]
runpy.run_path(child, run_name="__main__")
"""

CHECK_WITH_CRASHES = """
import json, sys
from pathlib import Path
from trainer.export import gguf_check
crash = [sys.executable, "-c", sys.argv[3]]
print(json.dumps(gguf_check.verify(Path(sys.argv[1]), Path(sys.argv[2]), command=crash)))
"""


@pytest.mark.slow
def test_a_crash_of_llama_cpp_is_reported_not_shared(project, runs):
    """A llama.cpp that dies of a signal (as builds for AMX CPUs do in their weight repacking)
    kills the child, not the export: the check says which signal and what to do, retries with the
    repacking off, and only then calls the file unverified. A file llama.cpp rejects fails."""
    import subprocess
    import sys

    llama_cpp()
    run_id = runs["transformers"]
    merged = Path(export(project, run_id, 1, "huggingface", "--overwrite")["export_path"])  # merged, whatever was there
    gguf = export(project, run_id, 1, "gguf", "--quantization", "f32", "--overwrite")
    file = Path(gguf["export_path"]) / gguf["details"]["gguf_file"]
    env = {**os.environ, "GGUF_CHECK": str(project / "trainer" / "export" / "gguf_check.py")}

    def check(**extra: str) -> dict:
        out = subprocess.run([sys.executable, "-c", CHECK_WITH_CRASHES, str(file), str(merged), CRASHING_LLAMA_CPP],
                             cwd=project, capture_output=True, text=True, env={**env, **extra})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])

    once = check()
    assert once["checked"] and once["crash"]["signal"] == "SIGSEGV", once
    assert "GGML_NATIVE=OFF" in once["crash"]["advice"] and "file is fine" in once["crash"]["retried"]
    assert once["same_first_token"]  # the retry really ran llama.cpp on the file
    always = check(CRASH_ALWAYS="1")
    assert not always["checked"] and "crashed (SIGSEGV) with repacking on and off" in always["reason"]

    broken = file.parent.parent / "broken.gguf"
    broken.write_bytes(file.read_bytes()[:4096])  # a truncated file: llama.cpp refuses it, no crash
    out = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path\n"
                          "from trainer.export import gguf_check\n"
                          "try:\n gguf_check.verify(Path(sys.argv[1]), Path(sys.argv[2]))\n"
                          "except gguf_check.LoaderError as e: print('refused:', e)", str(broken), str(merged)],
                         cwd=project, capture_output=True, text=True)
    assert "refused: llama.cpp could not run broken.gguf" in out.stdout, out


@pytest.mark.slow
def test_exports_are_refused_without_writing(project, runs, tmp_path):
    run_id = runs["transformers"]
    before = snapshot(project / "exports") if (project / "exports").exists() else {}

    code, out = script(project, "configure_run.py", "--name", "untrained", *local("olmo"))
    assert code == 0, out
    code, out = script(project, "export.py", "--run-id", out["run_id"], "--stage", "1", "--format", "adapters")
    assert code == 1 and "has not completed (status pending)" in out["error"]["message"]

    code, out = script(project, "export.py", "--run-id", run_id, "--stage", "2", "--format", "gguf", "--no-merge")
    assert code == 1 and "merge_adapters" in out["error"]["message"]
    code, out = script(project, "export.py", "--run-id", run_id, "--stage", "1", "--format", "gguf",
                       "--quantization", "q4_k")
    assert code == 1 and "f32, f16, q8_0" in out["error"]["message"]
    code, out = script(project, "export.py", "--run-id", run_id, "--stage", "1", "--format", "adapters",
                       "--quantization", "q8")
    assert code == 1 and "takes no quantization" in out["error"]["message"]

    first = export(project, run_id, 1, "adapters", "--output", str(tmp_path / "mine"))
    kept = snapshot(tmp_path / "mine")
    code, out = script(project, "export.py", "--run-id", run_id, "--stage", "1", "--format", "adapters",
                       "--output", str(tmp_path / "mine"))
    assert code == 1 and "already exists; pass overwrite" in out["error"]["message"]
    assert snapshot(tmp_path / "mine") == kept
    again = export(project, run_id, 1, "adapters", "--output", str(tmp_path / "mine"), "--overwrite")
    assert again["export_path"] == first["export_path"] and not list(tmp_path.glob(".tmp-*"))

    code, out = script(project, "export.py", "--run-id", run_id, "--stage", "1", "--format", "huggingface",
                       "--upload", "--dry-run")
    assert code == 1 and "huggingface.enabled: false" in out["error"]["message"]
    after = snapshot(project / "exports") if (project / "exports").exists() else {}
    assert after == before


@pytest.mark.slow
def test_upload_dry_run_lists_the_files(project, runs):
    env = {"OLMO_HUGGINGFACE__ENABLED": "true", "HF_TOKEN": "hf_never_printed"}
    code, out = script(project, "export.py", "--run-id", runs["mlx"], "--stage", "1", "--format", "adapters",
                       "--upload", "--dry-run", "--hf-repo-id", "me/tiny-adapter", "--overwrite", env=env)
    assert code == 0, out
    upload = out["upload"]
    assert upload["dry_run"] and upload["repo_id"] == "me/tiny-adapter" and upload["private"] is True
    assert {"README.md", "peft/adapter_model.safetensors", "mlx/adapters.safetensors"} <= set(upload["files"])
    assert out["huggingface_url"] is None and "hf_never_printed" not in json.dumps(out)


@pytest.mark.slow
def test_an_unsupported_architecture_is_refused_at_configure_and_at_export(tmp_path_factory):
    """A custom qwen2 base: GGUF planned -> the run is refused before training; without it the
    run trains, and a GGUF export then fails listing what is supported."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    project = make_project(tmp_path_factory.mktemp("qwen"), "llama")
    llama = project / "models" / "tiny-llama"
    qwen = project / "models" / "tiny-qwen2"
    tokenizer = AutoTokenizer.from_pretrained(llama)
    tokenizer.save_pretrained(qwen)
    config = AutoConfig.for_model("qwen2", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(qwen)
    model = ["--set", "base_model.local_path=models/tiny-qwen2", "--set", "training.backend=transformers",
             "--set", "training.stage1.iterations=4", "--set", "training.stage1.warmup_steps=1"]
    runs_before = sorted(p.name for p in (project / "runs").iterdir()) if (project / "runs").exists() else []
    code, out = script(project, "train.py", "--name", "q", *model, "--set", "export.formats=[adapters, gguf]")
    assert code == 1 and "'qwen2' architecture" in out["error"]["message"]
    assert out["error"]["supported"] == ["llama", "mistral", "olmo2"]
    assert (sorted(p.name for p in (project / "runs").iterdir()) if (project / "runs").exists() else []) == runs_before

    code, out = script(project, "train.py", "--name", "q", *model, "--set", "export.formats=[adapters]")
    assert code == 0, out
    code, out = script(project, "export.py", "--run-id", run_id_of(out), "--stage", "1", "--format", "gguf")
    assert code == 1 and "supported: llama, mistral, olmo2" in out["error"]["message"]
    assert not (project / "exports").exists()


@pytest.mark.slow
def test_gguf_with_a_sentencepiece_tokenizer(tmp_path):
    """Mistral and Llama 2 ship a SentencePiece tokenizer.model: a tiny mistral with one
    (trained here, with byte fallback and chat markers) converts with its scores, and
    llama.cpp tokenizes and predicts as transformers does."""
    import io

    import sentencepiece
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    corpus = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
              "What is 2 plus 3? 5. You are a helpful assistant."] * 40
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model_file, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        split_digits=True, minloglevel=2)
    model_dir = tmp_path / "tiny-mistral-spm"
    model_dir.mkdir()
    (model_dir / "tokenizer.model").write_bytes(model_file.getvalue())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>"}))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = _project_module("models.tiny_model").CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    config = AutoConfig.for_model("mistral", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)

    gguf_export = _project_module("export.gguf_export")
    details = gguf_export.convert(model_dir, tmp_path / "m.gguf", "f16")
    assert details["tokenizer_pre"] == "default" and details["architecture"] == "llama"
    text = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(PROMPT, add_generation_prompt=True,
                                                                        tokenize=False)
    ids = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"]
    logits, tokens = gguf_logits(tmp_path / "m.gguf", ids, text)
    assert tokens == ids
    reference = hf_logits(model_dir, ids)
    assert np.abs(logits - reference).max() < GGUF["f16"] and logits[-1].argmax() == reference[-1].argmax()


def _project_module(name: str):
    """A module of the template's trainer package, imported from the template source.

    template/trainer/ has no __init__.py (it is rendered from __init__.py.jinja), so a plain
    import would make it a namespace package that any installed project's `trainer` shadows:
    the package is pinned to the template's folder instead."""
    import importlib
    import sys
    import types

    from conftest import REPO

    def forget() -> None:
        for module in [m for m in sys.modules if m == "trainer" or m.startswith("trainer.")]:
            del sys.modules[module]

    forget()  # a `trainer` of some generated project may be loaded (Streamlit's AppTest runs in-process)
    package = types.ModuleType("trainer")
    package.__path__ = [str(REPO / "template" / "trainer")]
    sys.modules["trainer"] = package
    try:
        module = importlib.import_module(f"trainer.{name}")
        assert Path(module.__file__).is_relative_to(REPO / "template"), module.__file__
        return module
    finally:  # leave no `trainer` package behind for in-process tests of generated projects
        forget()
