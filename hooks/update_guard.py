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
  recorded as copier records its own).

A template file the user deleted that the update brought back is deleted again when the template
did not change it, else recorded as a conflict. What it did goes to the update report (`guard`)
and to stderr; nothing goes to stdout, which an MCP server's stdio belongs to.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import update_report  # noqa: E402  (beside this file)

ANSWERS = ".copier-answers.yml"
LABELS = ["-L", "before updating", "-L", "last update", "-L", "after updating"]
MARKERS = (b"<<<<<<< before updating", b">>>>>>> after updating")


def git(project: Path, *args: str, stdin: bytes | None = None, check: bool = True) -> bytes:
    argv = ["git", "-c", "core.hooksPath=" + os.devnull, "-c", "core.fsmonitor=false", *args]
    return subprocess.run(argv, cwd=project, input=stdin, capture_output=True, check=check).stdout


def blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def render_release(template: str, commit: str, answers_text: bytes, into: Path) -> dict[str, bytes]:
    """The project as the release `commit` made it, with the project's own answers: {path: bytes}."""
    import yaml
    from copier import run_copy

    answers = yaml.safe_load(answers_text) or {}
    data = {key: value for key, value in answers.items() if not key.startswith("_")}
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
    return {name.decode("utf-8", "surrogateescape") for name in git(project, "diff", "--name-only", "--diff-filter=U",
                                                                       "-z").split(b"\0") if name}


def write_blob(project: Path, data: bytes) -> str:
    return git(project, "hash-object", "-w", "--stdin", stdin=data).decode().strip()


def record_conflict(project: Path, name: str, mode: str, base: str | None, mine: str | None,
                    theirs: str | None) -> None:
    """Stages 1-3 in git's index as a merge records them (a missing side: added or deleted there)."""
    entries = [f"0 {'0' * 40}\t{name}"] + [f"{mode} {sha} {stage}\t{name}" for stage, sha in
                                           ((1, base), (2, mine), (3, theirs)) if sha]
    git(project, "update-index", "--index-info", stdin=("\n".join(entries) + "\n").encode())


def missing_lines(mine: bytes, base: bytes, result: bytes) -> list[bytes]:
    """Lines the user added (more often in theirs than in the base) that the result lacks."""
    def count(data: bytes) -> Counter:
        return Counter(line.rstrip() for line in data.splitlines() if line.strip())

    added, now = count(mine) - count(base), count(result)
    return [line for line, times in added.items() if now[line] < times]


def guard(project: Path, template: str, old_commit: str) -> dict[str, list[str]]:
    """Check and repair the update's result; returns the report's lines by kind."""
    report: dict[str, list[str]] = {"restored": [], "merged_back": [], "conflicts": [], "deleted_again": []}
    head = committed(project)
    if ANSWERS not in head:
        return report
    with tempfile.TemporaryDirectory(prefix="olmo-update-guard.") as scratch:
        release = render_release(template, old_commit, git(project, "show", f"HEAD:./{ANSWERS}"),
                                 Path(scratch) / "release")
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
            record_conflict(project, name, mode, write_blob(project, base) if base is not None else None, sha, None)
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
        with tempfile.TemporaryDirectory(prefix="olmo-update-guard.") as scratch:
            files = {"mine": Path(scratch) / "mine", "base": Path(scratch) / "base", "result": Path(scratch) / "result"}
            for key, data in (("mine", mine), ("base", base or b""), ("result", result)):
                files[key].write_bytes(data)
            merged = subprocess.run(["git", "merge-file", "-p", *LABELS, str(files["mine"]), str(files["base"]),
                                     str(files["result"])], capture_output=True)
        if not 0 <= merged.returncode <= 127:
            raise RuntimeError(f"{name}: git merge-file failed: {merged.stderr.decode(errors='replace').strip()}")
        here.write_bytes(merged.stdout)
        if merged.returncode:
            record_conflict(project, name, mode, write_blob(project, base) if base is not None else None, sha,
                            write_blob(project, result))
            report["conflicts"].append(f"{name}: the update dropped lines you added; merged back with "
                                       f"{merged.returncode} conflict(s) to resolve")
        else:
            report["merged_back"].append(f"{name}: the update dropped lines you added; merged back")
    for name, base in sorted(release.items()):  # template files the user deleted, brought back
        here = project / name
        if name in head or name in open_conflicts or not here.is_file() or here.is_symlink():
            continue
        result = here.read_bytes()
        if result == base:
            here.unlink()
            git(project, "update-index", "--force-remove", "--", name)
            report["deleted_again"].append(f"{name}: you had deleted it; the update brought it back; deleted again")
        else:
            record_conflict(project, name, "100644", write_blob(project, base), None, write_blob(project, result))
            report["conflicts"].append(f"{name}: you had deleted it and the new template changed it; it is back, "
                                       "unmerged: `git rm` keeps it deleted, `git add` takes the new version")
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
