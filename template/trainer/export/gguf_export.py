"""Hugging Face model directory -> GGUF (llama.cpp, Ollama, LM Studio), with the `gguf` package.

The conversion follows llama.cpp's convert_hf_to_gguf.py for the architectures listed in
SUPPORTED: the same metadata keys, tensor names (gguf's own name map), the Q/K row
permutation llama.cpp's LLAMA rope expects, llama-3 rope factors, and the tokenizer as a
byte-level BPE vocabulary with its merges and chat template, or a SentencePiece vocabulary
(tokenizer.model, as Mistral and Llama 2 ship) with its scores. llama.cpp tokenizes
SentencePiece text the way sentencepiece does (a space prefix after special tokens too),
which is the Hugging Face tokenizers' `legacy` behaviour. Tensors are streamed: one is
in memory at a time. Norms and other 1-D tensors stay float32, as llama.cpp requires.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from trainer.engines.base_trainer import END_OF_TURN
from trainer.export import gguf_quantize
from trainer.models.gguf_support import CL100K, SUPPORTED, GGUFError, tokenizer_pre, unsupported  # noqa: F401

QUANTIZATIONS = gguf_quantize.OURS  # what this converter writes; llama.cpp's quantizer takes it further
PERMUTED = {"llama"}  # HF's rotate-half q/k layout is permuted to llama.cpp's interleaved rope


def check(model_type: str, quantization: str = "f16") -> None:
    """Refuse an architecture or a type this export cannot write (the types: ours, and those the
    installed llama-cpp-python's quantizer offers)."""
    if model_type not in SUPPORTED:
        raise unsupported(model_type)
    available = list(QUANTIZATIONS) + gguf_quantize.offered()
    if quantization not in available:
        missing = quantization in gguf_quantize.LLAMA
        raise GGUFError(f"GGUF quantization '{quantization}' is not "
                        + ("offered here: it needs llama.cpp's quantizer (pip install llama-cpp-python)" if missing
                           else "supported") + f"; available: {', '.join(available)}",
                        details={"available": available})


def _added_tokens(model_dir: Path) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) of the tokenizer's added tokens (tokenizer.json)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {entry["id"]: (entry["content"], bool(entry.get("special"))) for entry in data.get("added_tokens", [])}


def _special(text: str, flagged: bool) -> bool:
    return flagged or (text.startswith("<|") and text.endswith("|>"))


def _sentencepiece_vocabulary(writer, model_dir: Path, vocab_size: int) -> None:
    """llama.cpp's "llama" vocabulary: pieces, scores and types from the SentencePiece model,
    then the tokenizer's added tokens (chat markers), as convert_hf_to_gguf.py writes it."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as error:
        raise GGUFError("this tokenizer is a SentencePiece model: pip install sentencepiece") from error
    processor = SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tokens, scores, types = [], [], []
    for index in range(processor.vocab_size()):
        kind = gguf.TokenType.NORMAL
        if processor.IsUnknown(index):
            kind = gguf.TokenType.UNKNOWN
        elif processor.IsControl(index):
            kind = gguf.TokenType.CONTROL
        elif processor.IsUnused(index):
            kind = gguf.TokenType.UNUSED
        elif processor.IsByte(index):
            kind = gguf.TokenType.BYTE
        tokens.append(processor.IdToPiece(index))
        scores.append(processor.GetScore(index))
        types.append(kind)
    for index, (text, flagged) in sorted(_added_tokens(model_dir).items()):
        if index < len(tokens):
            if _special(text, flagged):
                types[index] = gguf.TokenType.CONTROL
            continue
        while len(tokens) < index:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        tokens.append(text)
        scores.append(-1000.0)
        types.append(gguf.TokenType.CONTROL if _special(text, flagged) else gguf.TokenType.USER_DEFINED)
    while len(tokens) < vocab_size:
        tokens.append(f"[PAD{len(tokens)}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, n_vocab=len(tokens))
    from transformers import AutoTokenizer

    _end_of_turn(special, AutoTokenizer.from_pretrained(model_dir))
    special.add_to_gguf(writer)


def _vocabulary(writer, model_dir: Path, vocab_size: int) -> None:
    import gguf
    from transformers import AutoTokenizer

    if (model_dir / "tokenizer.model").is_file():
        return _sentencepiece_vocabulary(writer, model_dir, vocab_size)
    pre = tokenizer_pre(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(reverse[index])
            types.append(gguf.TokenType.CONTROL if _special(reverse[index], added[index].special)
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[index])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    # merges, bos/eos/pad ids, add_bos and the chat template, read from the tokenizer files
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    _end_of_turn(special, tokenizer)
    special.add_to_gguf(writer)


def _end_of_turn(special, tokenizer) -> None:
    """The chat template's end-of-turn token as the GGUF's eot token (llama.cpp's chat mode and
    Ollama stop there), unless the tokenizer files named one already."""

    template = special.chat_template if isinstance(special.chat_template, str) else ""
    vocab = tokenizer.get_vocab()
    marker = next((t for t in END_OF_TURN if t in template and t in vocab), None)
    if "eot" not in special.special_token_ids and (marker or tokenizer.eos_token_id is not None):
        special.special_token_ids["eot"] = vocab[marker] if marker else tokenizer.eos_token_id


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """(rope_theta, scaling) from either config layout (transformers 5 `rope_parameters`, or older keys)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    return float(theta), {**merged, "rope_type": kind}


