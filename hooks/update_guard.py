#!/usr/bin/env python
"""Copier migration (every update, the last one): no edit of the user's is lost in silence.

    update_guard.py --template SRC --from OLD_COMMIT [--project DIR] [--stage before|after]

Copier's update merges the user's changes into the new template version, but some of its steps
drop them without a word: a file the new version no longer has is deleted even when the user had
changed it, and a migration may move or rewrite files. This script runs after every other
migration, inside the project, and compares three states of every file:

- the release the project was made from, rendered afresh with the project's answers (the base);
- the project's last commit (HEAD): the user's version; a file that differs from the base, or
  that the base does not have, holds an edit of the user's;
- the working tree after the update.

Then, for each file the user changed or added:

- deleted by the update, and not carried elsewhere by a migration (the update report's
  `layout.moves`): the user's version is put back and recorded as a modify/delete conflict in
  git's index ("deleted by them"), so `git status`, the MCP server and the user see it;
- still there but without lines the user added (and no conflict markers, and not rewritten by a
  migration): the user's change is merged back in with `git merge-file` (a conflict is marked and
  recorded as copier records its own; a binary file is put back as it was, as a conflict).

Git cannot give back a file it ignores, and copier overwrites or deletes one at a template's path:
the "before" stage keeps a copy of each (in the project's git folder) and the "after" stage puts
back any the update changed.

A template file the user deleted that the update brought back is deleted again when the template
did not change it, else recorded as a conflict. What it did goes to the update report (`guard`)
and to stderr; nothing goes to stdout, which an MCP server's stdio belongs to.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import update_report  # noqa: E402  (beside this file)

ANSWERS = ".copier-answers.yml"
KEPT = "olmo-update-kept"  # beside the report, in the project's git folder
LABELS = ["-L", "before updating", "-L", "last update", "-L", "after updating"]
MARKERS = (b"<<<<<<< before updating", b">>>>>>> after updating")


def git(project: Path, *args: str, stdin: bytes | None = None, check: bool = True) -> bytes:
    argv = ["git", "-c", "core.hooksPath=" + os.devnull, "-c", "core.fsmonitor=false", *args]
    return subprocess.run(argv, cwd=project, input=stdin, capture_output=True, check=check).stdout


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def render_release(project: Path, template: str, commit: str) -> dict[str, bytes]:
    """The project as the release `commit` made it, with the answers of the project's last commit:
    {path: bytes}."""
    import yaml
    from copier import run_copy

    answers = yaml.safe_load(git(project, "show", f"HEAD:./{ANSWERS}")) or {}
    data = {key: value for key, value in answers.items() if not key.startswith("_")}
    with tempfile.TemporaryDirectory(prefix="olmo-update-guard.") as scratch:
        into = Path(scratch) / "release"
        run_copy(template, str(into), data=data, vcs_ref=commit, defaults=True, quiet=True, unsafe=True,
                 skip_tasks=True)
        return {path.relative_to(into).as_posix(): path.read_bytes() for path in into.rglob("*")
                if path.is_file() and not path.is_symlink() and path.name != ANSWERS}


def committed(project: Path) -> dict[str, tuple[str, str]]:
    """The project's last commit: {path: (mode, blob id)}."""
    out = {}
    for entry in git(project, "ls-tree", "-r", "-z", "HEAD").split(b"\0"):
        if entry:
            meta, _, name = entry.partition(b"\t")
            mode, kind, sha = meta.decode().split()
            if kind == "blob":
                out[name.decode("utf-8", "surrogateescape")] = (mode, sha)
    return out


def unmerged(project: Path) -> set[str]:
    """Files with a conflict in git's index, relative to the project (which may be a subfolder)."""
    listed = git(project, "diff", "--name-only", "--relative", "--diff-filter=U", "-z")
    return {name.decode("utf-8", "surrogateescape") for name in listed.split(b"\0") if name}


def write_blob(project: Path, data: bytes | None) -> str | None:
    return None if data is None else git(project, "hash-object", "-w", "--stdin", stdin=data).decode().strip()


