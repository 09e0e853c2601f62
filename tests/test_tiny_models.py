"""The generated project's make_tiny_model.py builds llama, olmo2 and mistral models that
both real engines load (transformers and mlx-lm agree on the logits), and the tokenizer
then measures the quality report in tokens."""

from __future__ import annotations

import json

import pytest

from conftest import render, script

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mlx_lm")


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "architecture"),
                         [("olmo", "olmo2"), ("llama", "llama"), ("mistral", "mistral")])
def test_tiny_model_loads_in_both_engines(tmp_path, model_type, architecture):
    project = render(tmp_path / "p", model_type=model_type)
    code, out = script(project, "make_tiny_model.py")
    assert code == 0, out
    assert out["architecture"] == architecture
    assert out["path"] == str(project / "models" / f"tiny-{architecture}")
    assert out["verified"]["transformers"] is True and out["verified"]["mlx"] is True
    assert out["verified"]["max_logit_difference"] < 1e-3
    path = project / "models" / f"tiny-{architecture}"
    assert json.loads((path / "config.json").read_text())["model_type"] == architecture

    import mlx_lm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert type(AutoModelForCausalLM.from_pretrained(path)).__name__.lower().startswith(architecture.replace("2", ""))
    model, tokenizer = mlx_lm.load(str(path))
    assert tokenizer.eos_token == "<|im_end|>"
    assert AutoTokenizer.from_pretrained(path).chat_template

    # with the tiny model as base, lengths in the quality report are counted in tokens
    code, prepared = script(project, "prepare_dataset.py",
                            env={"OLMO_BASE_MODEL__LOCAL_PATH": f"models/tiny-{architecture}"})
    assert code == 0, prepared
    assert prepared["length_unit"] == "tokens"
    report = json.loads((project / prepared["report"]).read_text())
    assert report["lengths"]["over_max_seq_length"] == 0
    assert 5 < report["lengths"]["total"]["mean"] < 100


@pytest.mark.slow
def test_tiny_model_shape_flags_and_errors(tmp_path):
    project = render(tmp_path / "p")
    code, out = script(project, "make_tiny_model.py", "--architecture", "llama", "--hidden-size", "128",
                       "--layers", "3", "--heads", "4", "--kv-heads", "4", "--output", "models/bigger", "--no-verify")
    assert code == 0, out
    config = json.loads((project / "models" / "bigger" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (128, 3, 4)
    assert "verified" not in out
    code, out = script(project, "make_tiny_model.py", "--heads", "3", "--no-verify")
    assert code == 1 and "multiple of num_attention_heads" in out["error"]["message"]
