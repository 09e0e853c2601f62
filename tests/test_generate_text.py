"""Talking to a trained model: scripts/generate.py and the generate_text tool give the greedy
answer the engine itself gives (peft's generate, mlx-lm's generate) for a run's adapter, a
conversation and an export, with either engine, and refuse bad requests clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_training import make_project, train

from conftest import mcp_error, mcp_ok, script, unwrap
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings

pytest.importorskip("peft")
pytest.importorskip("mlx_lm")

PROMPTS = ["What is 2 plus 3?", "Name a river in Europe."]
TOKENS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("generate"), "llama")
    runs = {backend: Path(train(project, f"talk-{backend}", backend, "llama")["manifest_path"]).parent
            for backend in ("transformers", "mlx")}
    return project, runs


def chat_text(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def direct(project: Path, run_dir: Path | None, engine: str, messages: list[dict], merged: Path | None = None) -> str:
    """The engine's own greedy generation, without the project's code."""
    base = project / "models" / "tiny-llama"
    adapter = run_dir / "stage1" / "adapters" if run_dir else None
    if engine == "mlx":
        import mlx_lm

        model, tokenizer = mlx_lm.load(str(base), adapter_path=str(adapter) if adapter else None)
        ids = tokenizer.encode(chat_text(tokenizer, messages), add_special_tokens=False)
        return mlx_lm.generate(model, tokenizer, prompt=ids, max_tokens=TOKENS, verbose=False)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged or base)
    model = AutoModelForCausalLM.from_pretrained(merged or base)
    if adapter and not merged:
        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.tensor([tokenizer.encode(chat_text(tokenizer, messages), add_special_tokens=False)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=TOKENS,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generate(project: Path, *args: str, stdin: str | None = None) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "scripts/generate.py", "--json", "--max-tokens", str(TOKENS), *args],
                          cwd=project, capture_output=True, text=True, input=stdin, timeout=600, check=False)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["transformers", "mlx"])
def test_a_runs_answer_is_the_engines_own(trained, engine):
    project, runs = trained
    answers = []
    for prompt in PROMPTS:
        code, out = generate(project, "--run-id", runs[engine].name, "--prompt", prompt)
        assert code == 0, out
        assert out["model"] == {"backend": engine, "base_model": str(project / "models" / "tiny-llama"),
                                "run_id": runs[engine].name, "stage": 1,
                                "adapter": str(runs[engine] / "stage1" / "adapters")}
        assert out["temperature"] == 0.0
        assert out["response"] == direct(project, runs[engine], engine, [{"role": "user", "content": prompt}])
        answers.append(out["response"])
    base = [direct(project, None, engine, [{"role": "user", "content": p}]) for p in PROMPTS]
    assert answers != base, "the adapter changes what the model says"


@pytest.mark.slow
def test_a_conversation_keeps_its_history(trained):
    project, runs = trained
    code, out = generate(project, "--run-id", runs["transformers"].name, "--chat", "--system", "Be brief.",
                         stdin="\n".join(PROMPTS) + "\n\n")
    assert code == 0, out
    assert [t["prompt"] for t in out["turns"]] == PROMPTS
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]
    assert out["turns"][0]["response"] == direct(project, runs["transformers"], "transformers", history)
    history += [{"role": "assistant", "content": out["turns"][0]["response"]},
                {"role": "user", "content": PROMPTS[1]}]
    assert out["turns"][1]["response"] == direct(project, runs["transformers"], "transformers", history)


@pytest.mark.slow
def test_the_other_engine_and_an_export_answer_too(trained):
    """The mlx-trained adapter under transformers (converted), and its merged export."""
    project, runs = trained
    code, out = generate(project, "--run-id", runs["mlx"].name, "--backend", "transformers", "--prompt", PROMPTS[0])
    assert code == 0 and out["model"]["backend"] == "transformers", out
    code, exported = script(project, "export.py", "--run-id", runs["mlx"].name, "--stage", "1",
                            "--format", "huggingface")
    assert code == 0, exported
    merged = Path(exported["export_path"])
    code, from_export = generate(project, "--export", str(merged), "--backend", "transformers", "--prompt", PROMPTS[0])
    assert code == 0, from_export
    assert from_export["model"]["export"] == str(merged)
    expected = direct(project, None, "transformers", [{"role": "user", "content": PROMPTS[0]}], merged=merged)
    assert from_export["response"] == expected == out["response"]


@pytest.mark.slow
def test_the_generate_text_tool(trained, tmp_path):
    project, runs = trained
    server = build_server(Settings(output_dir=project.parent))
    result = mcp_ok(server, "generate_text", {"project_path": str(project), "run_id": runs["mlx"].name,
                                              "prompt": PROMPTS[1], "max_tokens": TOKENS})
    expected = direct(project, runs["mlx"], "mlx", [{"role": "user", "content": PROMPTS[1]}])
    assert unwrap(result["response"]) == expected
    assert result["model"]["backend"] == "mlx" and result["max_tokens"] == TOKENS
    dash = mcp_ok(server, "generate_text", {"project_path": str(project), "run_id": runs["mlx"].name,
                                            "prompt": "-5 plus 3?", "system": "-be brief", "max_tokens": 4})
    assert dash["prompt"] == "-5 plus 3?", "a prompt starting with '-' is not taken for an option"
    assert "max_tokens" in mcp_error(server, "generate_text", {"project_path": str(project), "prompt": "hi",
                                                               "max_tokens": 5000})
    assert "not both" in mcp_error(server, "generate_text", {"project_path": str(project), "prompt": "hi",
                                                             "run_id": runs["mlx"].name, "export_path": "exports/x"})
    assert "allowed" in mcp_error(server, "generate_text", {"project_path": str(project), "prompt": "hi",
                                                            "export_path": str(tmp_path)})


@pytest.mark.slow
def test_refusals_name_the_problem(trained):
    project, runs = trained
    code, out = generate(project, "--run-id", runs["mlx"].name, "--stage", "2", "--prompt", "hi")
    assert code == 1 and "stage 2 of run" in out["error"]["message"] and "has not completed" in out["error"]["message"]
    code, out = generate(project, "--run-id", runs["mlx"].name)
    assert code == 1 and "--prompt" in out["error"]["message"]
    code, out = generate(project, "--export", str(project / "data"), "--prompt", "hi")
    assert code == 1 and "neither a model" in out["error"]["message"]
    code, out = generate(project, "--run-id", runs["mlx"].name, "--prompt", "hi", "--max-tokens", "0")
    assert code == 1 and "max_tokens must be between 1" in out["error"]["message"]
