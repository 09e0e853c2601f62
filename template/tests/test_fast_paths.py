"""Packing and target-only logits change how a batch is computed, never what: the same
per-row losses and the same gradients as padded rows with logits everywhere (on the tiny
model of each engine installed here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import rows

from trainer.data.training_data import collate, pack, pack_width
from trainer.engines import fast_paths
from trainer.engines.backends import installed, make_backend
from trainer.engines.base_trainer import TrainingError

ENGINES = [e for e, module in (("transformers", "peft"), ("mlx", "mlx_lm")) if installed(module)]


def test_packing_lays_every_row_out_once_with_its_own_positions():
    data = rows(500, count=9)
    plain = collate(data, range(9), pad_id=0, multiple=8)
    packed = collate(data, range(9), pad_id=0, multiple=8, packed=True)
    assert plain.ids.shape[1] <= packed.ids.shape[1] <= 2 * plain.ids.shape[1] and packed.ids.size < plain.ids.size
    assert packed.tokens == plain.tokens == data.token_count() and packed.targets == plain.targets
    found = []
    for b in range(packed.ids.shape[0]):  # split each sequence where the positions restart
        cuts = [0] + [i for i in range(1, packed.ids.shape[1]) if packed.positions[b, i] == 0] + [None]
        for start, end in zip(cuts, cuts[1:], strict=False):
            found.append(packed.ids[b, start:end].tolist())
    for j, row in enumerate(data.tokens):  # each row once, from position 0 on (padding follows the last)
        assert sum(seq[:len(row)] == row for seq in found) == 1, j
    for batch in (plain, packed):  # every selected position predicts its row's next token
        real = batch.weights > 0
        flat = batch.ids[:, 1:].reshape(-1)
        assert (flat[batch.select[real]] == batch.labels[real]).all()
        for j, row in enumerate(data.tokens):
            assert batch.labels[batch.owners == j].tolist() == row[data.starts[j]:]
    assert pack([5, 3, 3, 2], 6) == [[0], [1, 2], [3]]  # longest first, each into the fullest bin it fits
    # a width a little above the longest row can hold the short rows beside the long ones: 2 sequences of
    # 120 instead of 3 of 104; wider than needed costs attention, so 104 stays where it packs as well
    assert pack_width([100, 90, 20, 20], 8) == 120 and pack([100, 90, 20, 20], 120) == [[0, 2], [1, 3]]
    assert pack_width([100, 60, 60, 40, 40], 8) == 104


def test_target_selection_is_padded_to_few_sizes():
    data = rows(500, count=4)
    batch = collate(data, range(4), pad_id=0, multiple=32)
    assert len(batch.select) % 32 == 0 and batch.weights.sum() == batch.targets
    assert (batch.owners[batch.weights == 0] == -1).all()
    sizes = {fast_paths.chunk_size(v) for v in (49_152, 128_256)}
    assert sizes == {682, 261}


def load(engine: str, folder: Path, config, tmp_path: Path):
    backend = make_backend(engine, 0)
    backend.load(str(folder), "none", tmp_path)
    backend.add_adapters(config.lora, False, None)
    backend.setup_optimizer(config.training)
    backend.eval_mode()  # no dropout: two computations of one batch must see the same network
    randomize_lora_b(backend)
    backend.chunk = 5  # several output-layer chunks, each recomputed in the backward pass
    return backend


def randomize_lora_b(backend) -> None:
    """LoRA's B starts at zero, which would leave A's gradients zero: give it values."""
    if backend.name == "transformers":
        import torch

        torch.manual_seed(0)
        for name, p in backend.model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        return
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    mx.random.seed(0)
    new = [(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(backend.model.trainable_parameters())
           if k.endswith("lora_b")]
    backend.model.update(tree_unflatten(new))


def losses_and_grads(backend, batch) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-row summed losses (by Batch.owners) and the gradients of their total."""
    rows_in = int(batch.owners.max()) + 1
    if backend.name == "transformers":
        import torch

        backend.model.zero_grad(set_to_none=True)
        per_row = []
        for j in range(rows_in):  # the same forward with only row j's positions weighted
            mine = batch.weights * (batch.owners == j)
            part = type(batch)(**{**batch.__dict__, "weights": mine.astype(np.float32)})
            with torch.no_grad():
                per_row.append(float(backend._loss(part)[0]))
        total, _ = backend._loss(batch)
        total.backward()
        grads = {n: p.grad.detach().numpy().copy() for n, p in backend.model.named_parameters() if p.requires_grad}
        return np.array(per_row), grads
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from trainer.engines.mlx_trainer import masked_loss

    def total(model, weights):
        ids, select, labels, _ = backend._arrays(batch)
        return masked_loss(model, ids, select, labels, weights, backend.target_only, backend.chunk)[0]

    per_row = [float(total(backend.model, mx.array((batch.weights * (batch.owners == j)).astype(np.float32))))
               for j in range(rows_in)]
    _, grads = nn.value_and_grad(backend.model, total)(backend.model, mx.array(batch.weights))
    return np.array(per_row), {k: np.array(v) for k, v in tree_flatten(grads)}


