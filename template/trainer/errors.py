"""Expected failures that scripts report to the user (see trainer/cli.py)."""

from __future__ import annotations

from typing import Any


class ProjectError(Exception):
    """An expected failure: a message for the user, a machine-readable kind and details."""

    kind = "error"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = details or {}
