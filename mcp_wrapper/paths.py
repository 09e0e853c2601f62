"""Path and name checks for every path the server touches: tool arguments and the paths
derived from them (a project's folders, a run's folder and files).

A path is resolved (symlinks followed, '..' collapsed) and must then lie inside one of the
server's allowed roots, and inside one of the client's roots when the client sent any.
"Inside" compares resolved path components (Path.is_relative_to), never string prefixes,
so /srv/projects-evil is not inside /srv/projects. Over-long names and paths are refused
before the file system sees them, and any OSError is reported with the argument's name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mcp.server.mcpserver.exceptions import ToolError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
NAME_MAX = 255  # bytes in one path component (NAME_MAX on Linux and macOS)
PATH_MAX = 4096  # bytes in a whole path (PATH_MAX on Linux)


def check_name(value: str, what: str) -> str:
    """Project and run names: letters, digits, '.', '_' and '-', starting with a letter or
    digit, matched in full (no trailing newline), at most 80 characters; so never an option
    like '--x', never ';', '$(...)', '/', '..' or a control character."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        raise ToolError(f"{what} {value!r} is not allowed: use letters, digits, '.', '_' and '-', starting with a "
                        "letter or digit (at most 80 characters)")
    return value


def inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def check_length(value: str, what: str) -> None:
    """Refuse what the file system would refuse with ENAMETOOLONG, naming the argument."""
    encoded = os.fsencode(value)
    if len(encoded) > PATH_MAX:
        raise ToolError(f"{what} is {len(encoded)} bytes long; paths may have at most {PATH_MAX}")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise ToolError(f"{what} has a path component of {len(longest)} bytes ({os.fsdecode(longest[:40])}...); "
                        f"at most {NAME_MAX} are allowed")


def resolve(value: str | Path, roots: list[Path], client_roots: list[Path] | None, base: Path, what: str) -> Path:
    """`value` as an absolute, symlink-free path that lies inside the allowed roots."""
    if not isinstance(value, (str, Path)) or not str(value).strip() or "\x00" in str(value):
        raise ToolError(f"{what} must be a non-empty path without NUL characters")
    check_length(str(value), what)
    try:
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else base / path)
        check_length(str(path), what)
        path = path.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop, a name the file system refuses
        raise ToolError(f"{what} {str(value)!r} cannot be resolved: {error}") from None
    if not inside(path, roots):
        raise ToolError(f"{what} {str(value)!r} resolves to {path}, which is outside the allowed roots "
                        f"({', '.join(map(str, roots))})")
    if client_roots and not inside(path, client_roots):
        raise ToolError(f"{what} {str(value)!r} resolves to {path}, which is outside the client's roots "
                        f"({', '.join(map(str, client_roots))})")
    return path
