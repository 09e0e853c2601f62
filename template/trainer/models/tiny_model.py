"""Tiny models of the real architectures, built locally: random weights, a tokenizer
trained on the spot (with a chat template), saved in Hugging Face format.

Both `mlx_lm.load` and `transformers.AutoModelForCausalLM.from_pretrained` load the
result, so tests, demos and smoke tests exercise the real loading and training code
without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

from trainer.errors import ProjectError
from trainer.models.checks import check

# The Hugging Face architectures a tiny model can be built for (those of trainer.config.ARCHITECTURES).
ARCHITECTURES = ("llama", "olmo2", "mistral")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
# ChatML: understood by both engines' chat-template code; generation stops at <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_SHAPE = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
# Words in every tokenizer corpus, so prompts outside the project's data still tokenize compactly.
BASE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the answer? The answer is given below.",
    "You are a helpful assistant. Answer the question briefly and correctly.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 plus minus times equals",
]


class TinyModelError(ProjectError):
    kind = "tiny_model_error"


def _require_engines():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        from tokenizers import Tokenizer  # noqa: F401
    except ImportError as error:
        raise TinyModelError(
            f"building a tiny model needs torch, transformers and tokenizers ({error.name} is missing): "
            "pip install -e '.[transformers]'"
        ) from error


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(BASE_CORPUS) + list(texts), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(
    architecture: str,
    output: Path,
    texts: Iterable[str] = (),
    *,
    seed: int = 0,
    shape: Optional[dict[str, int]] = None,
    verify: bool = True,
    rope_theta: Optional[float] = None,
) -> dict[str, Any]:
    """Build, save and (optionally) verify a tiny model; returns a summary."""
    if architecture not in ARCHITECTURES:
        raise TinyModelError(f"unknown architecture '{architecture}'; supported: {', '.join(ARCHITECTURES)}")
    _require_engines()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = {**DEFAULT_SHAPE, **(shape or {})}
    if dims["hidden_size"] % dims["num_attention_heads"]:
        raise TinyModelError("hidden_size must be a multiple of num_attention_heads")
    if dims["num_attention_heads"] % dims["num_key_value_heads"]:
        raise TinyModelError("num_attention_heads must be a multiple of num_key_value_heads")

    tokenizer = train_tokenizer(texts, dims["vocab_size"])
    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(output)

    config = AutoConfig.for_model(
        architecture,
        **{**dims, "vocab_size": len(tokenizer)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **({"rope_theta": rope_theta} if rope_theta else {}),  # transformers 5 keeps it in rope_parameters
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(output)
    summary = {
        "path": str(output),
        "architecture": architecture,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "shape": {**dims, "vocab_size": len(tokenizer)},
        "files": sorted(p.name for p in output.iterdir()),
    }
    if verify:
        summary["verified"] = check(output)
    (output / "tiny_model.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
