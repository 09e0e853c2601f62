"""git, as the server runs it in a project: argv lists, no hooks, no fsmonitor, a time limit,
and errors whose quoted text (the project's file names) is delimited as untrusted."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from mcp.server.mcpserver.exceptions import ToolError

from mcp_wrapper.files import untrusted

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "olmo-fine-tuning-mcp", "GIT_AUTHOR_EMAIL": "olmo-fine-tuning-mcp@localhost",
                "GIT_COMMITTER_NAME": "olmo-fine-tuning-mcp", "GIT_COMMITTER_EMAIL": "olmo-fine-tuning-mcp@localhost"}
GIT_TIMEOUT = 300


def git(project: Path, *args: str, check: bool = True) -> str:
    env = {**GIT_IDENTITY, **os.environ}
    try:
        # no hooks, no fsmonitor: git runs nothing the project's .git/config could name
        argv = ["git", "-c", "core.hooksPath=/dev/null", "-c", "core.fsmonitor=false", *args]
        proc = subprocess.run(argv, cwd=project, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env,
                              check=False, timeout=GIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise ToolError(f"git {args[0]} did not finish within {GIT_TIMEOUT} s in {project}") from None
    if check and proc.returncode != 0:  # git's message may quote the project's file names
        raise ToolError(f"git {args[0]} failed in {project}:\n" + untrusted(proc.stderr.strip()[-500:]))
    return proc.stdout


def changed_files(project: Path) -> list[str]:
    """Every changed file as git names it: each file, not its new folder (a conflict inside a
    folder an update added is found too), and names unquoted (-z), spaces and all."""
    fields = git(project, "status", "--porcelain", "-z", "--untracked-files=all").split("\0")
    files, rest = [], iter(fields)
    for entry in rest:
        if entry:
            files.append(entry[3:])
            if entry[0] in "RC":  # a rename or copy: the next field is where it came from
                next(rest, None)
    return files


def unmerged_files(project: Path) -> list[str]:
    """Files with a conflict recorded in git's index (copier's, a migration's, the update guard's)."""
    return sorted({name for name in git(project, "diff", "--name-only", "--diff-filter=U", "-z").split("\0") if name})
