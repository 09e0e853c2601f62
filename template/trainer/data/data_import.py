"""Bring raw data files into the project: data/raw/ for stage 1, data/raw/stage2/ for stage 2.

Every file is validated first, exactly as preparation reads it (same precise errors, same
report); nothing is copied unless all of them pass. The copies are made beside their
targets and renamed into place only once all are complete, so a full disk or a refused
file leaves the project as it was. Only then are the template's sample files removed,
when asked: they are the only files this ever deletes.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path
from typing import Any

from trainer import guard
from trainer.config import FineTuningConfig
from trainer.data.dataset_preparator import FORMATS, DatasetError, plan
from trainer.errors import ProjectError
from trainer.files import TEMP_PREFIX

# what the template puts in data/raw/ (stage 1) and data/raw/stage2/ (stage 2)
SAMPLES = {1: ("sample_dataset.jsonl", "sample_dataset.csv"), 2: ("sample_domain.jsonl", "sample_domain.csv")}


def folder_of(config: FineTuningConfig, stage: int) -> Path:
    return config.root / "data" / "raw" / ("stage2" if stage == 2 else "")


def _sources(files: list[str | Path]) -> list[Path]:
    if not files:
        raise ProjectError("no files to import; name at least one data file")
    sources: list[Path] = []
    for given in files:
        path = guard.check_path(given, f"the data file {given}")
        if not path.is_file():
            raise ProjectError(f"the data file {given} does not exist or is not a file")
        if path.suffix.lower() not in FORMATS:
            raise ProjectError(f"the data file {given} has the extension {path.suffix or '(none)'!r}; the project "
                               f"reads {', '.join(sorted(FORMATS))}")
        if path in sources:
            raise ProjectError(f"the data file {given} is named twice")
        sources.append(path)
    names = [p.name for p in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ProjectError(f"several files are named {', '.join(twice)}; rename one so each keeps its own copy")
    return sources


def import_files(config: FineTuningConfig, files: list[str | Path], *, stage: int = 1, replace_samples: bool = False,
                 overwrite: bool = False, skip_invalid: bool = False) -> dict[str, Any]:
    """Validate `files`, copy them into the stage's raw folder, then (optionally) drop the samples."""
    if stage == 2 and config.training.num_stages != 2:
        raise ProjectError("stage 2: this project trains one stage (training.num_stages is 1)")
    sources = _sources(files)
    target = guard.check_path(folder_of(config, stage), "the raw data folder")
    try:
        checked = plan(config, sources, stage=stage, skip_invalid=skip_invalid)
    except DatasetError as error:  # preparation's own message, said of the import
        raise DatasetError(f"nothing was imported: {error}", details=error.details) from None
    moves: list[tuple[Path, Path]] = []
    for source in sources:
        destination = target / source.name
        if destination.resolve() == source:
            continue  # already in place
        if destination.is_symlink() or (destination.exists() and not destination.is_file()):
            raise ProjectError(f"{destination.relative_to(config.root)} exists and is not a plain file; "
                               "nothing was imported")
        if destination.exists() and not overwrite:
            raise ProjectError(f"{destination.relative_to(config.root)} already exists; nothing was imported "
                               "(allow overwrite to replace it)")
        moves.append((source, destination))
    target.mkdir(parents=True, exist_ok=True)
    staged: list[tuple[Path, Path]] = []
    try:
        for source, destination in moves:
            tmp = target / f"{TEMP_PREFIX}import-{os.getpid()}-{destination.name}"
            tmp.unlink(missing_ok=True)
            staged.append((tmp, destination))
            shutil.copyfile(source, tmp)
    except OSError as error:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise ProjectError(f"copying into {target} failed ({error.strerror or error}); nothing was imported") from None
    for tmp, destination in staged:
        os.replace(tmp, destination)
    removed = []
    if replace_samples:
        imported = {d for _, d in moves} | {target / s.name for s in sources}
        for name in SAMPLES[stage]:
            sample = target / name
            if sample.is_file() and not sample.is_symlink() and sample not in imported:
                sample.unlink()
                removed.append(str(sample.relative_to(config.root)))
    patterns = config.dataset.raw_files if stage == 1 else config.dataset.stage2_raw_files
    unmatched = [str((target / s.name).relative_to(config.root)) for s in sources
                 if not any(fnmatch.fnmatch(str(target / s.name), str(config.resolve(p))) for p in patterns)]
    summary = checked.summary
    return {
        "stage": stage,
        "imported": [{"source": str(s), "path": str((target / s.name).relative_to(config.root))} for s in sources],
        "removed_samples": removed,
        "validation": {"counts": summary["counts"], "rejected": summary["rejected"],
                       "length_unit": summary["length_unit"]},
        "unmatched": unmatched,  # files the stage's raw_files patterns do not pick up
    }
