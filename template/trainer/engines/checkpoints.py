"""Checkpoints of a stage: written whole or not at all, found by their own index of hashes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from trainer.files import TEMP_PREFIX, read_json, sha256_file, write_json

CHECKPOINT_PREFIX = "iter-"
KEEP_CHECKPOINTS = 2


def checkpoint_dirs(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. A checkpoint is complete when its
    checkpoint.json exists and every file it lists has the recorded hash; anything else
    (a directory a killed writer left, a truncated file) is ignored."""
    found = []
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        if not path.name.startswith(CHECKPOINT_PREFIX) or not path.is_dir():
            continue
        try:
            index = read_json(path / "checkpoint.json")
            if all(sha256_file(path / name) == digest for name, digest in index["files"].items()):
                found.append((int(index["iteration"]), path))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(found)


def prune_incomplete(folder: Path) -> list[Path]:
    """Remove checkpoint directories that are not complete (see checkpoint_dirs)."""
    complete = {path for _, path in checkpoint_dirs(folder)}
    removed = []
    for path in sorted(folder.glob(f"{CHECKPOINT_PREFIX}*")) if folder.is_dir() else []:
        if path.is_dir() and path not in complete:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def save_checkpoint(backend: Any, folder: Path, iteration: int, extra: dict[str, Any]) -> Path:
    """Write into a temp directory, list every file with its hash last, then rename:
    a checkpoint directory either is complete or does not exist."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{CHECKPOINT_PREFIX}{iteration:07d}"
    tmp = folder / f"{TEMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    backend.save_weights(tmp / backend.weights_dir)
    backend.save_state(tmp)
    write_json(tmp / "state.json", {"iteration": iteration, **extra})
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json(tmp / "checkpoint.json", {"iteration": iteration, "files": files})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in checkpoint_dirs(folder)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final
