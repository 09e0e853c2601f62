"""How the server reaches into a project: every path it derives is resolved and held to the
allowed roots, and every script runs with those roots (trainer/guard.py in the project then
holds its own paths and overrides to them), a wall-clock limit, and its text delimited."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Optional

from mcp.server.mcpserver.exceptions import ToolError

from mcp_wrapper.files import untrusted
from mcp_wrapper.paths import check_name, resolve
from mcp_wrapper.settings import Settings

SCRIPT_TIMEOUT = 3600
# The project's half of the safety contract; a project made before it must be updated first.
GUARD_MODULE = Path("trainer") / "guard.py"
# What the server runs or reads as code and config: never through a link that leaves the project.
OWN_CODE = ("scripts", "trainer", "config")
ROOTS_ENV, CLIENT_ROOTS_ENV = "OLMO_GUARD_ROOTS", "OLMO_GUARD_CLIENT_ROOTS"


class ProjectAccess:
    def __init__(self, settings: Settings):
        self.settings = settings

    # ------------------------------------------------------------- paths

    def path(self, value: str | Path, what: str, client_roots: Optional[list[Path]]) -> Path:
        return resolve(value, self.settings.allowed_roots, client_roots, self.settings.output_dir, what)

    def in_project(self, project: Path, value: str, what: str, client_roots: Optional[list[Path]]) -> Path:
        """A path argument relative to the project (or absolute), inside the allowed roots."""
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            raise ToolError(f"{what} must be a non-empty path without NUL characters")
        path = Path(value).expanduser()
        return self.path(path if path.is_absolute() else project / path, what, client_roots)

    def project(self, value: str, client_roots: Optional[list[Path]]) -> Path:
        project = self.path(value, "project_path", client_roots)
        if not (project / "config" / "fine_tuning_config.yaml").is_file() or not (project / "scripts").is_dir():
            raise ToolError(f"{project} is not a fine-tuning project (no config/fine_tuning_config.yaml); "
                            "create one with generate_fine_tuning_project")
        for folder in OWN_CODE:
            real = (project / folder).resolve()
            if real != project / folder:
                raise ToolError(f"{project}/{folder} is a link that leads outside the project (to {real}); the "
                                f"server runs and reads only the project's own {folder}/, so it refuses this project "
                                "until the link is replaced by the folder itself")
        if not (project / GUARD_MODULE).is_file():
            raise ToolError(f"{project} was made by an older template without the safety checks the server relies "
                            f"on ({GUARD_MODULE}); bring it forward with update_project first")
        return project

    def run_dir(self, project: Path, run_id: str, client_roots: Optional[list[Path]]) -> Path:
        check_name(run_id, "run_id")
        run_dir = self.path(project / "runs" / run_id, f"the run folder runs/{run_id}", client_roots)
        if not (run_dir / "run-manifest.json").is_file():
            runs = self.path(project / "runs", "the project's runs folder", client_roots)
            known = sorted(p.name for p in runs.glob("*") if (p / "run-manifest.json").is_file())
            raise ToolError(f"unknown run id '{run_id}' in {project}; known runs: {', '.join(known[-10:]) or 'none'}")
        return run_dir

    def run_file(self, run_dir: Path, name: str, client_roots: Optional[list[Path]]) -> Path:
        """A file of a run, followed through any link and held to the roots like the run folder."""
        return self.path(run_dir / name, f"runs/{run_dir.name}/{name}", client_roots)

    # ------------------------------------------------------------- the project's scripts

    def environment(self, project: Path, client_roots: Optional[list[Path]]) -> dict[str, str]:
        """The script's environment: the roots its guard holds it to, and a temp folder inside the project."""
        env = {**os.environ, ROOTS_ENV: os.pathsep.join(map(str, self.settings.allowed_roots)),
               "PYTHONUNBUFFERED": "1", "OLMO_CALLER": "mcp"}  # errors then name tools, not flags
        env.pop(CLIENT_ROOTS_ENV, None)
        if client_roots:
            env[CLIENT_ROOTS_ENV] = os.pathsep.join(map(str, client_roots))
        scratch = self.path(project / ".tmp", "the project's .tmp folder", client_roots)
        scratch.mkdir(exist_ok=True)  # generated projects have it (.tmp/.gitignore); older ones get it here
        env["TMPDIR"] = str(scratch)
        return env

    def argv(self, project: Path, name: str, args: list[str]) -> list[str]:
        """scripts/<name> --json with `args`, run by the project's Python."""
        return [self.settings.project_python(project), str(project / "scripts" / name), "--json", *args]

    def script(self, project: Path, name: str, args: list[str], client_roots: Optional[list[Path]],
               timeout: float = SCRIPT_TIMEOUT, stdin: Optional[str] = None) -> dict[str, Any]:
        """Run scripts/<name> --json and return its result; its error becomes a ToolError whose
        script text (which may quote data) is delimited as untrusted."""
        argv = self.argv(project, name, args)
        proc = subprocess.Popen(argv, cwd=project, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env=self.environment(project, client_roots))
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the script and anything it started
            proc.communicate()
            raise ToolError(f"scripts/{name} did not finish within {timeout:.0f} s and was stopped") from None
        lines = [line for line in out.strip().splitlines() if line.startswith("{")]
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            result = None
        if not isinstance(result, dict):
            raise ToolError(f"scripts/{name} gave no result (exit {proc.returncode}); the end of its stderr:\n"
                            + untrusted("\n".join(err.splitlines()[-20:])))
        if proc.returncode != 0 or "error" in result:
            raise ToolError(refusal(result))
        return result


def refusal(result: dict[str, Any]) -> str:
    """A script's {"error": ...} result as the server says it: kind, then the message (which may
    quote the project's data) delimited as untrusted."""
    error = result.get("error") if isinstance(result.get("error"), dict) else {}
    return (f"the project refused or failed ({error.get('type', 'error')}); its message, which may quote the "
            "project's data, follows:\n" + untrusted(str(error.get("message", "failed"))))
