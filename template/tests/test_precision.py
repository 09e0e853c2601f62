"""training.precision bf16: bfloat16 matmuls under autocast, float32 weights, gradients and
loss; the start-up checks still turn the fast paths on; mlx refuses it."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import rows
from pydantic import ValidationError

from trainer.config import TrainingSection
from trainer.data.training_data import collate
from trainer.engines import fast_paths
from trainer.engines.backends import installed, make_backend
from trainer.engines.base_trainer import TrainingError


def test_precision_takes_three_values():
    assert TrainingSection().precision == "auto"
    assert TrainingSection(precision="bf16").precision == "bf16"
    with pytest.raises(ValidationError, match="precision"):
        TrainingSection(precision="fp16")


@pytest.mark.skipif(not installed("mlx_lm"), reason="mlx is not installed")
def test_mlx_refuses_bf16_autocast():
    with pytest.raises(TrainingError, match="training.precision bf16") as caught:
        make_backend("mlx", 0, precision="bf16")
    assert caught.value.details["field"] == "training.precision"


def trained(precision: str, tiny, config, tmp_path):
    """A transformers backend at `precision` after three steps on the same batch; returns it,
    its load facts, the dtypes the first q_proj's frozen matmul produced in the start-up check
    and in training, and the losses."""
    import torch

    backend = make_backend("transformers", 0, precision=precision)
    facts = backend.load(str(tiny), "none", tmp_path)
    backend.add_adapters(config.lora, False, None)
    backend.setup_optimizer(config.training)
    seen: list[torch.dtype] = []
    base = next(m for n, m in backend._base().named_modules() if n.endswith("q_proj.base_layer"))
    base.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    found = fast_paths.check(backend, packed=True)
    assert found["target_only_logits"] is True and found["packing"] is True
    checked = set(seen)
    seen.clear()
    batch = collate(rows(backend.vocabulary(), count=6), range(6), backend.pad_id, backend.pad_multiple, packed=True)
    losses = [backend.step(batch, 1e-3, 1, update=True) for _ in range(3)]
    return backend, facts, checked, set(seen), losses


@pytest.mark.slow
def test_bf16_multiplies_in_bfloat16_and_keeps_float32_weights(tiny, config, tmp_path):
    pytest.importorskip("peft")
    import torch

    plain, plain_facts, _, plain_seen, plain_losses = trained("float32", tiny, config, tmp_path)
    mixed, mixed_facts, mixed_checked, mixed_seen, mixed_losses = trained("bf16", tiny, config, tmp_path)
    assert plain_seen == {torch.float32} and mixed_seen == {torch.bfloat16}
    # the start-up check is about structure: it runs at the weights' precision, its tolerance tight
    assert mixed_checked == {torch.float32} and mixed.precision == "bf16" and mixed.tolerance() == 1e-4
    assert mixed_facts["precision"] == "bf16 autocast" and plain_facts["precision"] != mixed_facts["precision"]
    assert mixed_facts["dtype"] == plain_facts["dtype"] == "torch.float32"
    trainable = [p for p in mixed.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    state = mixed._inner_optimizer.state[trainable[0]]
    assert state["exp_avg"].dtype == torch.float32
    # the same training, to bfloat16's precision: losses within 2%, and both fall
    np.testing.assert_allclose(mixed_losses, plain_losses, rtol=2e-2)
    assert mixed_losses[-1] < mixed_losses[0] and plain_losses[-1] < plain_losses[0]
    assert mixed_losses != plain_losses  # bfloat16 rounding is there: autocast really ran


def test_float32_is_loaded_as_float32_whatever_the_checkpoint_holds(tiny, tmp_path):
    """transformers 5 loads a checkpoint in its own dtype by default; a bfloat16 one must still
    train on float32 weights (a CPU, float32, and bf16's master weights)."""
    pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "bf16-checkpoint"
    AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    for precision in ("float32", "bf16") + (() if torch.cuda.is_available() else ("auto",)):
        backend = make_backend("transformers", 0, precision=precision)
        assert backend.load(str(folder), "none", tmp_path)["dtype"] == "torch.float32", precision
