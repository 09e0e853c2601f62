"""Fixtures: a scratch copy of this project (config and raw data) so tests never touch
the real data/ folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of config/ and data/raw/ in a temporary project root."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copytree(ROOT / "data" / "raw", tmp_path / "data" / "raw")
    return tmp_path


@pytest.fixture
def config(project: Path):
    return load_config(project / "config" / "fine_tuning_config.yaml", environ={})
