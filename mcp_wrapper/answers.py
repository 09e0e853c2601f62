"""The spec's nested input of generate_fine_tuning_project, mapped onto copier answers.

The input models are built from copier.yml itself: each field's type, allowed values and
description come from its question, and no field has a default of its own (None means
"let copier's default apply"), so defaults, choices and help live once, in copier.yml.
SECTIONS is the only thing written here: which spec field is which question.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, ConfigDict, Field, create_model

# spec section -> {field: copier question, or {field: question} for a group inside it}
STAGE = {"iterations": "{s}_iterations", "learning_rate": "{s}_learning_rate", "batch_size": "{s}_batch_size",
         "warmup_steps": "{s}_warmup_steps", "method": "{s}_method", "beta": "{s}_beta"}
SECTIONS: dict[str, dict[str, Any]] = {
    "base_model": {"type": "model_type", "model_id": "model_id", "local_path": "model_local_path",
                   "quantization": "quantization"},
    "training": {
        "num_stages": "num_stages", "backend": "backend",
        # the two stages take the same keys (stage 2 adds replay), as in the config file
        "stage1": {k: q.format(s="stage1") for k, q in STAGE.items()},
        "stage2": {**{k: q.format(s="stage2") for k, q in STAGE.items()}, "replay_ratio": "replay_ratio"},
        # weighting's switch, multiplier and threshold together
        "quality_weighting": {"enabled": "enable_quality_weighting", "multiplier": "quality_weight_multiplier",
                              "threshold": "quality_threshold"},
        "gradient_accumulation_steps": "gradient_accumulation_steps", "save_steps": "save_steps",
        "eval_steps": "eval_steps", "max_seq_length": "max_seq_length",
        "gradient_checkpointing": "gradient_checkpointing", "seed": "seed", "fine_tune": "fine_tune",
    },
    "lora": {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
             "target_modules": "lora_target_modules", "num_layers": "lora_num_layers", "use_dora": "lora_use_dora"},
    "dataset": {"format": "dataset_format", "instruction_field": "instruction_field", "input_field": "input_field",
                "system_field": "system_field", "output_field": "output_field", "quality_field": "quality_field",
                "metadata_field": "metadata_field", "train_split": "train_split",
                "validation_split": "validation_split", "test_split": "test_split"},
    "features": {name: name for name in (
        "enable_mlx_optimization", "enable_carbontracking", "enable_mlflow", "enable_wandb",
        "enable_huggingface_upload", "enable_evaluation")},
    "export": {"formats": "export_formats"},
    # the one place for CodeCarbon's project name
    "carbon_config": {"project_name": "carbon_project_name", "country_iso_code": "carbon_country_iso_code",
                      "offline_mode": "carbon_offline_mode"},
    "integrations": {"mlflow_tracking_uri": "mlflow_tracking_uri", "wandb_project": "wandb_project",
                     "hf_repo_prefix": "hf_repo_prefix", "hf_private_repos": "hf_private_repos"},
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


GROUPS = {"stage1": "stage 1 (general training): iterations, learning_rate, batch_size, warmup_steps, "
                    "method (sft, dpo, orpo) and beta",
          "stage2": "stage 2 (domain specialisation, with num_stages 2): the same keys as stage1, plus replay_ratio",
          "quality_weighting": "quality-weighted sampling: enabled, multiplier, threshold"}


def leaves(fields: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, value) of every non-mapping value, groups included: a section's copier
    questions (SECTIONS) or the values a client gave for it."""
    for name, value in fields.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _model(title: str, fields: dict[str, Any], specs: dict[str, dict[str, Any]]) -> type[BaseModel]:
    members: dict[str, Any] = {}
    for name, value in fields.items():
        if isinstance(value, dict):
            group = _model(title + "".join(p.title() for p in name.split("_")), value, specs)
            members[name] = (Optional[group], Field(default=None, description=GROUPS.get(name, name)))
        else:
            members[name] = (_annotation(specs[value]), Field(default=None, description=_description(specs[value],
                                                                                                     value)))
    return create_model(title + "Input", __config__=ConfigDict(extra="forbid"), **members)


def input_models(template: Path) -> dict[str, type[BaseModel]]:
    """One pydantic model per spec section (groups nested); unknown fields are rejected."""
    specs = questions(template)
    return {section: _model("".join(part.title() for part in section.split("_")), fields, specs)
            for section, fields in SECTIONS.items()}


def _given(value: Any) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    return {k: _given(v) if isinstance(v, BaseModel) else v for k, v in dict(value).items() if v is not None}


def to_answers(top: dict[str, Any], sections: dict[str, BaseModel | dict | None]) -> dict[str, Any]:
    """Copier answers for the values that were given (None = copier's default)."""
    answers = {TOP_LEVEL[k]: v for k, v in top.items() if v is not None}
    for section, value in sections.items():
        if value is None:
            continue
        questions_of = dict(leaves(SECTIONS[section]))
        for name, item in leaves(_given(value)):
            if name not in questions_of:
                raise ToolError(f"{section}.{name} is not a field of {section}")
            answers[questions_of[name]] = item
    return answers


def field_of(question: str) -> str:
    """The tool field that answers a copier question (for error messages)."""
    for section, fields in SECTIONS.items():
        for name, q in leaves(fields):
            if q == question:
                return f"{section}.{name}"
    return next((k for k, q in TOP_LEVEL.items() if q == question), question)
