"""DoRA (lora.use_dora) on both engines: the trained adapter loads with each engine's own tools
(peft, mlx-lm), converted to the other engine's format as well, and gives the logits the
trainer had."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import rows

from trainer.data.training_data import collate
from trainer.engines.backends import installed, make_backend
from trainer.engines.checkpoints import checkpoint_dirs, save_checkpoint
from trainer.models import adapters
from trainer.models.merge import base_layers

BOTH = installed("peft") and installed("mlx_lm")
IDS = [[3, 17, 42, 8, 99, 23, 5, 61, 12]]


def hf_logits(model_dir: Path, adapter: Path) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def mlx_logits(model_dir: Path, adapter: Path) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir), adapter_path=str(adapter))
    model.eval()
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def trained_logits(backend) -> np.ndarray:
    backend.eval_mode()
    if backend.name == "transformers":
        import torch

        with torch.no_grad():
            return backend.model(input_ids=torch.tensor(IDS)).logits.numpy()
    import mlx.core as mx

    return np.array(backend.model(mx.array(IDS)).astype(mx.float32))


@pytest.mark.slow
@pytest.mark.skipif(not BOTH, reason="needs both engines")
@pytest.mark.parametrize("engine", ["transformers", "mlx"])
def test_dora_adapters_load_in_both_engines_with_the_trained_logits(engine, tiny, config, tmp_path):
    lora = config.lora.model_copy(update={"use_dora": True, "dropout": 0.0})
    backend = make_backend(engine, 0)
    backend.load(str(tiny), "none", tmp_path)
    backend.add_adapters(lora, False, None)
    backend.setup_optimizer(config.training)
    batch = collate(rows(backend.vocabulary()), range(6), backend.pad_id, backend.pad_multiple)
    losses = [backend.step(batch, 3e-2, 1, update=True) for _ in range(4)]
    assert losses[-1] < losses[0]
    expected = trained_logits(backend)
    backend.save_adapter(tmp_path / "adapter")
    # a checkpoint of a DoRA adapter resumes: a fresh backend loads it and gives the same logits
    save_checkpoint(backend, tmp_path / "checkpoints", 4, {})
    again = make_backend(engine, 1)
    again.load(str(tiny), "none", tmp_path)
    again.add_adapters(lora, False, None)
    again.setup_optimizer(config.training)
    again.load_state(checkpoint_dirs(tmp_path / "checkpoints")[-1][1])
    np.testing.assert_allclose(trained_logits(again), expected, atol=1e-6, rtol=1e-5)

    weights = adapters.read(tmp_path / "adapter")
    assert set(weights.magnitudes) == set(weights.layers) and weights.magnitudes
    other = "mlx" if engine == "transformers" else "peft"
    adapters.convert(tmp_path / "adapter", tmp_path / "converted", other, str(tiny), base_layers(str(tiny)))
    native, converted = (hf_logits, mlx_logits) if engine == "transformers" else (mlx_logits, hf_logits)
    np.testing.assert_allclose(native(tiny, tmp_path / "adapter"), expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(converted(tiny, tmp_path / "converted"), expected, atol=2e-4, rtol=1e-3)
    # the adapter is not a plain LoRA one: without its magnitudes the logits differ
    plain = adapters.LoraWeights(weights.layers, weights.rank, weights.scale, 0.0, "test")
    adapters.write_peft(plain, tmp_path / "plain", str(tiny))
    assert np.abs(hf_logits(tiny, tmp_path / "plain") - expected).max() > 1e-3