def rope_factors(config: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3's frequency factors (llama.cpp's rope_freqs tensor)."""
    theta, rope = _rope(config)
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < old / high:
            factors.append(1.0)
        elif wavelength > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def permute(weights: np.ndarray, heads: int) -> np.ndarray:
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensors(model_dir: Path) -> Iterator[tuple[str, tuple[int, ...], Any]]:
    """(name, shape, loader) for every tensor of the model's safetensors files; nothing is read yet."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"no *.safetensors weights in {model_dir}")
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shape = tuple(handle.get_slice(name).get_shape())
                yield name, shape, (lambda f=file, n=name: _load(f, n))


def _load(file: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(name).float().numpy()


def convert(model_dir: Path, output: Path, quantization: str = "q8_0", name: str = "") -> dict[str, Any]:
    """Write `model_dir` (a Hugging Face causal LM with tokenizer) as one GGUF file."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type", "?")
    check(model_type, quantization)
    arch = SUPPORTED[model_type]
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    theta, rope = _rope(config)
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise GGUFError(f"rope scaling '{rope['rope_type']}' is not supported by this GGUF exporter")

    writer = gguf.GGUFWriter(str(output), arch)
    writer.add_name(name or model_dir.name)
    writer.add_block_count(layers)
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    writer.add_rope_freq_base(theta)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config["hidden_size"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantization]
    writer.add_file_type(file_type)
    _vocabulary(writer, model_dir, config["vocab_size"])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], layers)
    plan = []  # (gguf name, shape, loader, heads to permute by) in file order
    for hf_name, shape, loader in _tensors(model_dir):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFError(f"tensor {hf_name} has no GGUF name for the {arch} architecture")
        heads_of = None
        if arch in PERMUTED and hf_name.endswith("q_proj.weight"):
            heads_of = heads
        elif arch in PERMUTED and hf_name.endswith("k_proj.weight"):
            heads_of = kv_heads
        plan.append((target, shape, loader, heads_of))
    if rope["rope_type"] == "llama3":
        factors = rope_factors(config, head_dim)
        plan.append(("rope_freqs.weight", factors.shape, lambda: factors, None))

    def kind(shape: tuple[int, ...]):
        if len(shape) <= 1 or quantization == "f32":
            return gguf.GGMLQuantizationType.F32
        if quantization == "q8_0" and shape[-1] % 32 == 0:
            return gguf.GGMLQuantizationType.Q8_0
        return gguf.GGMLQuantizationType.F16  # rows that do not fill q8_0 blocks stay f16, as in llama.cpp

    # The header first (shapes and types need no data), then one tensor at a time.
    counts: dict[str, int] = {}
    for target, shape, _loader, _heads in plan:
        qtype = kind(shape)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(target, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
        else:
            dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(target, shape, dtype, math.prod(shape) * dtype.itemsize)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _target, shape, loader, heads_of in plan:
        data = loader()
        if heads_of is not None:
            data = permute(data, heads_of)
        qtype = kind(shape)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            data = gguf.quants.quantize(data.astype(np.float32), qtype)
        else:
            data = data.astype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
        writer.write_tensor_data(data)
    writer.close()
    return {"architecture": arch, "quantization": quantization, "tensors": len(plan), "tensor_types": counts,
            "tokenizer_pre": tokenizer_pre(model_dir), "warnings": _spacing_warnings(model_dir)}


def _spacing_warnings(model_dir: Path) -> list[str]:
    """A SentencePiece tokenizer with legacy=False spacing tokenizes text after special tokens
    differently from llama.cpp; say so rather than let a user find out."""
    path = model_dir / "tokenizer.json"
    if not (model_dir / "tokenizer.model").is_file() or not path.is_file():
        return []
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if any(step.get("type") == "Metaspace" and step.get("prepend_scheme") == "first" for step in steps):
        return ["the tokenizer adds a space prefix only at the start of a text (legacy=False); llama.cpp also adds "
                "one after special tokens, so prompts with chat markers may tokenize slightly differently"]
    return []

