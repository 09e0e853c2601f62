"""The report of one `copier update`, written by the migrations and read by the MCP server.

One JSON file in the project's git folder: never in the working tree, so it is nobody's edit and
nothing git would commit. The first migration of an update starts it afresh (`start`), each
migration adds its section (`add`), and the MCP server's update_project reads it into the tool's
result. A user of the copier CLI reads the same lines on stderr.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

NAME = "olmo-update-report.json"  # mcp_wrapper/update.py names it too; tests/test_update_guard.py keeps them equal


def path(project: Path) -> Path:
    folder = subprocess.run(["git", "rev-parse", "--absolute-git-dir"], cwd=project, capture_output=True, text=True,
                            check=True).stdout.strip()
    return Path(folder) / NAME


def read(project: Path) -> dict[str, Any]:
    try:
        return json.loads(path(project).read_text())
    except (OSError, ValueError):  # none yet, or half written by a migration that was killed
        return {}


def start(project: Path, head: str) -> None:
    """A fresh report for the update of the commit `head` (a report left by an earlier update is dropped)."""
    path(project).write_text(json.dumps({"head": head}))


def add(project: Path, section: str, value: Any) -> None:
    report = read(project)
    report[section] = value
    path(project).write_text(json.dumps(report, indent=1))


def rewrote(project: Path, names: list[str]) -> None:
    """Files a migration rewrote on purpose (renamed keys, new import names): the guard does not take
    their changed lines for lost edits. Outside a git repository (a test's folder) there is no report."""
    try:
        report = read(project)
    except subprocess.CalledProcessError:
        return
    add(project, "rewritten", sorted(set(report.get("rewritten", [])) | set(names)))
