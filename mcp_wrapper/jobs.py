"""Long tool calls as jobs: a project script runs in the background, and the call answers
within its wait (a client gives up on a request after about 60 s) with the result, or
with a job id that wait_for_job polls. A job's files live in the project's .tmp/jobs/<id>/
(ignored by git), so a restarted server still finds its jobs and their results."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from mcp.server.mcpserver.exceptions import ToolError

from mcp_wrapper.access import ProjectAccess, refusal
from mcp_wrapper.files import FileProblem, last_result, read_object, tail_lines, untrusted
from mcp_wrapper.models import JobResult

JOB_ID = re.compile(r"[a-z_]+-\d{8}-\d{6}-[0-9a-f]{6}")
WAIT_DEFAULT = 40.0  # seconds a long call waits for its job before answering with the job id
WAIT_MAX = 50.0  # below the 60 s many clients allow a request
RESULT_LIMIT = 1 << 20  # a script's result line is read back up to 1 MiB
KEEP_SECONDS = 7 * 24 * 3600  # an ended job's files stay this long for wait_for_job
JOB_FILES = ("stdout", "stderr", "job.json", "exit.json")


def write_new(path: Path, text: str) -> bool:
    """Create `path` with `text` unless something (a file, a link) is there already: a record is
    never written through a link planted in the job's folder. Whether it wrote."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except OSError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    return True


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks (/proc/<pid>/stat field 22): a pid that was
    reused by another process has another one. None where /proc does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: Optional[str], script: Optional[Path] = None) -> bool:
    """Whether the job's process still runs: the same pid with the same start time (and, when
    `script` is given, that script on its command line), so a reused pid is never mistaken."""
    if Path("/proc/self").is_dir():
        if started is None or _start_time(pid) != started:
            return False
        if script is None:
            return True
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(script).encode() in argv
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


