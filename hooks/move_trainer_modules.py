#!/usr/bin/env python
"""Copier migration (v0.3.0): carry a project's own changes into trainer/'s rooms.

    move_trainer_modules.py --template SRC --from OLD_COMMIT

Run by `copier update --trust` inside the project in the "after" stage (see `_migrations`
in copier.yml and hooks/README.md). v0.3.0 moved the flat trainer/*.py modules into rooms
(trainer/data/, trainer/models/, ...). Copier's update sees a moved module as one file
deleted and another added: a module the user never changed simply moves, but a module the
user changed would be deleted with their change. This script brings that change back:

- For each moved module the user changed (their committed version, HEAD, differs from the
  release it was generated from), a 3-way merge (`git merge-file`) of their version, the old
  release's and the new module writes the new module: their change is carried where it
  merges cleanly, and marked with copier's own conflict markers (`<<<<<<< before updating`,
  `>>>>>>> after updating`) where it does not, e.g. an edit in code that moved to another
  module when a module was split. The old file stays deleted; git history keeps it.
- `trainer.<old module>` imports and references are rewritten to the new names in the
  project's Python files the template does not own (the user's own modules, scripts, tests),
  in the carried modules, and in config/**/*.yaml and .env (module:function settings).

Idempotent: a second run finds nothing to carry (the old files are gone from the working
tree only, HEAD still has them, so it re-merges into the same result only while the new
module is untouched) and nothing to rewrite. Reports to stderr: over stdio, an MCP server's
stdout belongs to the protocol.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

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
SKIP_DIRS = {".git", ".venv", "venv", "runs", "models", "data", "exports", ".tmp", "node_modules", "__pycache__",
             "mlruns", "wandb", "emissions", "logs", "build", "dist"}
NAMES = "|".join(sorted(MOVES, key=len, reverse=True))
DOTTED = re.compile(r"(?<![\w.])trainer\.(" + NAMES + r")(?![\w])")
SLASHED = re.compile(r"(?<![\w/])trainer/(" + NAMES + r")\.py\b")
FROM = re.compile(r"^([ \t]*)from trainer import ([\w, ]+?)([ \t]*#.*)?$", re.M)
LABELS = ["-L", "before updating", "-L", "last update", "-L", "after updating"]


def git(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=check)


def path_of(module: str) -> str:
    return "trainer/" + module.replace(".", "/") + ".py"


def _group(match: re.Match) -> str:
    """`from trainer import a, b` with moved modules: one line per package."""
    indent, comment = match[1], match[3] or ""
    by_package: dict[str, list[str]] = {}
    for item in (s.strip() for s in match[2].split(",")):
        new = MOVES.get(item)
        package, name = ("trainer." + new.rsplit(".", 1)[0], new.rsplit(".", 1)[1]) if new else ("trainer", item)
        by_package.setdefault(package, []).append(name)
    return "\n".join(f"{indent}from {package} import {', '.join(names)}{comment}"
                     for package, names in sorted(by_package.items()))


def rewrite(text: str) -> str:
    """Old module names -> new ones; text without them comes back unchanged."""
    text = FROM.sub(lambda m: _group(m) if any(s.strip() in MOVES for s in m[2].split(",")) else m[0], text)
    text = DOTTED.sub(lambda m: "trainer." + MOVES[m[1]], text)
    return SLASHED.sub(lambda m: path_of(MOVES[m[1]]), text)


def carry(project: Path, template: Path, old_commit: str) -> tuple[list[str], list[str]]:
    """Merge the user's changes of moved modules into their new homes: (carried, conflicted)."""
    carried, conflicted = [], []
    for old, new in MOVES.items():
        old_path, new_path = f"trainer/{old}.py", project / path_of(new)
        mine = git("show", f"HEAD:./{old_path}", cwd=project, check=False)
        if mine.returncode != 0 or not new_path.is_file():
            continue  # not in the project before the update (removed by the user), or no new home
        released = git("show", f"{old_commit}:template/{old_path}", cwd=template, check=False)
        base = released.stdout if released.returncode == 0 else b""  # unknown release: all of it is theirs
        if mine.stdout == base:
            continue  # unchanged: the update moved it already
        if (project / old_path).is_file() and (project / old_path).read_bytes() == mine.stdout:
            (project / old_path).unlink()  # a copier that kept the old file: the merge below replaces it
        scratch = project / ".tmp" / "migration"
        scratch.mkdir(parents=True, exist_ok=True)
        files = {"mine": scratch / f"{old}.mine.py", "base": scratch / f"{old}.base.py"}
        files["mine"].write_bytes(mine.stdout)
        files["base"].write_bytes(base)
        merged = subprocess.run(["git", "merge-file", "-p", *LABELS, str(files["mine"]), str(files["base"]),
                                 str(new_path)], capture_output=True)
        for file in files.values():
            file.unlink()
        if merged.returncode < 0 or merged.returncode > 127:
            raise SystemExit(f"move_trainer_modules: git merge-file failed on {old_path}: {merged.stderr.decode()}")
        new_path.write_bytes(rewrite(merged.stdout.decode()).encode())
        note = f"{old_path} -> {path_of(new)}"
        if merged.returncode > 0:
            where = f" ({SPLIT[old]})" if old in SPLIT else ""
            conflicted.append(f"{note}: {merged.returncode} conflict(s) to resolve{where}")
        else:
            carried.append(f"{note}: your change carried")
    return carried, conflicted


def owned_by_template(project: Path, path: Path, template: Path) -> bool:
    """Whether the new template renders this file (then the update already wrote its new names)."""
    relative = path.relative_to(project).as_posix()
    return (template / "template" / relative).is_file() or (template / "template" / f"{relative}.jinja").is_file()


def rewrite_references(project: Path, template: Path, skip: set[Path]) -> list[str]:
    changed = []
    candidates = [p for p in project.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(project).parts[:-1])]
    candidates += [p for p in (project / "config").rglob("*.y*ml")] + [project / ".env"]
    for path in candidates:
        if not path.is_file() or path in skip or (path.suffix == ".py" and owned_by_template(project, path, template)):
            continue
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
        new = rewrite(text)
        if new != text:
            path.write_text(new, encoding="utf-8", errors="surrogateescape")
            changed.append(path.relative_to(project).as_posix())
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", required=True, type=Path, help="the template's checkout (a git clone)")
    parser.add_argument("--from", dest="old", required=True, help="the template version the project had")
    parser.add_argument("--project", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    project = args.project.resolve()
    carried, conflicted = carry(project, args.template, args.old)
    merged_files = {project / path_of(MOVES[n.split(" -> ")[0].removeprefix("trainer/").removesuffix(".py")])
                    for n in carried + conflicted}
    rewritten = rewrite_references(project, args.template, merged_files)
    for line in carried + conflicted:
        print(f"move_trainer_modules: {line}", file=sys.stderr)
    for path in rewritten:
        print(f"move_trainer_modules: {path}: trainer module names updated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