def record_conflict(project: Path, name: str, mode: str, base: bytes | None, mine: bytes | None,
                    theirs: bytes | None) -> None:
    """Stages 1-3 in git's index as a merge records them (a missing side: added or deleted there)."""
    full = git(project, "rev-parse", "--show-prefix").decode().strip() + name  # the index names from the top
    entries = [f"0 {'0' * 40}\t{full}"] + [f"{mode} {sha} {stage}\t{full}" for stage, sha in
                                           ((1, write_blob(project, base)), (2, write_blob(project, mine)),
                                            (3, write_blob(project, theirs))) if sha]
    git(project, "update-index", "--index-info", stdin=("\n".join(entries) + "\n").encode())


def missing_lines(mine: bytes, base: bytes, result: bytes) -> list[bytes]:
    """Lines the user added (more often in theirs than in the base) that the result lacks."""
    def count(data: bytes) -> Counter:
        return Counter(line.rstrip() for line in data.splitlines() if line.strip())

    added, now = count(mine) - count(base), count(result)
    return [line for line, times in added.items() if now[line] < times]


def merge_back(project: Path, name: str, mode: str, mine: bytes, base: bytes | None, result: bytes) -> int:
    """The user's change 3-way merged into the result: the number of conflicts (recorded in the
    index). A binary file is not merged: the user's version is put back, as a conflict."""
    if b"\0" in mine + (base or b"") + result:
        (project / name).write_bytes(mine)
        record_conflict(project, name, mode, base, mine, result)
        return 1
    with tempfile.TemporaryDirectory(prefix="olmo-update-guard.") as scratch:
        files = [Path(scratch) / "mine", Path(scratch) / "base", Path(scratch) / "result"]
        for file, data in zip(files, (mine, base or b"", result), strict=True):
            file.write_bytes(data)
        merged = subprocess.run(["git", "merge-file", "-p", *LABELS, *map(str, files)], capture_output=True)
    if not 0 <= merged.returncode <= 127:
        raise RuntimeError(f"{name}: git merge-file failed: {merged.stderr.decode(errors='replace').strip()}")
    (project / name).write_bytes(merged.stdout)
    if merged.returncode:
        record_conflict(project, name, mode, base, mine, result)
    return merged.returncode


def check_edits(project: Path, head: dict[str, tuple[str, str]], release: dict[str, bytes],
                report: dict[str, list[str]]) -> None:
    """Every file the user changed or added: deleted -> put back; lines dropped -> merged back."""
    done = update_report.read(project)
    moved, rewritten = done.get("layout", {}).get("moves", {}), set(done.get("rewritten", []))
    open_conflicts = unmerged(project)
    for name, (mode, sha) in sorted(head.items()):
        base = release.get(name)
        if name == ANSWERS or name in open_conflicts or name in moved or (base is not None and blob_id(base) == sha):
            continue  # not the user's change, or already reported (a conflict, a move)
        here = project / name
        mine = git(project, "cat-file", "blob", sha)
        if not here.exists() and not here.is_symlink():
            here.parent.mkdir(parents=True, exist_ok=True)
            here.write_bytes(mine)
            os.chmod(here, 0o755 if mode == "100755" else 0o644)
            record_conflict(project, name, mode, base, mine, None)
            how = "added" if base is None else "changed"
            report["restored"].append(f"{name}: the update deleted it and you had {how} it; your version is back, "
                                      "unmerged: `git add` keeps it, `git rm` deletes it")
            continue
        if here.is_symlink() or not here.is_file() or name in rewritten:
            continue
        result = here.read_bytes()
        marked = any(line.rstrip() in MARKERS for line in result.splitlines())
        if marked or not missing_lines(mine, base or b"", result):
            continue
        conflicts = merge_back(project, name, mode, mine, base, result)
        if conflicts:
            report["conflicts"].append(f"{name}: the update dropped lines you added; merged back with "
                                       f"{conflicts} conflict(s) to resolve")
        else:
            report["merged_back"].append(f"{name}: the update dropped lines you added; merged back")


