"""Fixtures: a scratch copy of this project (its config, and the template's sample data from
tests/samples/) so tests never touch the real data/ folder and keep passing after you replace
the samples with your own data."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.config import load_config  # noqa: E402
from trainer.data.training_data import TokenizedSet  # noqa: E402


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A temporary project root with a copy of config/ (SFT stages) and the sample data in data/raw/."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    shutil.copytree(ROOT / "tests" / "samples", tmp_path / "data" / "raw")
    # the samples are plain rows: the tests train SFT stages whatever the project's methods are
    config = tmp_path / "config" / "fine_tuning_config.yaml"
    config.write_text(re.sub(r"^(\s+method:) (dpo|orpo)\b", r"\1 sft", config.read_text(), flags=re.M))
    return tmp_path


@pytest.fixture
def config(project: Path):
    return load_config(project / "config" / "fine_tuning_config.yaml", environ={})


def rows(vocabulary: int, count: int = 6, seed: int = 3) -> TokenizedSet:
    """Rows of random tokens and widely varying length, a masked prompt in most."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(4, 40, size=count)
    tokens = [rng.integers(0, vocabulary, size=int(n)).tolist() for n in lengths]
    starts = [int(rng.integers(1, n - 1)) for n in lengths]
    return TokenizedSet(tokens=tokens, starts=starts, quality=[None] * count)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny llama whose output layer is its tied embedding (as SmolLM2's); building it needs torch
    and transformers (a project installed for mlx alone skips the tests that use it)."""
    for module in ("torch", "transformers", "safetensors"):
        pytest.importorskip(module)
    from safetensors.torch import load_file, save_file

    from trainer.models import tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    tiny_model.build("llama", folder, ["a tiny corpus for a tokenizer"] * 4, seed=2, verify=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"tie_word_embeddings": True}))
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder
