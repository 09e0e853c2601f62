"""The trainer package's layout holds: each room imports only the ground floor and the rooms
before it (lazy imports inside functions included), no modules import each other in a circle,
and every module stays small enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[1] / "trainer"
# The order of the rooms (trainer/__init__.py): a room may import only those before it.
ROOMS = ["data", "models", "runs", "observe", "engines", "evaluate", "export"]
# The ground floor every room may use; a module of your own beside it may import any room.
GROUND = {"trainer", "trainer.errors", "trainer.files", "trainer.config", "trainer.config_overrides",
          "trainer.config_file", "trainer.guard", "trainer.cli"}
MAX_LINES = 425


def module_name(path: Path) -> str:
    parts = path.relative_to(TRAINER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int:
    """0 for the ground floor (trainer.config, trainer.errors...), then the rooms in order, then
    the project's own modules beside the ground floor."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ROOMS:
        return ROOMS.index(parts[1]) + 1
    return 0 if module in GROUND else len(ROOMS) + 1


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported trainer module, at import time?) for every import in the file: absolute and
    relative ones, `importlib.import_module("trainer...")`, at module level (inside `try`/`if`
    too) or inside functions (lazy)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = modules()
    found = []

    def target(module: str, names: list[str]) -> list[str]:
        subs = [f"{module}.{n}" for n in names if known.get(f"{module}.{n}")]  # `from trainer.data import weighting`
        return subs if len(subs) == len(names) else [module, *subs]

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package the file is in
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                if base.split(".")[0] == "trainer":
                    found.extend((t, not lazy) for t in target(base, [a.name for a in child.names]))
            elif isinstance(child, ast.Import):
                found.extend((a.name, not lazy) for a in child.names if a.name.split(".")[0] == "trainer")
            elif (isinstance(child, ast.Call) and getattr(child.func, "attr", getattr(child.func, "id", None))
                  in ("import_module", "__import__") and child.args and isinstance(child.args[0], ast.Constant)
                  and str(child.args[0].value).split(".")[0] == "trainer"):
                found.append((str(child.args[0].value), not lazy))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in TRAINER.rglob("*.py")}


def test_every_module_belongs_to_a_room_or_the_ground_floor():
    rooms = {p.name for p in TRAINER.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert rooms == set(ROOMS), "a new folder in trainer/ needs its place in the rooms' order"
    for room in ROOMS:
        assert (TRAINER / room / "__init__.py").read_text().strip().startswith('"""'), f"{room}/ says what it holds"


def test_no_room_imports_a_later_one():
    assert GROUND <= set(modules()), "the ground floor is all there"
    wrong = [f"{name} imports {target}" for name, path in modules().items() for target, _ in imports(path)
             if rank(target) > rank(name)]
    assert wrong == []


def test_no_import_circles():
    graph = {name: {t for t, top in imports(path) if top and t != name} for name, path in modules().items()}
    circles = []

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            circles.append(trail[trail.index(node):] + [node])
            return
        for nxt in sorted(graph.get(node, ())):
            if nxt in graph:
                visit(nxt, trail + [node])

    for start in graph:
        visit(start, [])
    assert circles == []


def test_modules_stay_small():
    large = {name: n for name, path in modules().items()
             if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert large == {}


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The checks above can fail: a data module importing the engines is caught."""
    fake = tmp_path / "trainer"
    (fake / "data").mkdir(parents=True)
    (fake / "engines").mkdir()
    (fake / "data" / "rows.py").write_text("def f():\n    from trainer.engines.loop import run\n")
    (fake / "data" / "cols.py").write_text("try:\n    from ..engines import loop\nexcept ImportError:\n    pass\n")
    (fake / "data" / "cells.py").write_text("import importlib\nimportlib.import_module('trainer.engines.loop')\n")
    (fake / "engines" / "loop.py").write_text("from trainer.data import rows\n")
    monkeypatch.setattr(__import__(__name__), "TRAINER", fake)
    wrong = sorted(f"{name} imports {target}" for name, path in modules().items() for target, _ in imports(path)
                   if rank(target) > rank(name))
    assert wrong == [f"trainer.data.{m} imports trainer.engines.loop" for m in ("cells", "cols", "rows")]
    assert ("trainer.engines.loop", True) in imports(fake / "data" / "cols.py"), "a try at module level runs on import"


def test_git_keeps_every_module(tmp_path):
    """The project's .gitignore keeps its artefact folders (models/, runs/...) out of git, and
    not the rooms of the same name inside trainer/."""
    import shutil
    import subprocess

    if shutil.which("git") is None:
        import pytest

        pytest.skip("git is not installed")
    project = TRAINER.parent
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(project / ".gitignore", tmp_path / ".gitignore")
    files = [str(p.relative_to(project)) for p in TRAINER.rglob("*.py")]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=tmp_path, text=True,
                             input="\n".join(files), capture_output=True).stdout.split()
    assert ignored == [] and len(files) > 30
    # the artefacts still are ignored
    probe = "models/tiny-llama/model.safetensors\nruns/r1/metrics.jsonl\n"
    assert subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=tmp_path, text=True, input=probe,
                          capture_output=True).stdout.split() == probe.split()
