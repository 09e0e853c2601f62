"""Full fine-tuning (training.fine_tune full) on both engines: every weight trains, with the same
update rule on both (the same losses step by step), the saved model loads in both engines with
the trained logits, and a checkpoint resumes to them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import rows
from test_dora import IDS, trained_logits

from trainer.config import load_config
from trainer.data.training_data import collate
from trainer.engines.backends import installed, make_backend
from trainer.engines.checkpoints import checkpoint_dirs, save_checkpoint

BOTH = installed("peft") and installed("mlx_lm")


def plain_logits(engine: str, model_dir: Path) -> np.ndarray:
    """The saved model through each engine's own loader."""
    if engine == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=torch.tensor(IDS)).logits.numpy()
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(model_dir))
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def fresh(engine: str, tiny: Path, config, tmp_path: Path, seed: int = 0):
    backend = make_backend(engine, seed)
    backend.load(str(tiny), "none", tmp_path)
    trainable = backend.train_all(False)
    backend.setup_optimizer(config.training)
    return backend, trainable


@pytest.mark.slow
@pytest.mark.skipif(not BOTH, reason="needs both engines")
def test_full_fine_tuning_is_the_same_on_both_engines_and_saves_a_model_both_load(tiny, config, tmp_path):
    losses, logits, trained = {}, {}, {}
    for engine in ("transformers", "mlx"):
        backend, trained[engine] = fresh(engine, tiny, config, tmp_path)
        batch = collate(rows(backend.vocabulary()), range(6), backend.pad_id, backend.pad_multiple)
        losses[engine] = [backend.step(batch, 1e-2, 1, update=True) for _ in range(4)]
        logits[engine] = trained_logits(backend)
        backend.save_weights(tmp_path / engine)
        assert (tmp_path / engine / "config.json").is_file() and (tmp_path / engine / "tokenizer.json").is_file()
        save_checkpoint(backend, tmp_path / f"checkpoints-{engine}", 4, {})
        again, _ = fresh(engine, tiny, config, tmp_path, seed=1)
        again.load_state(checkpoint_dirs(tmp_path / f"checkpoints-{engine}")[-1][1])
        np.testing.assert_allclose(trained_logits(again), logits[engine], atol=1e-6, rtol=1e-5)
    assert trained["transformers"] == trained["mlx"] > 0
    assert losses["mlx"][-1] < losses["mlx"][0] - 0.1, "it learns"
    np.testing.assert_allclose(losses["mlx"], losses["transformers"], rtol=1e-4)
    np.testing.assert_allclose(logits["mlx"], logits["transformers"], atol=1e-3)
    for saved in ("transformers", "mlx"):  # each engine's model, loaded by each engine's own tools
        for loader in ("transformers", "mlx"):
            np.testing.assert_allclose(plain_logits(loader, tmp_path / saved), logits[saved], atol=1e-4, rtol=1e-4)
    assert np.abs(plain_logits("transformers", tiny) - logits["mlx"]).max() > 1e-2, "the weights moved"


def test_full_fine_tuning_takes_no_quantized_base_and_no_dora(project):
    path = project / "config" / "fine_tuning_config.yaml"
    full = {"training.fine_tune": "full", "base_model.quantization": "none", "lora.use_dora": False}
    assert load_config(path, environ={}, overrides=full).training.fine_tune == "full"
    for key, value in (("base_model.quantization", "q4"), ("lora.use_dora", True)):
        with pytest.raises(Exception, match="training.fine_tune full trains every weight"):
            load_config(path, environ={}, overrides={**full, key: value})
