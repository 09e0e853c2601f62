"""Expected failures that scripts report to the user (see trainer/cli.py)."""

from __future__ import annotations

import os
from typing import Any

CALLER_ENV = "OLMO_CALLER"  # "mcp" when the olmo-fine-tuning-mcp server runs the script


class ConfigError(ValueError):
    """A configuration that cannot be used; `problems` lists one message per bad key."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid configuration in {source}:\n" + "\n".join(f"  - {p}" for p in problems))


class ProjectError(Exception):
    """An expected failure: a message for the user, a machine-readable kind and details."""

    kind = "error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = details or {}


def advice(cli: str, tool: str) -> str:
    """How to act on an error, in the caller's words: the script's flags at a shell, the MCP
    tools and their arguments when the server runs the script."""
    return tool if os.environ.get(CALLER_ENV) == "mcp" else cli
