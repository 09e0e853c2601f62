"""git, as the server runs it in a project: argv lists, nothing the project configures run (no
hooks, fsmonitor, signing program, filter or diff driver), a time limit, and errors whose quoted
text (the project's file names) is delimited as untrusted."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from mcp.server.mcpserver.exceptions import ToolError

from mcp_wrapper.files import untrusted

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "olmo-fine-tuning-mcp", "GIT_AUTHOR_EMAIL": "olmo-fine-tuning-mcp@localhost",
                "GIT_COMMITTER_NAME": "olmo-fine-tuning-mcp", "GIT_COMMITTER_EMAIL": "olmo-fine-tuning-mcp@localhost"}
GIT_TIMEOUT = 300


# Settings whose values are commands git would run (hooks, fsmonitor, signing, external diff), or
# that start work in the background: each is set to nothing for every git the server starts.
NEUTRAL = {"core.hooksPath": os.devnull, "core.fsmonitor": "false", "commit.gpgSign": "false",
           "tag.gpgSign": "false", "diff.external": "", "gc.auto": "0", "maintenance.auto": "false"}
DRIVER_COMMANDS = {"filter": ("clean", "smudge", "process"), "diff": ("command", "textconv")}


def neutral_settings(project: Path) -> dict[str, str]:
    """NEUTRAL plus each filter and diff driver the project configures, emptied (reading the
    configuration runs nothing; an empty command is no command to git)."""
    listed = subprocess.run(["git", "config", "--name-only", "--get-regexp", r"^(filter|diff)\."], cwd=project,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=GIT_TIMEOUT,
                            env={**os.environ, "GIT_CONFIG_COUNT": "0"}).stdout.split()
    settings = dict(NEUTRAL)
    for key in listed:
        kind, _, rest = key.partition(".")
        driver = rest.rpartition(".")[0]
        for command in DRIVER_COMMANDS.get(kind, ()) if driver else ():
            settings[f"{kind}.{driver}.{command}"] = ""
    return settings


@contextlib.contextmanager
def neutral_environment(project: Path) -> Iterator[None]:
    """The same settings for git run by others in this process (copier's update, through plumbum)
    and their children (the migrations), as environment variables (git's GIT_CONFIG_COUNT). Every
    git the process starts meanwhile gets them too, which only keeps it from running commands."""
    settings = neutral_settings(project)
    env = {"GIT_CONFIG_COUNT": str(len(settings))}
    for number, (key, value) in enumerate(settings.items()):
        env[f"GIT_CONFIG_KEY_{number}"], env[f"GIT_CONFIG_VALUE_{number}"] = key, value
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        from plumbum import local  # copier runs git through plumbum, whose environment is its own copy

        with local.env(**env):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def git(project: Path, *args: str, check: bool = True) -> str:
    env = {**GIT_IDENTITY, **os.environ}
    try:
        # git runs nothing the project's .git/config or .gitattributes could name
        options = [part for key, value in neutral_settings(project).items() for part in ("-c", f"{key}={value}")]
        proc = subprocess.run(["git", *options, *args], cwd=project, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, env=env, check=False, timeout=GIT_TIMEOUT)
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
