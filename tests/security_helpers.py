"""What the security suites share: a layout with an allowed root, a folder outside it and
a sibling that shares its prefix; a fingerprint of everything below the layout; and a
way to replace a project folder by a link for the length of one attack."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import mcp_error
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings

# A lock file's holder line is rewritten by whoever takes the lock, and Python writes its
# bytecode caches: neither is the user's data.
NOT_DATA = {".lock", "__pycache__"}


def fingerprint(folder: Path) -> dict[str, str]:
    """Hashes of every file and the targets of every link below `folder` (links are not
    followed, so a link that leads out is recorded, not read through)."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        parts = set(path.relative_to(folder).parts)
        if parts & NOT_DATA:
            continue
        key = str(path.relative_to(folder))
        if path.is_symlink():
            seen[key] = "-> " + str(path.readlink())
        elif path.is_file():
            seen[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


@contextlib.contextmanager
def linked_out(path: Path, outside: Path) -> Iterator[Path]:
    """Replace `path` (a folder or file of a project) by a link to a copy of it outside the
    roots for the duration; put it back afterwards. Yields the copy outside."""
    copy = outside / f"{path.parent.name}-{path.name}"
    moved = path.with_name(path.name + ".moved-away")
    if path.exists():
        shutil.copytree(path, copy, symlinks=True) if path.is_dir() else shutil.copy2(path, copy)
        path.rename(moved)
    else:
        copy.mkdir(parents=True)
    path.symlink_to(copy, target_is_directory=copy.is_dir())
    try:
        yield copy
    finally:
        path.unlink()
        if moved.exists():
            moved.rename(path)
        shutil.rmtree(copy) if copy.is_dir() else copy.unlink()


def layout(top: Path) -> dict[str, Any]:
    """An allowed root and a folder outside it below `top`, and a server held to the root."""
    root, outside = top / "projects", top / "outside"
    root.mkdir()
    outside.mkdir()
    return {"top": top, "root": root, "outside": outside,
            "server": build_server(Settings(output_dir=root, allowed_roots=[root]))}


def refused(env: dict[str, Any], tool: str, arguments: dict, *expected: str) -> str:
    """Call `tool`; it must fail with every `expected` text in its message and change nothing."""
    before = fingerprint(env["top"])
    text = mcp_error(env["server"], tool, arguments)
    for part in expected:
        assert part in text, f"{part!r} not in {text!r}"
    assert fingerprint(env["top"]) == before, f"{tool} changed files while refusing"
    return text
