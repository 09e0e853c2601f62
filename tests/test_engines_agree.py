"""Where a model meets mlx it carries the model's real RoPE, and generation after an evaluation
runs in eval mode (issue 15, items 1 and 2; the real model's version of these checks comes with
it). transformers 5 saves `rope_parameters` and no top-level `rope_theta`; mlx-lm then used its
default base 10,000, so a model with another base (SmolLM2 has 100,000) loaded, ran and was wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import render, script

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx_lm")

PROBE = """
import json, sys
import numpy as np
from trainer.config import load_config
from trainer.engines.backends import make_backend
from trainer.data.training_data import collate, tokenize, read_records

engine, path = sys.argv[1], sys.argv[2]
config = load_config("config/fine_tuning_config.yaml")
config.lora.dropout = 0.5  # an adapter whose dropout shows: training mode cannot hide
backend = make_backend(engine, 0)
backend.load(path, "none", config.root / ".tmp")
backend.add_adapters(config.lora, False, None)
ids = backend.prompt_ids("Spell the word amber backwards.")
if engine == "mlx":
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    weights = [(k, mx.random.normal(v.shape) * 0.5) for k, v in tree_flatten(backend.model.trainable_parameters())]
    backend.model.update(tree_unflatten(weights))
    forward = lambda: np.array(backend.model(mx.array([ids])).astype(mx.float32))
else:
    import torch
    with torch.no_grad():
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    def forward():
        with torch.no_grad():
            return backend.model(torch.tensor([ids])).logits.float().numpy()
records = read_records(config.resolve("data/processed/valid.jsonl"))[:2]
data = tokenize(records, backend.tokenizer, config.training.max_seq_length, True)
backend.loss_sums([collate(data, list(range(len(records))), backend.pad_id, backend.pad_multiple)])  # an evaluation
first = backend.generate(["Spell the word amber backwards."], 12, 0.0, 1.0)
second = backend.generate(["Spell the word amber backwards."], 12, 0.0, 1.0)
a, b = forward(), forward()
print(json.dumps({"same_text": first == second, "logit_gap": float(np.abs(a - b).max())}))
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = render(tmp_path_factory.mktemp("engines") / "p", model_type="llama")
    code, out = script(project, "make_tiny_model.py", "--rope-theta", "100000")
    assert code == 0, out  # make_tiny_model checks that mlx-lm and transformers agree on its logits
    assert out["verified"]["mlx"] is True and out["verified"]["max_logit_difference"] < 1e-3
    code, out = script(project, "prepare_dataset.py")
    assert code == 0, out
    return project


@pytest.mark.slow
def test_mlx_carries_the_models_rope_everywhere(project):
    model = project / "models" / "tiny-llama"
    config = json.loads((model / "config.json").read_text())
    assert "rope_theta" not in config and config["rope_parameters"]["rope_theta"] == 100000.0  # as transformers 5 saves
    # generation: the same greedy text from both engines (mlx was off after a token or two)
    texts = {}
    for engine in ("mlx", "transformers"):
        proc = subprocess.run([sys.executable, "scripts/generate.py", "--json", "--backend", engine, "--max-tokens",
                               "24", "--prompt", "Spell the word amber backwards."], cwd=project, capture_output=True,
                              text=True, env={**os.environ, "OLMO_BASE_MODEL__LOCAL_PATH": str(model)}, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        texts[engine] = json.loads(proc.stdout.strip().splitlines()[-1])["response"]
    assert texts["mlx"] == texts["transformers"] and texts["mlx"]
    # training with mlx, then the exports: the fused mlx model and the merged one carry the base
    code, out = script(project, "train.py", "--name", "rope", "--set", "training.backend=mlx",
                       "--set", f"base_model.local_path={model}", "--set", "training.stage1.iterations=3",
                       "--set", "training.stage1.warmup_steps=1",
                       "--set", "training.save_steps=3")
    assert code == 0, out
    for fmt in ("mlx", "huggingface"):
        code, exported = script(project, "export.py", "--run-id", out["run_id"], "--stage", "1", "--format", fmt)
        assert code == 0, exported
        saved = json.loads((Path(exported["export_path"]) / "config.json").read_text())
        assert saved["rope_theta"] == 100000.0, fmt


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["transformers", "mlx"])
def test_generation_after_an_evaluation_is_in_eval_mode(project, engine):
    proc = subprocess.run([sys.executable, "-c", PROBE, engine, str(project / "models" / "tiny-llama")], cwd=project,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["same_text"] and seen["logit_gap"] == 0.0, seen
