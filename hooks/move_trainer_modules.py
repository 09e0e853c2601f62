#!/usr/bin/env python
"""Copier migration (v0.3.0): carry a project's own changes into trainer/'s rooms.

    move_trainer_modules.py --template SRC --from OLD_COMMIT

Run by `copier update --trust` inside the project in the "after" stage (see `_migrations`
in copier.yml and hooks/README.md). v0.3.0 moved the flat trainer/*.py modules into rooms
(trainer/data/, trainer/models/, ...). Copier's update sees a moved module as one file
deleted and another added: a module the user never changed simply moves, but a module the
user changed is deleted with their change. This script brings that change back:

- For each moved module the user changed (their committed version, HEAD, differs from the
  release it was generated from), their version and the release's are brought to the new
  names, then 3-way merged into the new module (`git merge-file`): their change is carried
  where it merges cleanly, and marked with copier's own conflict markers (`<<<<<<< before
  updating`, `>>>>>>> after updating`) and recorded as unmerged in git's index where it does
  not, e.g. an edit in code that moved to another module when a module was split.
- `trainer.<old module>` imports and references are rewritten to the new names in the
  project's Python files (its own modules, scripts, tests), config/**/*.yaml, pyproject.toml
  and .env (module:function settings). Text already in the new layout is left as it is, so a
  second run changes nothing.
- It reports to stderr (over stdio, an MCP server's stdout belongs to the protocol): what it
  carried, the conflicts, old names it could not rewrite, and modules of the user's own that a
  new room's package hides. A module it cannot merge is reported and skipped; git's HEAD keeps
  the user's version.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import update_report  # noqa: E402  (beside this file)
from update_guard import LABELS, record_conflict  # noqa: E402  (copier's labels and index stages)

# trainer/<old>.py -> trainer/<new>.py, as released in v0.3.0
MOVES = {
    "dataset_preparator": "data.dataset_preparator",
    "data_import": "data.data_import",
    "training_data": "data.training_data",
    "weighting": "data.weighting",
    "model_config": "models.model_config",
    "tiny_model": "models.tiny_model",
    "base_model": "models.base_model",
    "adapters": "models.adapters",
    "export_engines": "models.merge",
    "training_run_manager": "runs.training_run_manager",
    "emissions": "observe.emissions",
    "tracking": "observe.tracking",
    "monitor_api": "observe.monitor_api",
    "base_trainer": "engines.base_trainer",
    "mlx_trainer": "engines.mlx_trainer",
    "transformers_trainer": "engines.transformers_trainer",
    "distributed": "engines.distributed",
    "pipeline": "engines.pipeline",
    "evaluation": "evaluate.evaluation",
    "generation": "evaluate.generation",
    "export": "export.export",
    "export_target": "export.export_target",
    "gguf_export": "export.gguf_export",
    "gguf_check": "export.gguf_check",
    "hub": "export.hub",
    "model_card": "export.model_card",
}
# Parts of a module that moved to a module of their own: an edit there conflicts; this says where.
SPLIT = {
    "dataset_preparator": "reading files went to trainer/data/readers.py, mapping rows to trainer/data/records.py",
    "pipeline": "backend choice went to trainer/engines/backends.py, RunRecorder/Progress/EmissionsProbe to "
                "trainer/engines/recorder.py",
    "base_trainer": "TrainingCallback went to trainer/observe/callbacks.py",
    "tiny_model": "check() went to trainer/models/checks.py",
    "export": "architecture() and check_planned() went to trainer/models/gguf_support.py",
    "gguf_export": "SUPPORTED, tokenizer_pre() and GGUFError went to trainer/models/gguf_support.py",
}
EXPORT_ROOM = ("export", "export_target", "gguf_export", "gguf_check", "gguf_quantize", "go_template", "hub",
               "model_card", "ollama")
# Folders never searched: tools' and git's anywhere, the project's artefacts at its top level.
SKIP_ANYWHERE = {".git", ".venv", "venv", "node_modules", "__pycache__", ".tmp", ".mypy_cache", ".ruff_cache"}
SKIP_TOP = {"runs", "models", "data", "exports", "emissions", "logs", "mlruns", "wandb", "build", "dist"}
ROOMS = ("data", "models", "runs", "observe", "engines", "evaluate", "export")
NAMES = "|".join(sorted(MOVES, key=len, reverse=True))
ITEMS = r"(?:\((?P<paren>[^)]*)\)|(?P<plain>[\w, \t]+?))"
# One pass over the text, so nothing rewritten is read again: `from trainer import ...` (one line
# or parenthesised), `from trainer.export import ...` (the old module, unless it imports the new
# room's modules), dotted names (not `trainer.export.<module of the room>`), and file paths.
PATTERN = re.compile(
    r"^(?P<indent>[ \t]*)from trainer(?P<sub>\.export)? import " + ITEMS + r"(?P<comment>[ \t]*#[^\n]*)?$"
    r"|(?<![\w.])trainer\.(?P<dotted>" + NAMES + r")(?![\w])(?!\.(?:" + "|".join(EXPORT_ROOM) + r")\b)"
    r"|(?<![\w/])trainer/(?P<slashed>" + NAMES + r")\.py\b", re.M)
LEFTOVER = re.compile(r"from[ \t]+trainer[ \t]+import[^\n;]*\b(" + NAMES + r")\b|import[ \t]+trainer\.(" + NAMES
                      + r")\b")


def git(*args: str, cwd: Path, check: bool = True, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=check, input=stdin)


def path_of(module: str) -> str:
    return "trainer/" + module.replace(".", "/") + ".py"


def _items(text: str) -> list[tuple[str, str | None]]:
    """`a, b as c` (comments and newlines of a parenthesised list allowed) -> [(a, None), (b, c)]."""
    text = re.sub(r"#[^\n]*", "", text)
    out = []
    for item in (part.strip() for part in text.replace("\n", " ").split(",")):
        if item:
            name, _, alias = (s.strip() for s in item.partition(" as "))
            out.append((name, alias or None))
    return out


def _imports(match: re.Match) -> str:
    items = _items(match["paren"] if match["paren"] is not None else match["plain"])
    if match["sub"]:  # `from trainer.export import`: the old module, or the new room's modules
        if all(name in EXPORT_ROOM for name, _ in items):
            return match[0]
        return match[0].replace("from trainer.export import", "from trainer.export.export import", 1)
    if not any(name in MOVES for name, _ in items):
        return match[0]
    by_package: dict[str, list[str]] = {}
    for name, alias in items:
        package, module = "trainer", name
        if name in MOVES:
            room, module = MOVES[name].rsplit(".", 1)
            package = f"trainer.{room}"
            alias = alias or (name if module != name else None)  # the code keeps using the old name
        by_package.setdefault(package, []).append(module + (f" as {alias}" if alias else ""))
    comment = match["comment"] or ""  # on every line: a noqa comment means each of them
    return "\n".join(f"{match['indent']}from {package} import {', '.join(names)}{comment}"
                     for package, names in sorted(by_package.items()))


def _replace(match: re.Match) -> str:
    if match["dotted"]:
        return "trainer." + MOVES[match["dotted"]]
    if match["slashed"]:
        return path_of(MOVES[match["slashed"]])
    return _imports(match)


def rewrite(text: str) -> str:
    """Old module names -> new ones. Text of the new layout, or without old names, comes back
    unchanged, so rewriting twice is rewriting once."""
    return PATTERN.sub(_replace, text)


def leftovers(text: str) -> list[str]:
    """Old module names in import forms the rewrite does not handle (e.g. after a `;`)."""
    return sorted({a or b for a, b in LEFTOVER.findall(text)})


def decode(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")  # any byte survives the round trip


def encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def carry(project: Path, template: Path, old_commit: str) -> tuple[dict[str, dict[str, str]], list[str], list[str]]:
    """Merge the user's changes of moved modules into their new homes: ({old path: {"to": new path,
    "state": carried | conflict}}, report lines, problems)."""
    moves: dict[str, dict[str, str]] = {}
    carried, conflicted, problems = [], [], []
    scratch = project / ".tmp" / "migration"
    for old, new in MOVES.items():
        old_path, new_path = f"trainer/{old}.py", project / path_of(new)
        mine = git("show", f"HEAD:./{old_path}", cwd=project, check=False)
        if mine.returncode != 0 or not new_path.is_file():
            continue  # not in the project before the update (removed by the user), or no new home
        released = git("show", f"{old_commit}:template/{old_path}", cwd=template, check=False)
        if released.returncode != 0:
            problems.append(f"{old_path}: the release {old_commit} could not be read from the template, so a change "
                            f"of yours cannot be told apart; if you changed it, `git show HEAD:{old_path}` has it")
            continue
        if mine.stdout == released.stdout:
            continue  # unchanged: the update moved it already
        try:
            scratch.mkdir(parents=True, exist_ok=True)
            ours, base = encode(rewrite(decode(mine.stdout))), encode(rewrite(decode(released.stdout)))
            theirs = new_path.read_bytes()
            files = {"mine": scratch / f"{old}.mine.py", "base": scratch / f"{old}.base.py"}
            files["mine"].write_bytes(ours)
            files["base"].write_bytes(base)
            merged = subprocess.run(["git", "merge-file", "-p", *LABELS, str(files["mine"]), str(files["base"]),
                                     str(new_path)], capture_output=True)
            for file in files.values():
                file.unlink()
            if not 0 <= merged.returncode <= 127:
                raise RuntimeError(f"git merge-file failed: {decode(merged.stderr).strip()}")
            if (project / old_path).is_file() and (project / old_path).read_bytes() == mine.stdout:
                (project / old_path).unlink()  # a copier that kept the old file: the merge replaces it
            new_path.write_bytes(merged.stdout)
        except Exception as error:  # one module's trouble does not stop the others
            problems.append(f"{old_path}: not carried ({error}); `git show HEAD:{old_path}` has your version")
            continue
        note = f"{old_path} -> {path_of(new)}"
        if merged.returncode > 0:
            record_conflict(project, path_of(new), "100644", base, ours, theirs)
            where = f" ({SPLIT[old]})" if old in SPLIT else ""
            conflicted.append(f"{note}: {merged.returncode} conflict(s) to resolve{where}")
        else:
            carried.append(f"{note}: your change carried")
        moves[old_path] = {"to": path_of(new), "state": "conflict" if merged.returncode > 0 else "carried"}
    if scratch.is_dir() and not any(scratch.iterdir()):
        scratch.rmdir()
    return moves, carried + conflicted, problems


def candidates(project: Path) -> list[Path]:
    """The project's Python files, config YAML, pyproject.toml and .env (no links: a link's
    target may lie outside the project)."""
    found = []
    for folder, dirs, files in os.walk(project):
        here = Path(folder)
        dirs[:] = [d for d in dirs if d not in SKIP_ANYWHERE and not d.startswith(".venv")
                   and not (here == project and d in SKIP_TOP)]
        for name in files:
            path = here / name
            if path.is_symlink():
                continue
            if name.endswith(".py") or (here == project and name in (".env", "pyproject.toml")) or (
                    name.endswith((".yaml", ".yml")) and (project / "config") in (here, *here.parents)):
                found.append(path)
    return found


def rewrite_references(project: Path, skip: set[Path]) -> tuple[list[str], list[str]]:
    """Rewrite old names in every candidate file: (files changed, files with old names left)."""
    changed, left = [], []
    for path in candidates(project):
        if path in skip:
            continue
        data = path.read_bytes()
        text = decode(data)
        new = rewrite(text)
        if new != text:
            path.write_bytes(encode(new))  # bytes in, bytes out: line endings stay as they were
            changed.append(path.relative_to(project).as_posix())
        if rest := leftovers(new):
            left.append(f"{path.relative_to(project).as_posix()}: still names {', '.join(rest)}")
    return changed, left


def shadowed(project: Path) -> list[str]:
    """A module of the user's own named like a new room is hidden by the room's package."""
    return [f"trainer/{room}.py is hidden by the new trainer/{room}/ package; rename it" for room in ROOMS
            if room != "export" and (project / "trainer" / f"{room}.py").is_file()]


def old_layout(project: Path, template: Path, old_commit: str) -> bool:
    """Whether the project came from a release of the flat layout and its last commit still has a
    module that moved (a module of the user's own named like an old one is not a reason)."""
    flat = git("cat-file", "-e", f"{old_commit}:template/trainer/pipeline.py", cwd=template, check=False)
    listed = git("ls-tree", "--name-only", "HEAD", "trainer/", cwd=project, check=False).stdout.decode()
    return flat.returncode == 0 and any(f"trainer/{old}.py" in listed.splitlines() for old in MOVES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", required=True, type=Path, help="the template's checkout (a git clone)")
    parser.add_argument("--from", dest="old", required=True, help="the template version the project had")
    parser.add_argument("--project", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    project = args.project.resolve()
    if not old_layout(project, args.template, args.old):  # by what the project holds, not version numbers
        return 0
    moves, lines, problems = carry(project, args.template, args.old)
    rewritten, left = rewrite_references(project, {project / entry["to"] for entry in moves.values()})
    needs_you = problems + left + shadowed(project)
    update_report.add(project, "layout", {"moves": moves, "needs_you": needs_you})
    update_report.rewrote(project, rewritten)
    report = lines + [f"{path}: trainer module names updated" for path in rewritten]
    for line in report + needs_you:
        print(f"move_trainer_modules: {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
