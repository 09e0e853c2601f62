"""Where an export may go, and what `overwrite` may replace.

An export is a folder that carries a marker file (MARKER) naming its project, run, stage,
format and every file the export wrote, and that a run's manifest lists under "exports".
Overwriting replaces only such a folder of this project, and only while it holds nothing but
those files (something put into it since, a project say, is never deleted with it).
Whatever asks, an export never lands on the project itself, an ancestor of it, an allowed
root, or one of the project's own folders (its config, data, runs, models, code, tests, git,
emissions, logs), and nothing is touched before every check has passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from trainer import guard
from trainer.config import FineTuningConfig
from trainer.errors import ProjectError
from trainer.files import write_json

MARKER = ".olmo-export.json"
# the project's own folders, besides those the config names
OWN_FOLDERS = ("config", "data", "runs", "models", "trainer", "scripts", "tests", ".git", "emissions", "logs",
               ".venv", "mlruns", "wandb", "upload_staging", "includes", ".tmp")  # .tmp: scratch and the server's jobs


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


def marker_of(config: FineTuningConfig, target: Path) -> Optional[dict[str, Any]]:
    """The folder's marker, if it is a regular file naming this project and the export's files."""
    path = target / MARKER
    if path.is_symlink() or not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("project_root") != str(config.root.resolve()):
        return None
    return marker if isinstance(marker.get("files"), list) else None


def listing(folder: Path) -> list[str]:
    """Every entry below `folder` but the marker: files by relative path, links and other
    non-folders as they are (they are never an export's own), folders only when empty."""
    entries = []
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if name == MARKER:
            continue
        if path.is_symlink() or not path.is_dir():
            entries.append(name if path.is_file() and not path.is_symlink() else f"{name} (not a regular file)")
        elif not any(path.iterdir()):
            entries.append(f"{name}/")
    return entries


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
    marker = marker_of(config, target)
    if marker is None or not recorded(config, target):
        _refuse(target, f"overwrite replaces only an earlier export of this project (a folder with its {MARKER} "
                        "that a run's manifest lists), and this is not one")
    extra = sorted(set(listing(target)) - set(marker["files"]))
    if extra:
        _refuse(target, f"it holds {len(extra)} entr{'y' if len(extra) == 1 else 'ies'} the export did not write "
                        f"({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}); move them out first")
    return target


def mark(folder: Path, config: FineTuningConfig, facts: dict[str, Any]) -> None:
    """Write the marker (once every file of the export is in `folder`) that lets a later
    export with overwrite replace this folder."""
    write_json(folder / MARKER, {"project_root": str(config.root.resolve()), **facts, "files": listing(folder)})
