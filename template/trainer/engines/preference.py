"""Preference training (training.stageN.method dpo or orpo), the same on both engines.

The formulas are written once over a few array operations each engine provides (`Ops`), so
mlx and torch compute the very same loss:

- DPO (Rafailov et al. 2023, TRL's `sigmoid` loss): per pair, -log sigmoid(beta * ((c - c_ref) -
  (r - r_ref))), with c, r the summed log-probabilities of the chosen and rejected answers under the
  policy and c_ref, r_ref under the reference: the adapter as the stage starts (the base model in a
  first stage, where LoRA's B is zero and DoRA's magnitude the weight norm; the SFT model in a stage
  2 after an SFT stage 1, the classic recipe). Reference log-probabilities are computed once, before
  the first step, in one forward pass over the stage's pairs (no second model in memory), and kept
  in the stage's folder so a resumed stage uses the very same values.
- ORPO (Hong et al. 2024, as TRL's ORPOTrainer): the chosen answers' token-mean NLL minus
  lambda * mean log sigmoid(log odds(chosen) - log odds(rejected)), on mean per-token
  log-probabilities; no reference model.

Rows drawn from the replay pool in a preference stage (plain SFT rows) add their token-mean NLL,
as the chosen answers do in ORPO. Rewards (beta * the log-ratio for DPO, beta * the mean
log-probability for ORPO), their accuracy (chosen above rejected) and margin are logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from trainer.data.training_data import Batch, TokenizedSet, collate_pairs
from trainer.files import read_json, write_json

STATS = ("pair_loss", "pairs", "nll", "nll_tokens", "accuracy", "margin", "chosen_reward", "rejected_reward")
# the per-pair statistics a step returns, in this order, with their metric names
REPORTED = {"accuracy": "reward_accuracy", "margin": "reward_margin", "chosen_reward": "chosen_reward",
            "rejected_reward": "rejected_reward"}  # per pair, in the metrics (as TRL names them)


def report(sums: dict[str, float]) -> dict[str, float]:
    """Per-pair means of the statistics in `sums` (STATS), under their metric names."""
    pairs = sums.get("pairs") or 0
    return {name: round(sums.get(key, 0.0) / pairs, 6) for key, name in REPORTED.items()} if pairs else {}


def loss(sums: dict[str, float]) -> float:
    """The objective of summed statistics: mean pair loss plus token-mean NLL."""
    return sums["pair_loss"] / max(sums["pairs"], 1) + (sums["nll"] / sums["nll_tokens"] if sums["nll_tokens"] else 0)


@dataclass
class Ops:
    """What the formulas need from an array library."""

    logsigmoid: Callable[[Any], Any]
    log1mexp: Callable[[Any], Any]  # log(1 - exp(x)) for x < 0 (x clamped below 0: an answer of log-prob 0)
    greater: Callable[[Any, Any], Any]  # elementwise a > b as floats
    total: Callable[[Any], Any]  # sum of all elements


def objective(ops: Ops, method: str, beta: float, pairs: int, reference, logps, counts, ce,
              nll_mask) -> tuple[Any, Any, dict]:
    """The summed pair losses, summed NLL and the statistics of one preference batch.

    The batch's first `pairs` rows are chosen answers and the next `pairs` their rejected ones
    (Batch.pairs); `reference` holds their reference log-probabilities (DPO). `logps` and `counts`
    are the summed log-probabilities and target counts of every row; `ce` the per-position
    cross-entropy (weighted); `nll_mask` selects the positions whose NLL counts (nll_rows)."""
    p = pairs
    nll = ops.total(ce * nll_mask)
    if p == 0:
        return 0.0 * nll, nll, {}
    chosen, rejected = logps[:p], logps[p:2 * p]
    if method == "dpo":
        chosen_reward = beta * (chosen - reference[:p])
        rejected_reward = beta * (rejected - reference[p:2 * p])
        losses = -ops.logsigmoid(chosen_reward - rejected_reward)
    else:  # orpo
        chosen_mean, rejected_mean = chosen / counts[:p], rejected / counts[p:2 * p]
        log_odds = (chosen_mean - rejected_mean) - (ops.log1mexp(chosen_mean) - ops.log1mexp(rejected_mean))
        losses = -beta * ops.logsigmoid(log_odds)
        chosen_reward, rejected_reward = beta * chosen_mean, beta * rejected_mean
    stats = {"accuracy": ops.greater(chosen_reward, rejected_reward), "margin": chosen_reward - rejected_reward,
             "chosen_reward": chosen_reward, "rejected_reward": rejected_reward}
    return ops.total(losses), nll, {k: ops.total(v) for k, v in stats.items()}


def nll_rows(method: str, batch: Batch) -> np.ndarray:
    """Per `select` entry, 1 where its NLL counts: plain rows, and ORPO's chosen answers."""
    owners = batch.owners
    counted = owners >= 2 * batch.pairs
    if method == "orpo":
        counted |= (owners >= 0) & (owners < batch.pairs)
    return (counted & (batch.weights > 0)).astype(np.float32)


def denominators(method: str, data: TokenizedSet, rows, world_size: int) -> tuple[float, float]:
    """The global batch's pair count and NLL token count, per process (the losses are sums
    divided by these, so that gradients averaged over the processes are the global batch's)."""
    pairs = sum(data.is_pair(i) for i in rows)
    tokens = sum(len(data.tokens[i]) - data.starts[i] for i in rows
                 if not data.is_pair(i) or method == "orpo")
    return max(pairs, 1) / world_size, max(tokens, 1) / world_size


def reference_logps(backend: Any, data: TokenizedSet, batch_size: int, packed: bool, cache: Path,
                    fingerprint: str) -> np.ndarray:
    """[len(data), 2]: the summed log-probabilities of each pair's chosen and rejected answer
    under the model as it is now (NaN for plain rows); read from `cache` when it holds the same
    data's values, else computed and written there (by the main process)."""
    try:  # a cache of other data or settings, or one that cannot be read, is computed again
        saved = read_json(cache) if cache.is_file() else {}
        if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint:
            values = np.array(saved["logps"], dtype=np.float64)  # None (plain rows) reads as NaN
            if values.shape == (len(data), 2):
                return values
    except (OSError, ValueError, TypeError, KeyError):
        pass
    values = np.full((len(data), 2), np.nan)
    pairs = [i for i in range(len(data)) if data.is_pair(i)]
    for start in range(0, len(pairs), batch_size):  # the pairs laid out as in training: chosen, then rejected
        some = pairs[start:start + batch_size]
        logps = backend.row_logps(collate_pairs(data, some, backend.pad_id, backend.pad_multiple, packed))
        values[some, 0], values[some, 1] = logps[:len(some)], logps[len(some):2 * len(some)]
    if backend.world.main:
        write_json(cache, {"fingerprint": fingerprint,
                           "logps": [[None if np.isnan(x) else float(x) for x in row] for row in values]})
    return values
