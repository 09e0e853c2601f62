"""Which base models llama.cpp can take: the Hugging Face architectures the GGUF exporter maps,
the tokenizer's pre-tokenizer in llama.cpp's names, and the check made when a run is configured,
so a planned GGUF export its model cannot take is refused before training, not after it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from trainer.config import ARCHITECTURES, FineTuningConfig
from trainer.models.merge import ExportError

# Hugging Face model_type -> llama.cpp architecture (verified by loading in llama.cpp)
SUPPORTED = {"llama": "llama", "mistral": "llama", "olmo2": "olmo2"}
# cl100k's split regex, used by Llama 3 and OLMo 2 (llama.cpp: llama-bpe with ignore_merges, else dbrx)
CL100K = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFError(ExportError):
    """What the GGUF exporter cannot take (an export error)."""


def unsupported(model_type: str) -> GGUFError:
    return GGUFError(f"GGUF export does not support the '{model_type}' architecture; supported: "
                     f"{', '.join(sorted(SUPPORTED))}. Export 'huggingface' or 'mlx' instead",
                     details={"architecture": model_type, "supported": sorted(SUPPORTED)})


def tokenizer_pre(model_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer; "default" for a SentencePiece model
    (tokenizer.model, as Mistral and Llama 2 ship)."""
    if (model_dir / "tokenizer.model").is_file():
        return "default"
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model, pre = data.get("model", {}), data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFError("GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, OLMo 2 style) and "
                        f"SentencePiece models (tokenizer.model); {model_dir / 'tokenizer.json'} has a "
                        f"{model.get('type')} model" + (" with byte fallback, and there is no tokenizer.model"
                                                       if model.get("byte_fallback") else ""))
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds[:1] == ["Split"] and steps[0].get("pattern", {}).get("Regex") == CL100K:
        return "llama-bpe" if model.get("ignore_merges") else "dbrx"
    raise GGUFError(f"the tokenizer's pre-tokenizer ({kinds}) has no llama.cpp equivalent this exporter knows; "
                    "known: GPT-2 byte-level, the cl100k split of Llama 3 and OLMo 2, and SentencePiece")


def architecture(config: FineTuningConfig) -> Optional[str]:
    """The base model's Hugging Face model_type: from a local model's config.json, else the
    family's (None for a custom model that is not on disk)."""
    source = Path(config.model_source())
    if (source / "config.json").is_file():
        return json.loads((source / "config.json").read_text(encoding="utf-8")).get("model_type")
    return ARCHITECTURES.get(config.base_model.type) if config.base_model.type != "custom" else None


def check_planned(config: FineTuningConfig) -> None:
    """At configure time: refuse a run whose planned export formats its architecture cannot take."""
    if "gguf" in config.export.formats:
        arch = architecture(config)
        if arch is not None and arch not in SUPPORTED:
            raise ExportError(
                f"export.formats includes gguf, and GGUF export does not support the base model's '{arch}' "
                f"architecture (supported: {', '.join(sorted(SUPPORTED))}); remove gguf from "
                "export.formats or choose another base model", details={"architecture": arch,
                                                                        "supported": sorted(SUPPORTED)})
        source = Path(config.model_source())
        if (source / "tokenizer.json").is_file() or (source / "tokenizer.model").is_file():
            try:
                tokenizer_pre(source)
            except GGUFError as error:
                raise ExportError(f"export.formats includes gguf, and the base model's tokenizer cannot be "
                              f"exported: {error}; remove gguf from export.formats") from None
