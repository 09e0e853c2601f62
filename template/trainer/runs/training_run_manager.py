"""Training runs on disk: configure, manifest, status, lock.

runs/<run_name>-<timestamp>/
    run-manifest.json     schema 2.0: config snapshot, data hashes, per-stage status and lineage
    status.json           not_started | running | completed | failed | cancelled, pid, progress
    metrics.jsonl         one line per report (written by the trainer)
    config.yaml           the resolved config the run trains with
    train.log             the trainer's log
    stage1/{adapters,checkpoints,training-data,evaluation}/   stage2/...   final-model/ (once completed)
                          (training.fine_tune full: model/, a whole Hugging Face model, instead of adapters/)

Every manifest and status write is atomic; a lock held by the training process (flock,
released by the kernel when the process dies) tells a live run from a dead one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import yaml

from trainer import guard
from trainer.config import FineTuningConfig, load_config
from trainer.data.training_data import DataError, read_records
from trainer.errors import ProjectError, advice
from trainer.files import clean_temporaries, read_json, sha256_file, write_json
from trainer.models.gguf_support import check_planned

SCHEMA_VERSION = "2.0"
STATUSES = ("not_started", "running", "completed", "failed", "cancelled")
SPLIT_FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")


class RunError(ProjectError):
    kind = "run_error"


class RunLocked(RunError):
    kind = "run_locked"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class RunManager:
    def __init__(self, config: FineTuningConfig):
        self.config = config
        self.runs_dir = config.resolve(config.paths.runs_dir)

    # ------------------------------------------------------------- configure

    def default_data(self, stage: int) -> dict[str, Optional[Path]]:
        folder = self.config.resolve(self.config.dataset.processed_dir)
        folder = folder if stage == 1 else folder / "stage2"
        test = folder / SPLIT_FILES["test"]
        return {"train": folder / SPLIT_FILES["train"], "valid": folder / SPLIT_FILES["valid"],
                "test": test if test.is_file() else None}

    def configure(self, name: str, data: Optional[dict[int, dict[str, Optional[Path]]]] = None,
                  overrides: Optional[dict[str, Any]] = None, config_path: Optional[Path] = None) -> dict[str, Any]:
        """Create a run: directories, a config snapshot, copies of its data with hashes, the manifest."""
        if not RUN_NAME.fullmatch(name):
            raise RunError(f"run name '{name}' must start with a letter or digit and use only letters, digits, "
                           ". _ - (at most 81 characters)")
        guard.check_overrides(FineTuningConfig, overrides or {})
        config = load_config(config_path or self.config.source, overrides=overrides, root=self.config.root) if (
            overrides or config_path) else self.config
        guard.check_config(config)
        stages = list(range(1, config.training.num_stages + 1))
        data = dict(data or {})
        for stage in stages:
            given = data.get(stage) or {}
            defaults = self.default_data(stage)
            data[stage] = {split: Path(given[split]) if given.get(split) else defaults[split]
                           for split in SPLIT_FILES}
        unknown = sorted(set(data) - set(stages))
        if unknown:
            raise RunError(f"data given for stage(s) {unknown}, "
                           f"but training.num_stages is {config.training.num_stages}")
        checked = {stage: self._check_data(stage, files) for stage, files in data.items()}
        check_planned(config)

        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        run_id = f"{name}-{stamp}"
        suffix = 2
        while (self.runs_dir / run_id).exists():
            run_id = f"{name}-{stamp}-{suffix}"
            suffix += 1
        run_dir = self.runs_dir / run_id
        full = config.training.fine_tune == "full"
        output = "model" if full else "adapters"  # what a stage trains: a whole model, or an adapter on the base
        for stage in stages:
            for sub in (output, "checkpoints", "training-data", "evaluation"):
                (run_dir / f"stage{stage}" / sub).mkdir(parents=True, exist_ok=True)

        stage_entries = {}
        for stage in stages:
            records = {}
            for split, info in checked[stage].items():
                if info is None:
                    continue
                target = run_dir / f"stage{stage}" / "training-data" / SPLIT_FILES[split]
                shutil.copyfile(info["source"], target)
                records[split] = {**info, "path": str(target.relative_to(run_dir)), "source": str(info["source"])}
            section = config.training.stage(stage)
            stage_entries[f"stage{stage}"] = {
                "stage": stage,
                "status": "pending",
                "iterations": section.iterations,
                "learning_rate": section.learning_rate,
                "batch_size": section.batch_size,
                "method": section.method,
                "data": records,
                "fine_tune": config.training.fine_tune,
                "parent_adapter": "stage1/adapters" if stage == 2 and not full else None,
                "parent_model": "stage1/model" if stage == 2 and full else None,
                "replay": ({"ratio": config.training.stage2.replay_ratio, "source": "stage1/training-data/train.jsonl"}
                           if stage == 2 else None),
                "adapter_path": None if full else f"stage{stage}/adapters",
                "model_path": f"stage{stage}/model" if full else None,
                "checkpoint_dir": f"stage{stage}/checkpoints",
                "metrics": None,
                "started_at": None,
                "completed_at": None,
            }
        snapshot = config.to_yaml_dict()
        (run_dir / "config.yaml").write_text(yaml.safe_dump(snapshot, sort_keys=False), encoding="utf-8")
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "run_id": run_id,
            "run_name": name,
            "created_at": now(),
            "updated_at": now(),
            "project": {"name": config.project.name, "root": str(config.root)},
            "template": self._template_version(),
            "base_model": {"type": config.base_model.type, "model_id": config.base_model.model_id,
                           "source": config.model_source(), "quantization": config.base_model.quantization},
            "backend": {"requested": config.training.backend, "resolved": None, "reason": None},
            "overrides": overrides or {},
            "config": snapshot,
            "stages": stage_entries,
            "lineage": [{"stage": s, "starts_from": "base model" if s == 1 else f"stage1/{output}"} for s in stages],
            "evaluation": None,
            "emissions": None,
            "final_model": None,
        }
        write_json(run_dir / "run-manifest.json", manifest)
        write_json(run_dir / "status.json", {"run_id": run_id, "status": "not_started", "updated_at": now()})
        return {
            "run_id": run_id,
            "run_directory": str(run_dir),
            "manifest_path": str(run_dir / "run-manifest.json"),
            "configuration_summary": {
                "base_model": config.model_source(),
                "num_stages": config.training.num_stages,
                "backend": config.training.backend,
                "stages": {key: {k: entry[k] for k in ("iterations", "learning_rate", "batch_size")}
                           | {"rows": {s: d["rows"] for s, d in entry["data"].items()}}
                           for key, entry in stage_entries.items()},
                "lora": {"rank": config.lora.rank, "alpha": config.lora.alpha, "scale": config.lora.scale,
                         "target_modules": config.lora.target_modules},
                "overrides": overrides or {},
            },
        }

    def _check_data(self, stage: int, files: dict[str, Optional[Path]]) -> dict[str, Optional[dict[str, Any]]]:
        checked: dict[str, Optional[dict[str, Any]]] = {}
        for split, path in files.items():
            if path is None:
                checked[split] = None
                continue
            path = guard.check_path(self.config.resolve(path), f"stage {stage} {split} data")
            if not path.is_file():
                hint = advice(" (run scripts/prepare_dataset.py first)", " (run prepare_dataset first)") \
                    if stage == 1 else advice(
                        " (stage 2 needs its own domain data: prepare it with scripts/prepare_dataset.py "
                        "--output-dir data/processed/stage2, or pass --stage2-train/--stage2-valid)",
                        " (stage 2 needs its own domain data: put it in data/raw/stage2/ and run prepare_dataset, "
                        "or pass training_data.stage2_train_dataset and stage2_validation_dataset)")
                raise RunError(f"stage {stage} {split} data file not found: {path}{hint}",
                               details={"stage": stage, "split": split, "path": str(path)})
            try:
                pairs = split != "test" and self.config.training.stage(stage).method != "sft"
                rows = len(read_records(path, pairs))
            except DataError as error:
                raise RunError(f"stage {stage} {split} data: {error}") from None
            checked[split] = {"source": path, "sha256": sha256_file(path), "rows": rows}
        return checked

    def _template_version(self) -> dict[str, Any]:
        answers = self.config.root / ".copier-answers.yml"
        if not answers.is_file():
            return {}
        data = yaml.safe_load(answers.read_text()) or {}
        return {"commit": data.get("_commit"), "source": data.get("_src_path")}

    # ------------------------------------------------------------- reading

    def run_dir(self, run_id: str) -> Path:
        path = self.runs_dir / run_id
        if not RUN_NAME.fullmatch(run_id) or not (path / "run-manifest.json").is_file():
            known = [r["run_id"] for r in self.list_runs()][-10:]
            raise RunError(f"unknown run id '{run_id}'; known runs: {', '.join(known) or 'none yet'}",
                           details={"run_id": run_id, "known": known})
        guard.check_tree(path, f"the run folder runs/{run_id}")  # symlinks in it would lead writes out
        return path

    def manifest(self, run_id: str) -> dict[str, Any]:
        return read_json(self.run_dir(run_id) / "run-manifest.json")

    def run_config(self, run_id: str) -> FineTuningConfig:
        """The config snapshot the run trains with (environment overrides were applied at configure time)."""
        config = load_config(self.run_dir(run_id) / "config.yaml", environ={}, root=self.config.root)
        guard.check_config(config)
        return config

    def update_manifest(self, run_id: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, change and atomically rewrite the manifest (call while holding the run's lock)."""
        path = self.run_dir(run_id) / "run-manifest.json"
        manifest = read_json(path)
        change(manifest)
        manifest["updated_at"] = now()
        write_json(path, manifest)
        return manifest

    def write_status(self, run_id: str, **fields: Any) -> dict[str, Any]:
        """Update status.json; a status file that cannot be read (garbage, not an object) is
        started afresh, so that resuming a run repairs it."""
        path = self.run_dir(run_id) / "status.json"
        try:
            status = read_json(path) if path.is_file() else {}
        except (OSError, ValueError):
            status = {}
        status = status if isinstance(status, dict) else {}
        status.update(fields, run_id=run_id, updated_at=now())
        write_json(path, status)
        return status

    def status(self, run_id: str) -> dict[str, Any]:
        """The run's status; a 'running' run whose process is gone is reported as failed."""
        run_dir = self.run_dir(run_id)
        status = read_json(run_dir / "status.json")
        alive = lock_held(run_dir / ".lock")
        status["process_alive"] = alive
        if status.get("status") == "running" and not alive:
            status["status"] = "failed"
            status["error"] = (f"the training process (pid {status.get('pid')}) ended without finishing; "
                               + advice(f"continue with scripts/train.py --run-id {run_id} --resume",
                                        "start_training with resume=true continues it"))
        return status

    def list_runs(self) -> list[dict[str, Any]]:
        runs = []
        if not self.runs_dir.is_dir():
            return runs
        for path in sorted(self.runs_dir.iterdir()):
            if (path / "run-manifest.json").is_file():
                try:
                    status = self.status(path.name)
                except (OSError, ValueError):
                    continue
                runs.append({"run_id": path.name, "status": status.get("status"), "stage": status.get("stage"),
                             "progress": status.get("progress"), "updated_at": status.get("updated_at")})
        return runs

    # ------------------------------------------------------------- the lock

    @contextmanager
    def lock(self, run_id: str) -> Iterator[dict[str, Any]]:
        """Exclusive right to train the run. A second start is refused while the first
        lives; the lock of a dead process is free again (the kernel drops it). Yields what
        was found: the previous holder and the leftovers of killed writers removed."""
        run_dir = self.run_dir(run_id)
        path = run_dir / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            for attempt in range(20):  # a status reader may hold a shared lock for a moment
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if attempt == 19:
                        holder = path.read_text().strip() or "unknown"
                        raise RunLocked(f"run {run_id} is already running (lock held by {holder}); "
                                        + advice("watch it with scripts/status.py or cancel it first",
                                                 "watch it with monitor_training_progress or cancel_training "
                                                 "first"),
                                        details={"run_id": run_id, "holder": holder}) from None
                    time.sleep(0.05)
            previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            removed = clean_temporaries(run_dir)
            yield {"previous_holder": previous or None, "cleaned": [str(p) for p in removed]}
        finally:
            os.close(fd)


def stage_output(run_dir: Path, manifest: dict[str, Any], stage: int) -> tuple[Path, bool]:
    """What a stage trained, and whether it is a whole model (training.fine_tune full) rather than
    an adapter on the base model."""
    entry = manifest["stages"][f"stage{stage}"]
    full = entry.get("fine_tune") == "full"  # manifests older than full fine-tuning hold adapters
    return run_dir / (entry["model_path"] if full else entry["adapter_path"]), full


def lock_held(path: Path) -> bool:
    """Whether a live process holds the run's lock."""
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