def assert_same(a, b, tolerance=2e-5):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=tolerance, atol=tolerance)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        scale = max(np.abs(grads_b[name]).max(), 1e-6)
        assert np.abs(grads_a[name] - grads_b[name]).max() <= 1e-4 * scale, name
    assert any(np.abs(g).max() > 0 for g in grads_a.values())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_target_only_logits_give_the_same_losses_and_gradients(engine, tiny, config, tmp_path):
    backend = load(engine, tiny, config, tmp_path)
    batch = collate(rows(backend.vocabulary()), range(6), backend.pad_id, backend.pad_multiple)
    backend.target_only = False
    full = losses_and_grads(backend, batch)
    backend.target_only = True
    assert_same(losses_and_grads(backend, batch), full)
    assert fast_paths.check(backend, packed=False)["target_only_logits"] is True and backend.target_only


@pytest.mark.slow
def test_packed_rows_give_the_same_losses_and_gradients_as_padded_rows(tiny, config, tmp_path):
    pytest.importorskip("peft")
    backend = load("transformers", tiny, config, tmp_path)
    data = rows(backend.vocabulary(), count=8)
    plain = collate(data, range(8), backend.pad_id, backend.pad_multiple)
    packed = collate(data, range(8), backend.pad_id, backend.pad_multiple, packed=True)
    assert packed.ids.shape[0] < plain.ids.shape[0]
    for target_only in (False, True):
        backend.target_only = target_only
        assert_same(losses_and_grads(backend, packed), losses_and_grads(backend, plain))
    # rows that could see each other would not give these losses: the check notices
    backend.target_only = False
    shifted = type(packed)(**{**packed.__dict__, "positions": np.arange(packed.ids.size, dtype=np.int32).reshape(
        packed.ids.shape)})
    assert not np.allclose(losses_and_grads(backend, shifted)[0], losses_and_grads(backend, plain)[0], rtol=1e-3)
    assert fast_paths.check(backend, packed=True)["packing"] is True


@pytest.mark.slow
def test_logits_that_are_more_than_the_output_layer_keep_every_logit(tiny, config, tmp_path):
    pytest.importorskip("peft")
    backend = load("transformers", tiny, config, tmp_path)

    def scale(module, args, output):  # as Cohere's logit_scale does after the output layer
        output.logits = output.logits * 0.5
        return output

    backend._base().register_forward_hook(scale)
    facts = fast_paths.check(backend, packed=False)
    assert facts["target_only_logits"] is False and "more than its output layer" in facts["reason"]
    assert backend.target_only is False


@pytest.mark.slow
@pytest.mark.skipif("mlx" not in ENGINES, reason="mlx is not installed")
def test_mlx_refuses_packed_batches(tiny, config, tmp_path):
    backend = load("mlx", tiny, config, tmp_path)
    with pytest.raises(TrainingError, match="position ids per row"):
        fast_paths.check(backend, packed=True)
