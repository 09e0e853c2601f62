"""The engine work of an export: merging an adapter into the base model with transformers +
peft (a Hugging Face model directory), and fusing it with mlx-lm (an MLX model directory,
optionally quantized). Either engine takes an adapter trained by either backend: it is
converted first (trainer.models.adapters), so the merged weights are the same update.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from trainer.errors import ProjectError
from trainer.models import adapters
from trainer.models.model_config import mlx_overrides, write_mlx_fields

MLX_BITS = {"q4": 4, "q8": 8}


class ExportError(ProjectError):
    kind = "export_error"


def _needs(extra: str, error: ImportError) -> ExportError:
    return ExportError(f"this export needs the '{extra}' extra ({error.name} is missing): "
                       f"pip install -e '.[{extra}]'")


def base_layers(source: str) -> int:
    """The base model's number of transformer blocks (from its config)."""
    path = Path(source) / "config.json"
    if path.is_file():
        return int(json.loads(path.read_text(encoding="utf-8"))["num_hidden_layers"])
    try:
        from transformers import AutoConfig
    except ImportError as error:
        raise _needs("transformers", error) from error
    return int(AutoConfig.from_pretrained(source).num_hidden_layers)


def model_type(source: str) -> str:
    path = Path(source) / "config.json"
    if path.is_file():
        return str(json.loads(path.read_text(encoding="utf-8")).get("model_type", "?"))
    from transformers import AutoConfig

    return str(AutoConfig.from_pretrained(source).model_type)


def adapter_as(adapter: Path, engine: str, source: str, scratch: Path) -> Path:
    """The adapter folder in `engine`'s format ('peft' or 'mlx'): itself, or a converted copy in `scratch`."""
    if adapters.detect(adapter) == engine:
        return adapter
    target = scratch / f"adapter-{engine}"
    adapters.convert(adapter, target, engine, source, base_layers(source))
    return target


def adapter_into(adapter: Path, engine: str, source: str, target: Path) -> None:
    """Write the adapter to `target` in `engine`'s format: copied as it is, or converted there."""
    if adapters.detect(adapter) == engine:
        shutil.copytree(adapter, target, dirs_exist_ok=True)
    else:
        adapters.convert(adapter, target, engine, source, base_layers(source))


def merge_hf(source: str, adapter: Optional[Path], output: Path, generation: dict[str, Any]) -> dict[str, Any]:
    """Base model + adapter merged with peft (no adapter: the model as it is), saved with
    tokenizer and generation config."""
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise _needs("transformers", error) from error
    model = AutoModelForCausalLM.from_pretrained(source, dtype="auto")
    if adapter is not None:
        with tempfile.TemporaryDirectory(prefix=".tmp-adapter-", dir=output.parent) as scratch:
            peft_dir = adapter_as(adapter, "peft", source, Path(scratch))
            model = PeftModel.from_pretrained(model, str(peft_dir)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(source)
    settings = model.generation_config
    temperature = float(generation.get("temperature", 0.0))
    settings.do_sample = temperature > 0
    settings.temperature = temperature if temperature > 0 else None
    settings.top_p = float(generation.get("top_p", 1.0)) if temperature > 0 else None
    settings.max_new_tokens = int(generation.get("max_tokens", 256))
    if tokenizer.eos_token_id is not None:
        settings.eos_token_id = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None:
        settings.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))
    write_mlx_fields(output)  # so plain mlx-lm loads the merged model with its real RoPE
    return {"engine": "transformers+peft", "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in model.parameters())}


def fuse_mlx(source: str, adapter: Optional[Path], output: Path, quantization: str) -> dict[str, Any]:
    """Base model + adapter fused with mlx-lm (as `mlx_lm.fuse`; no adapter: the model as it is),
    optionally quantized (as `mlx_lm.convert`)."""
    try:
        from mlx.utils import tree_unflatten
        from mlx_lm.utils import load, quantize_model, save_config, save_model
    except ImportError as error:
        raise _needs("mlx", error) from error
    with tempfile.TemporaryDirectory(prefix=".tmp-adapter-", dir=output.parent) as scratch:
        mlx_dir = None if adapter is None else str(adapter_as(adapter, "mlx", source, Path(scratch)))
        model, tokenizer, config = load(source, adapter_path=mlx_dir, return_config=True,
                                        model_config=mlx_overrides(source))  # the real RoPE, saved too
    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    facts: dict[str, Any] = {"engine": "mlx-lm", "fused_layers": len(fused), "quantization": quantization}
    if quantization in MLX_BITS:
        if "quantization" in config:
            raise ExportError(f"the base model {source} is already quantized; export mlx with quantization none")
        model, config = quantize_model(model, config, group_size=64, bits=MLX_BITS[quantization])
    elif quantization != "none":
        raise ExportError(f"mlx quantization '{quantization}' is not supported; use none, q4 or q8")
    # mlx_lm.utils.save without its model card step, which would fetch the base's card from the Hub
    output.mkdir(parents=True, exist_ok=True)
    save_model(output, model, donate_model=False)
    save_config(config, config_path=output / "config.json")
    tokenizer.save_pretrained(str(output))
    generation = Path(source) / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, output / "generation_config.json")
    return facts
