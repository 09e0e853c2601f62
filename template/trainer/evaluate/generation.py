"""Talk to a trained model: the base model plus a run's adapter (or the whole model a full
fine-tune trained), or an exported model, loaded with either engine (mlx, falling back to
transformers, or the one asked for), answering one prompt or a conversation through the
model's chat template.

The adapter is used in the format of the engine that loads it: a run trained with the other
engine has its adapter converted first (trainer.models.adapters, exact up to float rounding).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from trainer import guard
from trainer.config import FineTuningConfig
from trainer.engines.backends import engines
from trainer.engines.base_trainer import Backend
from trainer.errors import ProjectError, advice
from trainer.evaluate.evaluation import load_inference
from trainer.models.merge import adapter_as
from trainer.runs.training_run_manager import RunError, RunManager, stage_output

MAX_TOKENS_LIMIT = 4096


class GenerationError(ProjectError):
    kind = "generation_error"


@dataclass
class Model:
    """A loaded model and what it is."""

    backend: Backend
    description: dict[str, Any]
    scratch: Optional[tempfile.TemporaryDirectory] = field(default=None, repr=False)


def pick_backend(requested: Optional[str], trained_with: Optional[str]) -> str:
    """The engine to load with: the one asked for, else the one that trained, else mlx, then transformers."""
    has = engines()
    if requested:
        if not has.get(requested):
            raise GenerationError(f"backend {requested} is not installed: pip install -e '.[{requested}]'")
        return requested
    for name in (trained_with, "mlx", "transformers"):
        if name and has.get(name):
            return name
    raise GenerationError("no engine is installed: pip install -e '.[mlx]' or '.[transformers]'")


def _stage(manager: RunManager, run_id: str, stage: Optional[int]) -> tuple[Path, bool, int, str]:
    manifest = manager.manifest(run_id)
    done = [int(k.removeprefix("stage")) for k, s in manifest["stages"].items() if s["status"] == "completed"]
    if stage is None:
        if not done:
            raise RunError(f"run {run_id} has no completed stage yet; train it first")
        stage = max(done)
    elif stage not in done:
        raise RunError(f"stage {stage} of run {run_id} has not completed; completed stages: {sorted(done) or 'none'}")
    output, full = stage_output(manager.run_dir(run_id), manifest, stage)
    return output, full, stage, manifest["backend"]["resolved"]


def load_model(config: FineTuningConfig, run_id: Optional[str] = None, stage: Optional[int] = None,
               export: Optional[Path] = None, backend: Optional[str] = None) -> Model:
    """The base model, with a run stage's adapter, or an exported model (merged, fused or an adapter)."""
    if run_id and export:
        raise GenerationError(advice("give a run (--run-id) or an export (--export), not both",
                                      "give run_id or export_path to generate_text, not both"))
    source, exported, adapter, description = config.model_source(), None, None, {}
    trained_with = None
    if run_id:
        manager = RunManager(config)
        adapter, full, stage, trained_with = _stage(manager, run_id, stage)
        config = manager.run_config(run_id)
        source = config.model_source()
        description = {"run_id": run_id, "stage": stage, "model" if full else "adapter": str(adapter)}
        if full:  # a whole model, loaded as saved
            description["base_model"] = source
            source, exported, adapter = str(adapter), str(adapter), None
    elif export:
        export = guard.check_path(export, "the export folder")
        if not export.is_dir():
            raise GenerationError(f"export not found: {export}")
        if list(export.glob("*.gguf")):
            raise GenerationError(f"{export} is a GGUF export: load it with llama.cpp (e.g. llama-cli -m FILE)")
        for candidate in (export, export / "peft", export / "mlx"):
            if any(candidate.glob("adapter*.safetensors")):  # an adapters export: the adapter on the base
                adapter = candidate
                break
        if adapter is None:
            if not (export / "config.json").is_file():
                raise GenerationError(f"{export} holds neither a model (config.json) nor an adapter")
            source = exported = str(export)
        description = {"export": str(export)}
    name = pick_backend(backend, trained_with)
    scratch = None
    if adapter is not None:
        scratch = tempfile.TemporaryDirectory(prefix="generate-")
        adapter = adapter_as(adapter, "mlx" if name == "mlx" else "peft", source, Path(scratch.name))
    try:
        engine = load_inference(config, name, adapter, config.training.seed, exported)
    except (OSError, ValueError) as error:
        raise GenerationError(f"could not load {source} with {name}: {error}") from error
    return Model(engine, {"backend": name, "base_model": source, **description}, scratch)


def chat_prompt(model: Model, messages: list[dict[str, str]]) -> str:
    return model.backend.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def check_length(model: Model, messages: list[dict[str, str]], limit: int) -> int:
    """The chat prompt's length in tokens, refused above `limit` (the context the run trained for)."""
    count = len(model.backend.prompt_ids(chat_prompt(model, messages)))
    if count > limit:
        raise GenerationError(f"the prompt and system message take {count} tokens with the chat template; at most "
                              f"{limit} are allowed (training.max_seq_length): shorten them",
                              details={"prompt_tokens": count, "limit": limit})
    return count


def check_options(max_tokens: int, temperature: float, top_p: float) -> None:
    if not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise GenerationError(f"max_tokens must be between 1 and {MAX_TOKENS_LIMIT}, got {max_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise GenerationError(f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}")


def reply(model: Model, messages: list[dict[str, str]], max_tokens: int, temperature: float, top_p: float) -> str:
    """The model's next assistant turn after `messages`."""
    check_options(max_tokens, temperature, top_p)
    return model.backend.generate([chat_prompt(model, messages)], max_tokens, temperature, top_p)[0]
