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


# What git writes into when it commits or an update records conflicts: none of it may lead elsewhere.
GIT_PARTS = ("objects", "refs", "index", "HEAD", "config", "logs", "info", "packed-refs")


def own_repository(project: Path) -> None:
    """Refuse a project whose git repository lies elsewhere: `.git` a link or a gitfile (a
    worktree's or submodule's pointer), a part of it a link, or core.worktree set (git would read
    and index another folder). A commit or an update would write outside the project."""
    dot_git = project / ".git"
    if not dot_git.exists() and not dot_git.is_symlink():
        return
    if dot_git.is_symlink() or not dot_git.is_dir():
        what = "a link" if dot_git.is_symlink() else "a file pointing to a repository elsewhere"
        raise ToolError(f"{dot_git} is {what}; the server commits and updates only in a repository of the project's "
                        "own (a real .git folder inside it)")
    linked = [part for part in GIT_PARTS if (dot_git / part).is_symlink()]
    if linked:
        raise ToolError(f"{dot_git}: {', '.join(linked)} {'is a link' if len(linked) == 1 else 'are links'}, which "
                        "git would write through; the server commits and updates only in a repository of the "
                        "project's own")
    if git(project, "config", "--get", "core.worktree", check=False).strip():
        raise ToolError(f"{dot_git}/config sets core.worktree, so git would work on another folder; the server "
                        "commits and updates only in a repository of the project's own")
