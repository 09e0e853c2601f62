"""Training data shared by both backends: processed records -> token ids with the prompt
masked, quality weights, a weighted index sampler with stage-1 replay, and padded batches.

Everything here is plain Python/numpy, so the mlx and transformers backends see exactly
the same tokens, masks, batches and order. Sampling is stateless: the batch of
(seed, stage, iteration, micro-step) is always the same, which makes resuming exact
(the data position is just the iteration) and keeps the backends in step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from trainer.data.weighting import weight
from trainer.errors import ProjectError, advice


class DataError(ProjectError):
    kind = "data_error"


@dataclass
class TokenizedSet:
    """Token ids of each row and where its loss starts; rows are referenced, never copied."""

    tokens: list[list[int]] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # index of the first token that counts in the loss
    quality: list[Optional[float]] = field(default_factory=list)
    dropped: int = 0  # rows whose prompt alone fills max_seq_length

    def __len__(self) -> int:
        return len(self.tokens)

    def __add__(self, other: TokenizedSet) -> TokenizedSet:
        return TokenizedSet(self.tokens + other.tokens, self.starts + other.starts,
                            self.quality + other.quality, self.dropped + other.dropped)

    def token_count(self) -> int:
        return sum(len(t) for t in self.tokens)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Processed records (chat or completions) from a jsonl file, with errors naming the line."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}, line {number}: malformed JSON ({error.msg})") from None
            if not isinstance(record, dict) or not ("messages" in record or {"prompt", "completion"} <= set(record)):
                raise DataError(f"{path}, line {number}: expected a chat ('messages') or completions "
                                "('prompt', 'completion') record; "
                                + advice("run scripts/prepare_dataset.py", "run prepare_dataset"))
            records.append(record)
    if not records:
        raise DataError(f"{path} has no records")
    return records


def messages_of(record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in record:
        return record["messages"]
    system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    return system + [{"role": "user", "content": record["prompt"]},
                     {"role": "assistant", "content": record["completion"]}]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize(records: list[dict[str, Any]], tokenizer, max_seq_length: int, mask_prompt: bool) -> TokenizedSet:
    """Chat-template each record; the loss covers the last assistant turn (or everything
    when mask_prompt is off). Rows longer than max_seq_length are truncated."""
    out = TokenizedSet()
    for record in records:
        messages = messages_of(record)
        full = _encode(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
        start = 1  # the first token is never a target
        if mask_prompt:
            prompt = _encode(tokenizer, tokenizer.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=True))
            shared = 0
            for a, b in zip(prompt, full, strict=False):  # normally the prompt is a prefix of the whole
                if a != b:
                    break
                shared += 1
            start = max(shared, 1)
        full = full[:max_seq_length]
        if start > len(full) - 1:  # nothing left to learn from after truncation
            out.dropped += 1
            continue
        out.tokens.append(full)
        out.starts.append(start)
        out.quality.append(record.get("quality"))
    return out


def quality_weights(quality: list[Optional[float]], multiplier: float, threshold: float, enabled: bool) -> np.ndarray:
    """Sampling weight per row (see trainer.data.weighting)."""
    return np.array([weight(q, multiplier, threshold, enabled) for q in quality], dtype=np.float64)


class Sampler:
    """Weighted sampling of row indices; the rows of one batch are always distinct.

    `pools` are (weights, share) pairs over consecutive index ranges: stage 2 uses its
    own rows with share 1 - replay_ratio and the stage-1 training rows with share
    replay_ratio, so on average replay_ratio of every stage-2 batch is replay.
    """

    def __init__(self, pools: list[tuple[np.ndarray, float]], batch_size: int, seed: int, stage: int,
                 lengths: Optional[np.ndarray] = None, group: int = 1):
        probabilities = []
        for weights, share in pools:
            if len(weights) and share > 0:
                probabilities.append(weights / weights.sum() * share)
            else:
                probabilities.append(np.zeros(len(weights)))
        p = np.concatenate(probabilities)
        self.p = p / p.sum()
        self.size = len(p)
        self.batch_size = min(batch_size, int((self.p > 0).sum()))
        self.seed, self.stage = seed, stage
        # Length grouping: `group` consecutive iterations share one weighted draw of
        # group x batch_size distinct rows, sorted by length and cut into batches, which run in a
        # seeded order. Still a function of (seed, stage, iteration, micro) alone, so resume holds.
        self.lengths = lengths
        usable = int((self.p > 0).sum()) // max(self.batch_size, 1)
        self.group = max(1, min(group, usable)) if lengths is not None else 1

    def batch(self, iteration: int, micro: int = 0) -> np.ndarray:
        if self.group == 1:
            rng = np.random.default_rng([self.seed, self.stage, iteration, micro])
            return rng.choice(self.size, size=self.batch_size, replace=False, p=self.p)
        block, position = divmod(iteration - 1, self.group)
        rng = np.random.default_rng([self.seed, self.stage, block, micro, self.group])
        rows = rng.choice(self.size, size=self.batch_size * self.group, replace=False, p=self.p)
        rows = rows[np.argsort(self.lengths[rows], kind="stable")]
        which = rng.permutation(self.group)[position]
        return rows[which * self.batch_size:(which + 1) * self.batch_size]


@dataclass
class Batch:
    """A padded batch: ids [B, L] (int32), and per row the first and last target position."""

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    tokens: int  # real (unpadded) tokens in the batch

    @property
    def targets(self) -> int:
        """Tokens that count in the loss."""
        return int((self.ends - self.starts + 1).clip(min=0).sum())


def collate(data: TokenizedSet, indices, pad_id: int, multiple: int = 1) -> Batch:
    """Right-padded to the longest row, rounded up to `multiple` (fewer distinct shapes
    for compiled steps); padding never counts in the loss."""
    rows = [data.tokens[i] for i in indices]
    width = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    for j, row in enumerate(rows):
        ids[j, : len(row)] = row
    starts = np.array([data.starts[i] for i in indices], dtype=np.int32)
    ends = np.array([len(r) - 1 for r in rows], dtype=np.int32)
    return Batch(ids=ids, starts=starts, ends=ends, tokens=sum(len(r) for r in rows))


def eval_rows(data: TokenizedSet, batch_size: int, max_batches: int) -> list[np.ndarray]:
    """The rows of each validation batch, in file order: the first `max_batches` (-1 = all)."""
    count = len(data) if max_batches == -1 else min(len(data), max_batches * batch_size)
    return [np.arange(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]


def eval_batches(data: TokenizedSet, batch_size: int, max_batches: int, pad_id: int, multiple: int = 1) -> list[Batch]:
    """Validation batches in file order: the first `max_batches` (-1 = all)."""
    return [collate(data, rows, pad_id, multiple) for rows in eval_rows(data, batch_size, max_batches)]
