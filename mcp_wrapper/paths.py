"""Path and name checks for every tool argument.

A path is resolved (symlinks followed, '..' collapsed) and must then lie inside one of the
server's allowed roots, and inside one of the client's roots when the client sent any.
"Inside" compares resolved path components (Path.is_relative_to), never string prefixes,
so /srv/projects-evil is not inside /srv/projects.
"""

from __future__ import annotations

import re
from pathlib import Path

from mcp.server.mcpserver.exceptions import ToolError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")


def check_name(value: str, what: str) -> str:
    """Project and run names: letters, digits, '.', '_' and '-', starting with a letter or
    digit (so never an option like '--x', never ';' or '$(...)')."""
    if not isinstance(value, str) or not NAME.match(value) or ".." in value:
        raise ToolError(f"{what} {value!r} is not allowed: use letters, digits, '.', '_' and '-', starting with a "
                        "letter or digit (at most 80 characters)")
    return value


def inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve(value: str | Path, roots: list[Path], client_roots: list[Path] | None, base: Path, what: str) -> Path:
    """`value` as an absolute, symlink-free path that lies inside the allowed roots."""
    if not isinstance(value, (str, Path)) or not str(value).strip() or "\x00" in str(value):
        raise ToolError(f"{what} must be a non-empty path")
    path = Path(value).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not inside(path, roots):
        raise ToolError(f"{what} {str(value)!r} resolves to {path}, which is outside the allowed roots "
                        f"({', '.join(map(str, roots))})")
    if client_roots and not inside(path, client_roots):
        raise ToolError(f"{what} {str(value)!r} resolves to {path}, which is outside the client's roots "
                        f"({', '.join(map(str, client_roots))})")
    return path
