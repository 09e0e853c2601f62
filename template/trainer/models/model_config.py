"""A model folder's config.json as each engine needs it. transformers 5 saves RoPE settings
under `rope_parameters` (no top-level `rope_theta`); mlx-lm reads the top-level fields and
silently falls back to its defaults (base 10,000), so a model with another base loads, runs
and is wrong. Every place where a model folder meets mlx passes these overrides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _config(folder: Path | str) -> dict[str, Any]:
    try:
        data = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def mlx_overrides(folder: Path | str) -> dict[str, Any]:
    """Top-level config fields for mlx-lm (`mlx_lm.load(..., model_config=...)`) that the
    folder keeps only inside `rope_parameters`; empty when nothing moved."""
    config = _config(folder)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]  # per-layer-type parameters: the global layers' ones
    if not isinstance(rope, dict):
        return {}
    found: dict[str, Any] = {}
    if config.get("rope_theta") is None and rope.get("rope_theta") is not None:
        found["rope_theta"] = rope["rope_theta"]
    kind = rope.get("rope_type") or rope.get("type")
    if config.get("rope_scaling") is None and kind not in (None, "default"):
        found["rope_scaling"] = {"type": kind, **{k: v for k, v in rope.items() if k != "rope_theta"}}
    if config.get("partial_rotary_factor") is None and rope.get("partial_rotary_factor") is not None:
        found["partial_rotary_factor"] = rope["partial_rotary_factor"]
    return found


def write_mlx_fields(folder: Path | str) -> dict[str, Any]:
    """Write those fields at the top of the folder's config.json too (an export a user loads with
    plain mlx-lm then gets the model's real RoPE); transformers reads such a file the same way."""
    found = mlx_overrides(folder)
    if found:
        path = Path(folder) / "config.json"
        config = _config(folder)
        config.update(found)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return found
