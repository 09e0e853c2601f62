"""Where an export may go, and what `overwrite` may replace.

An export is a folder that carries a marker file (MARKER) naming its project, run, stage and
format, and that a run's manifest lists under "exports". Overwriting replaces only such a
folder of this project. Whatever asks, an export never lands on the project itself, an
ancestor of it, an allowed root, or one of the project's own folders (its config, data,
runs, models, code, tests, git, emissions, logs), and nothing is touched before every
check has passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer import guard
from trainer.config import FineTuningConfig
from trainer.errors import ProjectError
from trainer.files import write_json

MARKER = ".olmo-export.json"
# the project's own folders, besides those the config names
OWN_FOLDERS = ("config", "data", "runs", "models", "trainer", "scripts", "tests", ".git", "emissions", "logs",
               ".venv", "mlruns", "wandb", "upload_staging", "includes")


class ExportTargetError(ProjectError):
    kind = "export_refused"


def _own_folders(config: FineTuningConfig) -> list[Path]:
    named = [config.resolve(p) for p in (config.dataset.processed_dir, config.dataset.reports_dir,
                                         config.paths.runs_dir, config.paths.logs_dir,
                                         config.carbon_tracking.output_dir, config.huggingface.upload_staging_dir)]
    if config.base_model.local_path is not None:
        named.append(config.resolve(config.base_model.local_path))
    return [p.resolve() for p in (*(config.root / name for name in OWN_FOLDERS), *named)]


def _refuse(target: Path, why: str) -> None:
    raise ExportTargetError(f"export path {target} is refused: {why}; choose a new folder under "
                            "exports/ (or leave export_path out for the default)", details={"export_path": str(target)})


def recorded(config: FineTuningConfig, target: Path) -> bool:
    """Whether a run of this project lists `target` among its exports."""
    runs = config.resolve(config.paths.runs_dir)
    for manifest in runs.glob("*/run-manifest.json"):
        try:
            exports = json.loads(manifest.read_text(encoding="utf-8")).get("exports") or []
        except (OSError, ValueError):
            continue
        if any(isinstance(e, dict) and e.get("export_path") == str(target) for e in exports):
            return True
    return False


def marked(config: FineTuningConfig, target: Path) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("project_root") == str(config.root.resolve())


def check(config: FineTuningConfig, target: Path, overwrite: bool) -> Path:
    """`target` resolved, once it is a place this export may be written to (or replace)."""
    target = guard.check_path(target, "export_path")
    root = config.root.resolve()
    if root.is_relative_to(target):
        _refuse(target, "it is the project folder or one of its parents")
    for folder in guard.roots() or []:
        if folder.is_relative_to(target):
            _refuse(target, "it is an allowed root or one of its parents")
    for folder in _own_folders(config):
        if target.is_relative_to(folder) or folder.is_relative_to(target):
            _refuse(target, f"it is, holds or lies inside the project's own folder {folder}")
    guard.check_path(target.parent, "the folder beside the export (built there, then moved)")
    if not target.exists() and not target.is_symlink():
        return target
    if not overwrite:
        raise ExportTargetError(f"export path {target} already exists; pass overwrite to replace it",
                                details={"export_path": str(target)})
    if not target.is_dir():
        _refuse(target, "it is a file, and exports are folders")
    if not marked(config, target) or not recorded(config, target):
        _refuse(target, f"overwrite replaces only an earlier export of this project (a folder with its {MARKER} "
                        "that a run's manifest lists), and this is not one")
    return target


def mark(folder: Path, config: FineTuningConfig, facts: dict[str, Any]) -> None:
    """Write the marker that lets a later export with overwrite replace this folder."""
    write_json(folder / MARKER, {"project_root": str(config.root.resolve()), **facts})
