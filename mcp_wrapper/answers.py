"""The spec's nested input of generate_fine_tuning_project, mapped onto copier answers.

The input models are built from copier.yml itself: each field's type, allowed values and
description come from its question, and no field has a default of its own (None means
"let copier's default apply"), so defaults, choices and help live once, in copier.yml.
SECTIONS is the only thing written here: which spec field is which question.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, ConfigDict, Field, create_model

# spec section -> {spec field: copier question}
SECTIONS: dict[str, dict[str, str]] = {
    "base_model": {"type": "model_type", "model_id": "model_id", "local_path": "model_local_path",
                   "quantization": "quantization"},
    "training": {
        "num_stages": "num_stages", "backend": "backend", "stage1_iterations": "stage1_iterations",
        "learning_rate": "stage1_learning_rate", "batch_size": "stage1_batch_size",
        "warmup_steps": "stage1_warmup_steps", "stage2_iterations": "stage2_iterations",
        "stage2_learning_rate": "stage2_learning_rate", "stage2_batch_size": "stage2_batch_size",
        "stage2_warmup_steps": "stage2_warmup_steps", "replay_ratio": "replay_ratio",
        "quality_weight_multiplier": "quality_weight_multiplier", "quality_threshold": "quality_threshold",
        "gradient_accumulation_steps": "gradient_accumulation_steps", "save_steps": "save_steps",
        "eval_steps": "eval_steps", "max_seq_length": "max_seq_length",
        "gradient_checkpointing": "gradient_checkpointing", "seed": "seed",
    },
    "lora": {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
             "target_modules": "lora_target_modules", "num_layers": "lora_num_layers"},
    "dataset": {"format": "dataset_format", "instruction_field": "instruction_field", "input_field": "input_field",
                "system_field": "system_field", "output_field": "output_field", "quality_field": "quality_field",
                "metadata_field": "metadata_field", "train_split": "train_split",
                "validation_split": "validation_split", "test_split": "test_split"},
    "features": {name: name for name in (
        "enable_mlx_optimization", "enable_quality_weighting", "enable_carbontracking", "enable_mlflow",
        "enable_wandb", "enable_huggingface_upload", "enable_evaluation")},
    "export": {"formats": "export_formats"},
    "carbon_config": {"project_name": "carbon_project_name", "country_iso_code": "carbon_country_iso_code",
                      "offline_mode": "carbon_offline_mode"},
    "integrations": {"mlflow_tracking_uri": "mlflow_tracking_uri", "wandb_project": "wandb_project",
                     "hf_repo_prefix": "hf_repo_prefix", "hf_private_repos": "hf_private_repos",
                     # the spec's name for carbon_config.project_name
                     "codecarbon_project_name": "carbon_project_name"},
}
# top-level tool parameters that are questions too
TOP_LEVEL = {"project_name": "project_name", "description": "project_description", "version": "project_version"}
TYPES = {"str": str, "int": int, "float": float, "bool": bool, "yaml": list[str]}


def questions(template: Path) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load((template / "copier.yml").read_text(encoding="utf-8"))
    return {name: spec for name, spec in data.items() if not name.startswith("_")}


def _annotation(spec: dict[str, Any]) -> Any:
    choices = spec.get("choices")
    if choices:
        values = tuple(choices.values()) if isinstance(choices, dict) else tuple(choices)
        return Optional[Literal[values]]  # type: ignore[valid-type]
    return Optional[TYPES[spec["type"]]]


def _description(spec: dict[str, Any], question: str) -> str:
    text = " ".join(str(spec.get("help", "")).split())
    default = spec.get("default")
    shown = default if not isinstance(default, str) or "{{" not in default else "derived from other answers"
    return f"{text} (copier question '{question}'; default: {shown})"


def input_models(template: Path) -> dict[str, type[BaseModel]]:
    """One pydantic model per spec section; unknown fields are rejected."""
    specs = questions(template)
    models = {}
    for section, fields in SECTIONS.items():
        members = {name: (_annotation(specs[q]), Field(default=None, description=_description(specs[q], q)))
                   for name, q in fields.items()}
        title = "".join(part.title() for part in section.split("_")) + "Input"
        models[section] = create_model(title, __config__=ConfigDict(extra="forbid"), **members)
    return models


def to_answers(top: dict[str, Any], sections: dict[str, BaseModel | dict | None]) -> dict[str, Any]:
    """Copier answers for the values that were given (None = copier's default)."""
    answers = {TOP_LEVEL[k]: v for k, v in top.items() if v is not None}
    for section, value in sections.items():
        if value is None:
            continue
        given = value.model_dump(exclude_none=True) if isinstance(value, BaseModel) else dict(value)
        for name, item in given.items():
            question = SECTIONS[section][name]
            if question in answers and answers[question] != item:
                raise ToolError(f"{section}.{name} and another field both set copier question '{question}' "
                                f"to different values ({answers[question]!r} vs {item!r})")
            answers[question] = item
    return answers


def field_of(question: str) -> str:
    """The tool field that answers a copier question (for error messages)."""
    for section, fields in SECTIONS.items():
        for name, q in fields.items():
            if q == question:
                return f"{section}.{name}"
    return next((k for k, q in TOP_LEVEL.items() if q == question), question)
