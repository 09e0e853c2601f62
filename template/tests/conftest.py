"""Fixtures: a scratch copy of this project (its config, and the template's sample data from
tests/samples/) so tests never touch the real data/ folder and keep passing after you replace
the samples with your own data."""

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
    """A temporary project root with a copy of config/ and the sample data in data/raw/."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copytree(ROOT / "tests" / "samples", tmp_path / "data" / "raw")
    return tmp_path


@pytest.fixture
def config(project: Path):
    return load_config(project / "config" / "fine_tuning_config.yaml", environ={})
