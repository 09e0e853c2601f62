"""The two layouts that make training fast, checked on the loaded model before they are used.

- Target-only logits: the output layer runs only where the loss counts (prompt masking leaves
  most positions out), in chunks so a large vocabulary never holds [positions, vocabulary]
  logits at once. Same loss and gradients as all logits, for models whose logits are their
  output layer's; a model that does more (a logit soft-cap, a scale) fails the check and trains
  on all logits, as before.
- Packing: a batch's rows share sequences, positions restarting at each row. transformers
  builds attention that stays inside each row from the position ids; an architecture whose
  attention ignores them would let rows see each other, so a failed check refuses to train.

The check compares the fast path with the plain one on a few rows of random tokens.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from trainer.data.training_data import TokenizedSet, collate
from trainer.engines.base_trainer import Backend, TrainingError

# logits per output-layer chunk: 2^25 float32 values are 128 MiB (682 positions of a 49k vocabulary)
CHUNK_VALUES = 1 << 25


def chunk_size(vocabulary: int) -> int:
    return max(64, CHUNK_VALUES // max(vocabulary, 1))


def probe_rows(vocabulary: int) -> TokenizedSet:
    """Three rows of random tokens of different lengths, the first two with a masked prompt."""
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, vocabulary, size=n).tolist() for n in (13, 7)]
    tokens.append(tokens[1][:5])  # packed after the second row: a row that saw it could copy it
    return TokenizedSet(tokens=tokens, starts=[5, 2, 1], quality=[None] * 3)


def close(a: float, b: float, tolerance: float) -> bool:
    return math.isfinite(a) and abs(a - b) <= tolerance * max(1.0, abs(b))


def check(backend: Backend, packed: bool) -> dict[str, Any]:
    """Turn on what the loaded model computes exactly; returns what was found, for the run's
    metadata. Raises TrainingError when packing was asked for and would mix rows. The check is
    about structure, not rounding: it runs at the weights' precision (no bf16 autocast), so its
    tolerance stays tight."""
    precision, backend.precision = backend.precision, "float32"
    try:
        return _check(backend, packed)
    finally:
        backend.precision = precision


def _check(backend: Backend, packed: bool) -> dict[str, Any]:
    backend.chunk = chunk_size(backend.vocabulary())
    rows = probe_rows(backend.vocabulary())
    singles = [collate(rows, [i], backend.pad_id, backend.pad_multiple) for i in range(len(rows))]
    backend.target_only = False
    reference = [backend.loss_sums([batch])[0] for batch in singles]
    tolerance = backend.tolerance()
    facts: dict[str, Any] = {"target_only_logits": True, "logit_chunk": backend.chunk, "packing": packed}
    reason = backend.target_only_blocked()
    if reason is None:
        backend.target_only = True
        try:
            fast = [backend.loss_sums([batch])[0] for batch in singles]
            if not all(close(f, r, tolerance) for f, r in zip(fast, reference, strict=True)):
                reason = f"the model's logits are more than its output layer (losses {fast} vs {reference})"
        except Exception as error:  # noqa: BLE001 - any failure of the fast path means the plain one
            reason = f"{type(error).__name__}: {error}"
    if reason:
        backend.target_only = False
        facts.update(target_only_logits=False, reason=reason)
    if packed:  # row by row: the last row shares a sequence with the second, whose tokens it repeats
        together = backend.row_logps(collate(rows, [0, 1, 2], backend.pad_id, backend.pad_multiple, packed=True))
        apart = [backend.row_logps(batch)[0] for batch in singles]
        if not all(close(t, a, tolerance) for t, a in zip(together, apart, strict=True)):
            raise TrainingError(
                f"training.packing: this model's attention ignores the per-row position ids (packed rows' "
                f"log-probabilities {[round(t, 4) for t in together]}, the same rows apart "
                f"{[round(a, 4) for a in apart]}), so packed rows would see each other; set training.packing: "
                "false (training.length_grouping also cuts padding)", details={"field": "training.packing"})
    return facts
