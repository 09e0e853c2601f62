"""The tiny model loads with the real engines (skipped where they are not installed)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from trainer.models import tiny_model  # noqa: E402


@pytest.mark.slow
def test_tiny_model_of_the_configured_architecture_loads(config, tmp_path):
    output = tmp_path / "tiny"
    summary = tiny_model.build(config.base_model.architecture, output, ["What is 2 plus 3? 5."], seed=1)
    assert summary["architecture"] == config.base_model.architecture
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(summary["files"])
    assert json.loads((output / "config.json").read_text())["model_type"] == config.base_model.architecture
    assert summary["verified"]["transformers"] is True

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(output)
    messages = [{"role": "user", "content": "hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("What is 2 plus 3?")["input_ids"]) == "What is 2 plus 3?"


def test_unknown_architecture_is_rejected(tmp_path):
    with pytest.raises(tiny_model.TinyModelError, match="supported: llama, olmo2, mistral"):
        tiny_model.build("gpt2", tmp_path)
