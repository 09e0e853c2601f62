"""Which template release the bundled copy is, and how a project made from it records that.

A wheel carries the template without its git history, so copier writes no `_commit` for
projects generated from it. copier update needs one (it re-renders the old version to
merge), so the server records it: the release tag (vX.Y.Z) of a release build, or the commit
of a development build, both names that resolve in the template's git repository.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import yaml

from mcp_wrapper import __version__

DEV = re.compile(r"\+g([0-9a-f]{7,40})")


def release_ref(version: str = __version__) -> Optional[str]:
    """The git name of the template this package bundles: its tag or its commit."""
    if re.fullmatch(r"\d+(\.\d+)*", version) and version != "0.0.0":
        return f"v{version}"
    match = DEV.search(version)
    return match[1] if match else None


def record_source(project: Path, src_path: str, commit: Optional[str]) -> dict:
    """Rewrite the project's .copier-answers.yml with where and which template it came from."""
    path = project / ".copier-answers.yml"
    text = path.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    answers = yaml.safe_load(text) or {}
    answers["_src_path"] = src_path
    if commit:
        answers["_commit"] = commit
    ordered = {k: answers[k] for k in ("_commit", "_src_path") if k in answers} | {
        k: v for k, v in answers.items() if k not in ("_commit", "_src_path")}
    path.write_text(header + yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True))
    return ordered