class JobTools(ProjectAccess):
    # tool name -> how its script's result becomes the tool's result (set by Tools)
    parsers: dict[str, Callable[[dict[str, Any]], Any]] = {}

    def jobs_dir(self, project: Path, client_roots: Optional[list[Path]]) -> Path:
        folder = self.path(project / ".tmp" / "jobs", "the project's .tmp/jobs folder", client_roots)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def forget_job(self, project: Path, job_id: str, client_roots: Optional[list[Path]]) -> None:
        """Remove an ended job's folder (the job's own files only: stdout, stderr, job.json, exit.json)."""
        folder = self.job_folder(project, job_id, client_roots)
        for name in JOB_FILES:
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()  # anything else in it is not the job's, and stays

    def _prune(self, jobs: Path, client_roots: Optional[list[Path]]) -> None:
        """Jobs that ended more than KEEP_SECONDS ago are forgotten."""
        cutoff = time.time() - KEEP_SECONDS
        for folder in jobs.iterdir():
            with contextlib.suppress(OSError, ToolError):
                ended = folder / "exit.json"
                if JOB_ID.fullmatch(folder.name) and not folder.is_symlink() and ended.is_file() \
                        and ended.stat().st_mtime < cutoff:
                    self.forget_job(jobs.parent.parent, folder.name, client_roots)

    def start_job(self, project: Path, tool: str, script: str, args: list[str], client_roots: Optional[list[Path]],
                  timeout: float, stdin: Optional[str] = None) -> str:
        """Run scripts/<script> --json in the background; its stdout, stderr and exit code go
        to the job's folder. A thread reaps it, and kills it (its whole group) after `timeout`."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        job_id = f"{tool}-{stamp}-{secrets.token_hex(3)}"
        jobs = self.jobs_dir(project, client_roots)
        self._prune(jobs, client_roots)
        folder = jobs / job_id
        folder.mkdir()
        argv = self.argv(project, script, args)
        with (folder / "stdout").open("wb") as out, (folder / "stderr").open("wb") as err:
            proc = subprocess.Popen(argv, cwd=project, stdout=out, stderr=err, start_new_session=True,
                                    stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                    env=self.environment(project, client_roots))
        record = {"job_id": job_id, "tool": tool, "script": script, "pid": proc.pid, "started": _start_time(proc.pid),
                  "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "timeout_s": timeout}
        (folder / "job.json").write_text(json.dumps(record), encoding="utf-8")
        if stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(stdin.encode())
            proc.stdin.close()

        def reap() -> None:
            try:
                code = proc.wait(timeout=timeout)
                ended = "exited"
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                code, ended = proc.wait(), f"stopped after its limit of {timeout:.0f} s"
            write_new(folder / "exit.json", json.dumps({"returncode": code, "ended": ended}))  # unless cancel_job did
        threading.Thread(target=reap, daemon=True).start()
        return job_id

    def job_folder(self, project: Path, job_id: str, client_roots: Optional[list[Path]]) -> Path:
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise ToolError(f"job_id {str(job_id)[:80]!r} is not a job id (a long tool's call returns one)")
        folder = self.path(self.jobs_dir(project, client_roots) / job_id, f"the job folder of {job_id}", client_roots)
        if not (folder / "job.json").is_file():
            known = sorted(p.name for p in folder.parent.glob("*") if (p / "job.json").is_file())
            raise ToolError(f"unknown job {job_id} in {project}; known jobs: {', '.join(known[-10:]) or 'none'}")
        linked = [name for name in JOB_FILES if (folder / name).is_symlink()]
        if (self.jobs_dir(project, client_roots) / job_id).is_symlink() or linked:
            raise ToolError(f"job {job_id}: {', '.join(linked) or 'its folder'} is a link; a job's files are the "
                            "server's own, never read or written through a link")
        return folder

    def job_state(self, project: Path, job_id: str, client_roots: Optional[list[Path]]) -> JobResult:
        folder = self.job_folder(project, job_id, client_roots)
        try:
            record = read_object(self.path(folder / "job.json", f"the record of job {job_id}", client_roots))
            started, pid, tool = datetime.fromisoformat(record["started_at"]), int(record["pid"]), str(record["tool"])
        except FileProblem as problem:
            raise ToolError(f"job {job_id}: {problem}") from None
        except (KeyError, TypeError, ValueError):
            raise ToolError(f"job {job_id}: its job.json is not a record the server wrote") from None
        elapsed = round((datetime.now(timezone.utc) - started).total_seconds(), 1)
        exit_file = self.path(folder / "exit.json", f"the exit record of job {job_id}", client_roots)
        ended = None
        with contextlib.suppress(FileProblem):
            ended = read_object(exit_file) if exit_file.is_file() else None
        if ended is None and _alive(pid, record.get("started")):
            tail = tail_lines(folder / "stderr", 5)
            return JobResult(job_id=job_id, tool=tool, status="running", elapsed_seconds=elapsed,
                             log_tail=untrusted("\n".join(tail)) if tail else None,
                             message=f"still running; call wait_for_job(job_id={job_id!r}) again")
        if ended is not None and ended.get("ended") == "cancelled":
            return JobResult(job_id=job_id, tool=tool, status="cancelled", elapsed_seconds=elapsed,
                             message="cancelled with cancel_job")
        result = last_result(tail_lines(folder / "stdout", 50, max_bytes=RESULT_LIMIT))
        problem = None
        if result is None:
            why = (ended or {}).get("ended", "ended")
            problem = (f"the script {why} without a result (exit {(ended or {}).get('returncode')}); the end of its "
                       "stderr:\n" + untrusted("\n".join(tail_lines(folder / "stderr", 20))))
        elif "error" in result:
            problem = refusal(result)
        if problem:
            return JobResult(job_id=job_id, tool=tool, status="failed", elapsed_seconds=elapsed, error=problem)
        try:
            parsed = self.parsers[tool](result)
        except (KeyError, TypeError, ValueError) as error:
            return JobResult(job_id=job_id, tool=tool, status="failed", elapsed_seconds=elapsed,
                             error=f"the script's result does not have the expected fields ({error})")
        return JobResult(job_id=job_id, tool=tool, status="completed", elapsed_seconds=elapsed,
                         result=parsed.model_dump(), message="completed")

    def wait_job(self, project_value: str, job_id: str, wait_seconds: float,
                 client_roots: Optional[list[Path]], tick: Optional[Callable[[float], None]] = None) -> JobResult:
        """The job's state once it ends, or after `wait_seconds` (at most WAIT_MAX)."""
        project = self.project(project_value, client_roots)
        deadline = time.monotonic() + min(max(wait_seconds, 0.0), WAIT_MAX)
        while True:
            state = self.job_state(project, job_id, client_roots)
            if state.status != "running" or time.monotonic() >= deadline:
                return state
            if tick:
                tick(state.elapsed_seconds)
            time.sleep(0.25)

    def cancel_job(self, project_value: str, job_id: str, client_roots: Optional[list[Path]]) -> JobResult:
        project = self.project(project_value, client_roots)
        folder = self.job_folder(project, job_id, client_roots)
        state = self.job_state(project, job_id, client_roots)
        if state.status != "running":
            return state
        record = read_object(folder / "job.json")
        pid = int(record["pid"])
        write_new(folder / "exit.json", json.dumps({"returncode": None, "ended": "cancelled"}))  # the reaper leaves it
        script = project / "scripts" / str(record.get("script"))
        if _alive(pid, record.get("started"), script):  # only the job's own process group: start time and argv
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _alive(pid, record.get("started"), script):
                time.sleep(0.1)
            if _alive(pid, record.get("started"), script):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        return self.job_state(project, job_id, client_roots)
