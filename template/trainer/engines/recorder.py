"""What a run leaves behind while it trains: metrics.jsonl and status.json (RunRecorder), the
emissions so far (EmissionsProbe), progress lines (Progress), and the read-only view of the run
that ranks other than 0 have (Follower)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Optional

from trainer.observe import emissions
from trainer.observe.callbacks import TrainingCallback
from trainer.observe.emissions import StageEmissions
from trainer.runs.training_run_manager import RunManager

log = logging.getLogger("trainer")


class Follower(RunManager):
    """A run as ranks other than 0 see it: they read its files and never write them."""

    def update_manifest(self, run_id: str, change) -> dict[str, Any]:
        manifest = self.manifest(run_id)
        change(manifest)
        return manifest

    def write_status(self, run_id: str, **fields: Any) -> dict[str, Any]:
        return fields

    @contextmanager
    def lock(self, run_id: str):
        self.run_dir(run_id)  # an unknown run is refused on every rank
        yield {"cleaned": []}


class RunRecorder(TrainingCallback):
    """Appends every report to metrics.jsonl and keeps status.json current."""

    def __init__(self, manager: RunManager, run_id: str, offset: int, total: int):
        self.manager, self.run_id = manager, run_id
        self.offset, self.total = offset, total  # iterations of earlier stages, of all stages
        self.path = manager.run_dir(run_id) / "metrics.jsonl"
        self.last: dict[str, Any] = {}
        self.pace = 0.0  # seconds per iteration, from the stage's latest ETA

    def append(self, info: dict[str, Any]) -> None:
        line = (json.dumps(info) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write per line: readers never see half a line
        finally:
            os.close(fd)

    def _write(self, info: dict[str, Any]) -> None:
        self.append(info)
        self.last.update({k: v for k, v in info.items() if v is not None})
        self.manager.write_status(self.run_id, **self.position(info), total_iterations=info["total_iterations"],
                                  eta_seconds=self.eta(info), last_metrics=self.last)

    def position(self, info: dict[str, Any]) -> dict[str, Any]:
        """Where the run is: stage, iteration, and progress over every stage being trained."""
        done = self.offset + info["iteration"]
        return {"stage": info["stage"], "iteration": info["iteration"], "progress": round(100 * done / self.total, 2)}

    def eta(self, info: dict[str, Any]) -> Optional[float]:
        """Seconds until the run ends: the stage's own ETA, plus the later stages' iterations at
        this stage's pace (metrics.jsonl keeps the stage's ETA)."""
        eta = info.get("eta")
        if eta is None:
            return None
        left = info["total_iterations"] - info["iteration"]
        if left > 0:
            self.pace = eta / left
        later = self.total - self.offset - info["total_iterations"]
        return round(eta + later * self.pace, 1)

    on_train_loss_report = _write
    on_val_loss_report = _write

    def on_first_step(self, info: dict[str, Any]) -> None:
        """The first iteration's pace: an ETA for the whole run right after it starts."""
        self.manager.write_status(self.run_id, **self.position(info), total_iterations=info["total_iterations"],
                                  eta_seconds=self.eta(info))

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        """A checkpoint is where a resume starts: the status says that iteration (a cancel
        between reports would otherwise show an older one than the checkpoint it kept)."""
        self.manager.write_status(self.run_id, **self.position(info), last_checkpoint=info["iteration"])


class Progress(TrainingCallback):
    """A progress bar on a terminal, log lines otherwise."""

    def __init__(self, stage: int, quiet: bool):
        self.stage, self.quiet = stage, quiet
        self.tty = sys.stderr.isatty()

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        done, total = info["iteration"], info["total_iterations"]
        filled = int(30 * done / total)
        eta = time.strftime("%H:%M:%S", time.gmtime(info["eta"] or 0))
        line = (f"stage {self.stage} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} "
                f"loss {info['train_loss']:.4f} lr {info['learning_rate']:.2e} "
                f"{info['tokens_per_second']:.0f} tok/s eta {eta}"
                + (f" reward accuracy {info['reward_accuracy']:.2f}" if "reward_accuracy" in info else ""))
        print(("\r" + line) if self.tty else line, end="" if self.tty and done < total else "\n", file=sys.stderr)

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        if not self.quiet:
            log.info("stage %s iteration %s: validation loss %.4f", self.stage, info["iteration"], info["val_loss"])


class EmissionsProbe(TrainingCallback):
    """At each validation report: the emissions so far into status.json (and the stage's CSV),
    with the config's alert thresholds checked."""

    def __init__(self, manager: RunManager, run_id: str, tracker: StageEmissions, earlier_kg: float):
        self.manager, self.run_id, self.tracker, self.earlier_kg = manager, run_id, tracker, earlier_kg

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        so_far = self.tracker.flush()
        if so_far is not None:
            total = self.earlier_kg + so_far
            hours = max(info.get("elapsed") or 0, 1e-9) / 3600
            self.manager.write_status(self.run_id, emissions_kg=total, emissions_alerts=emissions.alerts_of(
                total, so_far / hours, self.tracker.config))
