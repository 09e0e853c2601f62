"""Give the project its base model without a shell: build the tiny smoke-test model, or bring
a local Hugging Face model folder or a GGUF file into models/, then point base_model.local_path
at it in config/fine_tuning_config.yaml (that one line changes; comments stay)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from trainer import guard
from trainer.config import DEFAULT_CONFIG, FineTuningConfig
from trainer.config_file import set_value
from trainer.data.dataset_preparator import DatasetError, collect, find_inputs
from trainer.errors import ProjectError
from trainer.files import TEMP_PREFIX
from trainer.models import checks, tiny_model
from trainer.models.model_config import write_mlx_fields

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def corpus(config: FineTuningConfig) -> list[str]:
    """The project's own raw texts, so a tiny tokenizer fits its data (empty if none is readable)."""
    try:
        examples = collect(config, find_inputs(config.dataset, config.root)).examples
    except DatasetError:
        return []
    return [m["content"] for e in examples for m in e.messages]


def _relative(config: FineTuningConfig, path: Path) -> str:
    try:
        return str(path.relative_to(config.root))
    except ValueError:
        return str(path)


def _point(config: FineTuningConfig, path: Path, config_file: Optional[Path]) -> str:
    value = _relative(config, path)
    set_value(config_file or DEFAULT_CONFIG, "base_model.local_path", value)
    return value


def build_tiny(config: FineTuningConfig, architecture: Optional[str] = None, seed: int = 0,
               config_file: Optional[Path] = None) -> dict[str, Any]:
    architecture = architecture or config.base_model.architecture
    output = guard.check_path(config.root / "models" / f"tiny-{architecture}", "the tiny model's folder")
    if output.is_symlink() or (output.exists() and not _tiny_of_ours(output)):
        raise ProjectError(f"{output} already exists and is not a tiny model this project built (no tiny_model.json, "
                           "or a link inside); an existing models/<name> is never replaced: move it away first")
    staged = _staged(output)  # built beside, then moved in: nothing is written into the existing folder
    try:
        summary = tiny_model.build(architecture, staged, corpus(config), seed=seed)
        summary["path"] = str(output)
        (staged / "tiny_model.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if output.exists():
            shutil.rmtree(output)  # the tiny model an earlier call built
        os.replace(staged, output)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return {"kind": "tiny", "architecture": architecture, "local_path": _point(config, output, config_file),
            "path": str(output), "parameters": summary["parameters"], "verified": summary.get("verified")}


def _tiny_of_ours(folder: Path) -> bool:
    """A folder build_tiny made: its summary file, and no link anywhere in it."""
    return (folder.is_dir() and (folder / "tiny_model.json").is_file()
            and not any(path.is_symlink() for path in folder.rglob("*")))


def _model_type(folder: Path) -> str:
    try:
        value = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        value = None
    if not isinstance(value, str):
        raise ProjectError(f"{folder} is not a Hugging Face model folder (its config.json is missing, unreadable or "
                           "names no model_type)")
    return value


def _dtype(folder: Path) -> str:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return str(config.get("dtype") or config.get("torch_dtype") or "float32")
    except (OSError, ValueError, AttributeError):
        return "float32"


def _staged(target: Path) -> Path:
    tmp = target.parent / f"{TEMP_PREFIX}{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _convert_gguf(source: Path, tmp: Path) -> None:
    """transformers reads the GGUF (weights dequantized, tokenizer and chat template kept)."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as error:
        raise ProjectError(f"reading a GGUF file needs transformers and gguf ({error.name} is missing); "
                           "pip install -e '.[transformers,gguf]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    except Exception as error:  # an unsupported architecture or a damaged file: say which file
        raise ProjectError(f"transformers could not read the GGUF file {source}: {type(error).__name__}: "
                           f"{str(error)[:300]}") from None
    # the weights are dequantized on load; what is left of the GGUF quantizer only blocks saving
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def bring(config: FineTuningConfig, source: Path | str, name: Optional[str] = None,
          config_file: Optional[Path] = None) -> dict[str, Any]:
    """Use a model folder (copied into models/ unless it already lies in the project) or a GGUF
    file (converted into a Hugging Face folder in models/) as the base model. An existing
    models/<name> is never replaced: it may be the user's."""
    path = guard.check_path(source, f"the model source {source}")
    models = guard.check_path(config.root / "models", "the models folder")
    if path.is_dir():
        guard.check_tree(path, f"the model source {source}")  # a link inside may not lead out of the roots
        model_type = _model_type(path)
        if path.is_relative_to(config.root):
            verified = _verify(path, source)
            return {"kind": "directory", "model_type": model_type, "copied": False,
                    "local_path": _point(config, path, config_file), "path": str(path), "verified": verified}
        kind = "directory"
    elif path.is_file() and path.suffix.lower() == ".gguf":
        kind = "gguf"
    else:
        raise ProjectError(f"the model source {source} is neither a model folder (with config.json) nor a .gguf file")
    target = models / (name or (path.name if kind == "directory" else path.stem))
    if not NAME.fullmatch(target.name):
        raise ProjectError(f"model name {target.name!r}: use letters, digits, '.', '_' and '-'")
    if target.is_symlink() or target.exists():
        raise ProjectError(f"{_relative(config, target)} already exists; nothing was changed (give another name)")
    models.mkdir(exist_ok=True)
    tmp = _staged(target)
    try:
        if kind == "directory":
            shutil.copytree(path, tmp)
        else:
            _convert_gguf(path, tmp)
        model_type = _model_type(tmp)
        write_mlx_fields(tmp)  # our copy: plain mlx-lm then loads it with its real RoPE too
        verified = _verify(tmp, source)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    return {"kind": kind, "model_type": model_type, "copied": True, "source": str(path),
            "local_path": _point(config, target, config_file), "path": str(target), "size_mb": round(size / 1e6, 2),
            "verified": verified}


def _verify(folder: Path, source: Path | str) -> dict[str, Any]:
    """Both engines load the model and agree on its logits (mlx with the model's real RoPE);
    a model that fails this is not set as the base."""
    try:
        half = _dtype(folder) in ("float16", "bfloat16")
        return checks.check(folder, relative=5e-2 if half else 1e-3)
    except tiny_model.TinyModelError as error:
        raise ProjectError(f"the model from {source} does not load the same in both engines: {error}; "
                           "nothing was changed") from None
    except Exception as error:  # an architecture an engine cannot load: say which and why
        raise ProjectError(f"the model from {source} cannot be loaded: {type(error).__name__}: "
                           f"{str(error)[:300]}; nothing was changed") from None
