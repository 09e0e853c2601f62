"""Training runs seen from the server: start one in the background, and watch, list and
cancel runs from the files they write. A run whose files are corrupt is reported with
what is wrong and how to recover, never hides the others, and no read costs more than a
bounded slice of a file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

from mcp.server.mcpserver.exceptions import ToolError

from mcp_wrapper.access import ProjectAccess
from mcp_wrapper.files import (
    FileProblem,
    last_metrics,
    last_result,
    lock_held,
    read_bounded,
    read_object,
    tail_lines,
    untrusted,
)
from mcp_wrapper.models import STATUSES, CancelResult, Metrics, MonitorResult, RunList, RunSummary, StartResult

FIRST_PACE_WAIT = 30.0  # seconds start_training waits for a first run's first iteration
RECOVER = ("if no process runs it, start_training with resume=true rewrites the status from the last checkpoint; "
           "or configure a new run")


def _timestamp(value: Any) -> Optional[str]:
    """An ISO timestamp read from a run file, or None for anything else."""
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return None
    return value


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _number(value: Any, kind: type = float) -> Any:
    """A status field as a number, or None when the file holds something else there."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return None
    return kind(value)


def _metric(value: Any) -> Any:
    return value if value in ("nan", "inf", "-inf") else _number(value)


class RunTools(ProjectAccess):
    def launch(self, project_value: str, run_id: str, stage: Optional[int], resume: bool,
               client_roots: Optional[list[Path]]) -> tuple[subprocess.Popen, Path, Path]:
        """Start scripts/train.py in its own process group, output to the run's log; wait
        until its status says running with its pid (it started) or it exits (refused)."""
        project = self.project(project_value, client_roots)
        run_dir = self.run_dir(project, run_id, client_roots)
        if lock_held(run_dir):
            raise ToolError(f"run {run_id} is already running; watch it with monitor_training_progress "
                            "or stop it with cancel_training")
        log_file = self.run_file(run_dir, "train-process.log", client_roots)
        logged = log_file.stat().st_size if log_file.is_file() else None
        argv = self.argv(project, "train.py", ["--run-id", run_id, *(["--stage", str(stage)] if stage else []),
                                                *(["--resume"] if resume else [])])
        with log_file.open("ab") as log:
            proc = subprocess.Popen(argv, cwd=project, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=self.environment(project, client_roots))
        threading.Thread(target=proc.wait, daemon=True).start()  # reaps the child: no zombies
        status_file = self.run_file(run_dir, "status.json", client_roots)

        def running() -> bool:
            with contextlib.suppress(FileProblem):
                status = read_object(status_file)
                return status.get("status") == "running" and status.get("pid") == proc.pid
            return False

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not running():
            time.sleep(0.05)
        if proc.poll() is not None and proc.returncode != 0:
            message = self.final(log_file).get("error", {}).get("message")
            # a refused start leaves no trace: the log is as it was
            os.truncate(log_file, logged) if logged is not None else log_file.unlink(missing_ok=True)
            raise ToolError("training did not start; the trainer's message follows:\n" + untrusted(str(message)))
        return proc, run_dir, log_file

    @staticmethod
    def final(log_file: Path) -> dict[str, Any]:
        """The trainer's --json result line, from the end of its log."""
        return last_result(tail_lines(log_file, 50)) or {"error": {"message": "no result; see " + str(log_file)}}

    def estimate_minutes(self, project: Path, run_dir: Path, stage: Optional[int],
                         client_roots: Optional[list[Path]] = None) -> Optional[int]:
        """Minutes for this run at the pace of the project's last completed run (None without one)."""
        try:
            manifest = read_object(run_dir / "run-manifest.json")
            todo = sum(s["iterations"] for key, s in manifest["stages"].items()
                       if s["status"] != "completed" and (stage is None or key == f"stage{stage}"))
        except (FileProblem, KeyError, TypeError, AttributeError):
            return None
        for other in sorted(run_dir.parent.glob("*/run-manifest.json"), reverse=True):
            with contextlib.suppress(FileProblem, ToolError, KeyError, TypeError, ValueError, AttributeError,
                                     ZeroDivisionError):  # a run folder that leads outside is passed over
                other = self.path(other, f"runs/{other.parent.name}/run-manifest.json", client_roots)
                for entry in read_object(other)["stages"].values():
                    if entry.get("status") == "completed" and entry.get("started_at") and entry.get("completed_at"):
                        seconds = (datetime.fromisoformat(entry["completed_at"])
                                   - datetime.fromisoformat(entry["started_at"])).total_seconds()
                        return max(1, math.ceil(seconds / entry["iterations"] * todo / 60))
        return None

    def start_async(self, project_value: str, run_id: str, stage: Optional[int], resume: bool,
                    client_roots: Optional[list[Path]]) -> StartResult:
        proc, run_dir, log_file = self.launch(project_value, run_id, stage, resume, client_roots)
        project = run_dir.parents[1]
        minutes = self.estimate_minutes(project, run_dir, stage, client_roots)
        deadline = time.monotonic() + FIRST_PACE_WAIT
        seen = self.monitor(str(project), run_id, False, False, client_roots)
        while minutes is None and seen.eta_seconds is None and seen.status == "running" \
                and time.monotonic() < deadline:  # a first run: its own first iteration gives the pace
            time.sleep(0.25)
            seen = self.monitor(str(project), run_id, False, False, client_roots)
        if minutes is None and seen.eta_seconds is not None:
            minutes = max(1, math.ceil(seen.eta_seconds / 60))
        return StartResult(
            success=True, run_id=run_id, training_started=True, status=seen.status, pid=proc.pid,
            estimated_duration_minutes=minutes,
            log_file=str(log_file),
            monitor_command=f"monitor_training_progress(project_path={str(project)!r}, run_id={run_id!r})")

    def monitor(self, project_value: str, run_id: str, include_emissions: bool, include_log: bool,
                client_roots: Optional[list[Path]]) -> MonitorResult:
        project = self.project(project_value, client_roots)
        run_dir = self.run_dir(project, run_id, client_roots)
        alive = lock_held(run_dir)
        log_tail = (untrusted("\n".join(tail_lines(self.run_file(run_dir, "train.log", client_roots), 20)))
                    if include_log else None)
        try:
            status = read_object(self.run_file(run_dir, "status.json", client_roots))
            state = status.get("status", "not_started")
            if state not in STATUSES:
                raise FileProblem(f"status.json has an unknown status (not one of {', '.join(STATUSES)})")
        except FileProblem as problem:
            return MonitorResult(
                run_id=run_id, status="unreadable", process_alive=alive, current_stage=None, current_iteration=None,
                total_iterations=None, progress_percentage=None, metrics=Metrics(), estimated_completion_time=None,
                error=f"runs/{run_id}/{problem}; " + ("the trainer is still running and rewrites it at its next "
                                                       "report" if alive else RECOVER), log_tail=log_tail)
        error = status.get("error")
        error = untrusted(str(error)) if error else None  # the trainer's error may quote data
        if state == "running" and not alive:
            state = "failed"
            error = (f"the training process (pid {status.get('pid')}) ended without finishing; start_training with "
                     "resume=true continues from its last checkpoint. The end of its log, which may say why (a full "
                     "disk cannot record it in the status):\n"
                     + untrusted("\n".join(tail_lines(self.run_file(run_dir, "train-process.log", client_roots), 8))))
        latest = last_metrics(self.run_file(run_dir, "metrics.jsonl", client_roots))
        eta = _number(status.get("eta_seconds")) if state == "running" else None
        emissions, alerts = None, None
        if include_emissions:  # status.json has the live figure (flushed at each evaluation), the manifest the final
            with contextlib.suppress(FileProblem):
                final = read_object(self.run_file(run_dir, "run-manifest.json", client_roots)).get("emissions") or {}
                final = final if isinstance(final, dict) else {}
                live = status.get("emissions_kg") if state == "running" else None
                emissions = _number(live if live is not None else final.get("total_kg"))
                alerts = status.get("emissions_alerts") or final.get("alerts") or []
                alerts = [a for a in alerts if isinstance(a, dict)] if isinstance(alerts, list) else []
        return MonitorResult(
            run_id=run_id, status=state, process_alive=alive, current_stage=_number(status.get("stage"), int),
            current_iteration=_number(status.get("iteration"), int),
            total_iterations=_number(status.get("total_iterations"), int),
            progress_percentage=_number(status.get("progress")),
            metrics=Metrics(**{k: _metric(latest.get(k)) for k in Metrics.model_fields}),
            carbon_emissions_kg=emissions, emissions_alerts=alerts, eta_seconds=eta,
            estimated_completion_time=((_now() + timedelta(seconds=eta)).isoformat(timespec="seconds")
                                       if eta is not None else None),
            error=error, log_tail=log_tail,
        )

    def list_runs(self, project_value: str, client_roots: Optional[list[Path]]) -> RunList:
        project = self.project(project_value, client_roots)
        runs_folder = self.path(project / "runs", "the project's runs folder", client_roots)
        runs = []
        for run_dir in sorted(runs_folder.glob("*")):
            if not (run_dir / "run-manifest.json").is_file():
                continue
            try:
                seen = self.monitor(str(project), run_dir.name, False, False, client_roots)
            except ToolError as error:  # a run folder that leads outside, a hostile name: listed, not hidden
                runs.append(RunSummary(run_id=run_dir.name[:120], status="unreadable", process_alive=False,
                                       error=str(error)))
                continue
            updated = None
            with contextlib.suppress(FileProblem, ToolError, AttributeError):
                updated = _timestamp(read_object(self.run_file(run_dir, "status.json", client_roots)).get("updated_at"))
            runs.append(RunSummary(run_id=run_dir.name, status=seen.status, process_alive=seen.process_alive,
                                   current_stage=seen.current_stage, progress_percentage=seen.progress_percentage,
                                   updated_at=updated,
                                   error=seen.error if seen.status == "unreadable" else None))
        return RunList(project_path=str(project), runs=runs)

    def _holder(self, run_dir: Path) -> int:
        """The pid in the run's lock file, once /proc confirms that process has the lock open
        (a pid written there by anything else is never signalled)."""
        lock = run_dir / ".lock"
        try:
            holder = re.match(rb"pid (\d+)", read_bounded(lock, 200))
        except (OSError, FileProblem):
            holder = None
        if not holder:
            raise ToolError(f"cannot tell which process runs {run_dir.name}: its .lock names no pid")
        pid = int(holder[1])
        if not Path("/proc/self/fd").is_dir():
            return pid  # no /proc (macOS): the lock is held, and the pid is the one its holder wrote
        lock_id = (lock.stat().st_dev, lock.stat().st_ino)
        try:
            holds = any((lambda st: (st.st_dev, st.st_ino))(os.stat(fd)) == lock_id
                        for fd in Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            holds = False  # gone, or not ours to inspect: never signalled on trust
        if not holds:
            raise ToolError(f"process {pid} named by runs/{run_dir.name}/.lock cannot be confirmed to hold the "
                            "lock; nothing was signalled")
        return pid

    def cancel(self, project_value: str, run_id: str, grace_seconds: float,
               client_roots: Optional[list[Path]]) -> CancelResult:
        """SIGTERM (the trainer checkpoints and ends as cancelled), then SIGKILL after the grace period."""
        project = self.project(project_value, client_roots)
        run_dir = self.run_dir(project, run_id, client_roots)
        if not lock_held(run_dir):
            state = self.monitor(str(project), run_id, False, False, client_roots).status
            return CancelResult(run_id=run_id, signal="none", status=state, message=f"run {run_id} is not running")
        pid = self._holder(run_dir)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and lock_held(run_dir):
            time.sleep(0.05)
        sent = "SIGTERM"
        if lock_held(run_dir):
            sent = "SIGTERM then SIGKILL"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while lock_held(run_dir):
                time.sleep(0.05)
            self._record_kill(run_dir, grace_seconds, client_roots)
        last = None
        for checkpoint in sorted(run_dir.glob("stage*/checkpoints/iter-*/checkpoint.json"), reverse=True):
            with contextlib.suppress(FileProblem, ToolError):
                checkpoint = self.run_file(run_dir, str(checkpoint.relative_to(run_dir)), client_roots)
                last = _number(read_object(checkpoint).get("iteration"), int)
                break
        state = self.monitor(str(project), run_id, False, False, client_roots).status
        return CancelResult(run_id=run_id, signal=sent, status=state, last_checkpoint_iteration=last,
                            message=f"run {run_id} is {state}; start_training with resume=true continues it")

    def _record_kill(self, run_dir: Path, grace_seconds: float, client_roots: Optional[list[Path]]) -> None:
        """The trainer could not record a SIGKILL: say so in its status (atomically, as it would)."""
        path = self.run_file(run_dir, "status.json", client_roots)
        try:
            status = read_object(path)
        except FileProblem:
            status = {"run_id": run_dir.name}
        status.update(status="cancelled", error=f"killed after {grace_seconds:.0f} s without stopping on SIGTERM",
                      updated_at=_now().isoformat(timespec="seconds"))
        tmp = run_dir / f".tmp-status.json.{os.getpid()}"
        tmp.unlink(missing_ok=True)  # a link planted there is removed, never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(status, indent=2))
        os.replace(tmp, path)
