"""Change one value of config/fine_tuning_config.yaml in place, keeping its comments, order
and every other line as the user wrote them (a YAML round trip would drop the comments).
The changed file must still load as a valid config before it replaces the old one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from trainer.config import load_config
from trainer.errors import ProjectError
from trainer.files import write_atomic

KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<rest>.*)$")


def _located(lines: list[str], dotted: str) -> int:
    """The index of the line holding `dotted` (e.g. base_model.local_path) as a block key."""
    wanted = dotted.split(".")
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    for index, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [key for _, key in stack] + [match["key"]]
        if path == wanted:
            return index
        stack.append((indent, match["key"]))
    raise ProjectError(f"{dotted} is not written in the config file; add it by hand under its section")


def set_value(path: Path, dotted: str, value: Any) -> None:
    """Write `dotted: value` (a scalar) into the config file, atomically, after checking that
    the result still loads; a trailing comment on that line is kept."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    index = _located(lines, dotted)
    match = KEY_LINE.match(lines[index])
    rest = match["rest"]
    comment = re.search(r"\s+#[^'\"]*$", rest)  # a trailing comment without quotes in it
    shown = "null" if value is None else json.dumps(value, ensure_ascii=False)  # JSON scalars are YAML
    lines[index] = f"{match['indent']}{match['key']}: {shown}{comment.group(0) if comment else ''}"
    changed = "\n".join(lines)
    candidate = path.with_name(f".check-{path.name}")
    try:
        write_atomic(candidate, changed)
        load_config(candidate, root=path.parent.parent)  # raises ConfigError naming the field
    finally:
        candidate.unlink(missing_ok=True)
    write_atomic(path, changed)
