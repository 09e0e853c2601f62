#!/usr/bin/env python
"""Copier migration: rename a config key in a generated project, keeping comments.

    rename_config_key.py training.save_steps training.checkpoint_steps

Run by `copier update --trust` inside the project in the "after" stage (see
`_migrations` in copier.yml and hooks/README.md). The template's own config lines arrive
renamed through the update's 3-way merge; this renames what the template does not
manage but the user owns:

- config/**/*.yaml (the main config if it still has the old key, and any other YAML the
  user keeps there): the key's own line only, so comments and formatting stay;
- .env: OLMO_<OLD>=... becomes OLMO_<NEW>=... .

It is idempotent (a file without the old key is left alone), refuses to rename across
sections, leaves files with merge-conflict markers for the user, and checks each
rewrite by parsing the file before and after: if the data changed in any way other than
the rename, nothing is written. Standard library + PyYAML (a dependency of copier).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import update_report  # noqa: E402  (beside this file)

KEY_LINE = re.compile(r"^(?P<indent>[ ]*)(?P<key>[A-Za-z0-9_-]+)(?P<rest>[ ]*:(?:[ ].*|)\n?)$")


class MigrationError(Exception):
    pass


def rename_in_yaml(text: str, old: list[str], new: list[str]) -> str:
    """`text` with the mapping key at path `old` renamed to `new` (same parent section)."""
    stack: list[tuple[int, str]] = []
    lines = text.splitlines(keepends=True)
    for number, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if [key for _, key in stack] == old:
            lines[number] = f"{match['indent']}{new[-1]}{match['rest']}"
            stack[-1] = (indent, new[-1])
    return "".join(lines)


def _moved(data: object, old: list[str], new: list[str]) -> object:
    """The parsed data as it should be after the rename (for checking the text rewrite)."""
    if not isinstance(data, dict):
        return data
    node = data
    for key in old[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return data
    if isinstance(node, dict) and old[-1] in node:
        if new[-1] in node:
            raise MigrationError(f"both {'.'.join(old)} and {'.'.join(new)} exist; resolve by hand")
        node[new[-1]] = node.pop(old[-1])
    return data


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def migrate_yaml(path: Path, old: list[str], new: list[str]) -> bool:
    text = path.read_text(encoding="utf-8")
    if re.search(r"^(<{7}|>{7}) ", text, re.MULTILINE):
        print(f"rename_config_key: {path} has merge conflicts; rename {'.'.join(old)} there by hand",
              file=sys.stderr)
        return False
    rewritten = rename_in_yaml(text, old, new)
    if rewritten == text:
        return False
    expected = _moved(yaml.safe_load(text), old, new)
    if yaml.safe_load(rewritten) != expected:
        raise MigrationError(f"{path}: renaming {'.'.join(old)} would change other data; edit it by hand")
    write_atomic(path, rewritten)
    return True


def env_name(path: list[str]) -> str:
    return "OLMO_" + "__".join(part.upper() for part in path)


def migrate_env(path: Path, old: list[str], new: list[str]) -> bool:
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(rf"^(\s*(?:export\s+)?){re.escape(env_name(old))}=", re.MULTILINE)
    rewritten = pattern.sub(lambda m: f"{m.group(1)}{env_name(new)}=", text)
    if rewritten == text:
        return False
    write_atomic(path, rewritten)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="dotted key path, e.g. training.save_steps")
    parser.add_argument("new", help="dotted key path in the same section, e.g. training.checkpoint_steps")
    parser.add_argument("--project", default=".", help="the generated project (default: current directory)")
    args = parser.parse_args(argv)
    old, new = args.old.split("."), args.new.split(".")
    if old[:-1] != new[:-1]:
        print(f"rename_config_key: {args.old} -> {args.new} moves between sections; only renames are supported",
              file=sys.stderr)
        return 2
    project = Path(args.project)
    changed = []
    try:
        for path in sorted((project / "config").rglob("*.y*ml")):
            if migrate_yaml(path, old, new):
                changed.append(path)
        env = project / ".env"
        if env.is_file() and migrate_env(env, old, new):
            changed.append(env)
    except MigrationError as error:
        print(f"rename_config_key: {error}", file=sys.stderr)
        return 1
    for path in changed:
        print(f"rename_config_key: {args.old} -> {args.new} in {path.relative_to(project)}", file=sys.stderr)
    update_report.rewrote(project.resolve(), [path.resolve().relative_to(project.resolve()).as_posix()
                                              for path in changed])
    return 0


if __name__ == "__main__":
    sys.exit(main())