def check_deletions(project: Path, head: dict[str, tuple[str, str]], release: dict[str, bytes],
                    report: dict[str, list[str]]) -> None:
    """Template files the user deleted that the update brought back."""
    open_conflicts = unmerged(project)
    for name, base in sorted(release.items()):
        here = project / name
        if name in head or name in open_conflicts or not here.is_file() or here.is_symlink() or ignored(project, name):
            continue
        result = here.read_bytes()
        if result == base:
            here.unlink()
            git(project, "update-index", "--force-remove", "--", name)
            report["deleted_again"].append(f"{name}: you had deleted it; the update brought it back; deleted again")
        else:
            record_conflict(project, name, "100644", base, None, result)
            report["conflicts"].append(f"{name}: you had deleted it and the new template changed it; it is back, "
                                       "unmerged: `git rm` keeps it deleted, `git add` takes the new version")


def ignored(project: Path, name: str) -> bool:
    return bool(git(project, "check-ignore", "--no-index", "--", name, check=False).strip())


def kept_aside(project: Path) -> Path:
    """Where the "before" stage keeps the user's ignored files at the template's paths."""
    return update_report.path(project).with_name(KEPT)


def keep_ignored(project: Path, release: dict[str, bytes]) -> None:
    """Before the update: copier overwrites or deletes a file at a template path even when git
    ignores it (the user's own version, which git cannot give back), so keep a copy."""
    shutil.rmtree(kept_aside(project), ignore_errors=True)
    for name in sorted(release):
        here = project / name
        if here.is_file() and not here.is_symlink() and ignored(project, name):
            copy = kept_aside(project) / name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(here, copy)


def restore_ignored(project: Path, report: dict[str, list[str]]) -> None:
    """After the update: the user's ignored files as they were (the template's version is not taken)."""
    aside = kept_aside(project)
    for copy in sorted(p for p in aside.rglob("*") if p.is_file()) if aside.is_dir() else []:
        name = copy.relative_to(aside).as_posix()
        here = project / name
        if here.is_symlink() or not here.is_file() or here.read_bytes() != copy.read_bytes():
            if here.is_symlink():
                here.unlink()
            here.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(copy, here)
            report["kept_ignored"].append(f"{name}: git ignores it and it was yours; the update would have replaced "
                                          "or deleted it; kept as it was (the new template's version is not taken)")
    shutil.rmtree(aside, ignore_errors=True)


def guard(project: Path, template: str, old_commit: str) -> dict[str, list[str]]:
    """Check and repair the update's result; returns the report's lines by kind."""
    report: dict[str, list[str]] = {"restored": [], "merged_back": [], "conflicts": [], "deleted_again": [],
                                    "kept_ignored": []}
    head = committed(project)
    if ANSWERS in head:
        release = render_release(project, template, old_commit)
        check_edits(project, head, release, report)
        check_deletions(project, head, release, report)
    restore_ignored(project, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", required=True, help="the template's source (a git URL or clone)")
    parser.add_argument("--from", dest="old", required=True, help="the template version the project had")
    parser.add_argument("--project", type=Path, default=Path.cwd())
    parser.add_argument("--stage", choices=("before", "after"), default="after",
                        help="before: start the update's report; after: check the update (the default)")
    args = parser.parse_args(argv)
    os.dup2(2, 1)  # stdout belongs to an MCP server's protocol: everything, copier's output too, goes to stderr
    project = args.project.resolve()
    if args.stage == "before":
        update_report.start(project, git(project, "rev-parse", "HEAD").decode().strip())
        if ANSWERS in committed(project):
            keep_ignored(project, render_release(project, args.template, args.old))
        return 0
    try:
        report = guard(project, args.template, args.old)
    except Exception as error:  # the update must not pass for checked when it was not
        update_report.add(project, "guard", {"error": f"{type(error).__name__}: {error}"})
        print(f"update_guard: could not check that the update kept your edits ({type(error).__name__}: {error}); "
              "undo it with `git reset --hard` and `git clean -fd` (the tree was clean before it)", file=sys.stderr)
        return 1
    update_report.add(project, "guard", report)
    for lines in report.values():
        for line in lines:
            print(f"update_guard: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
