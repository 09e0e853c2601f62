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
    # preference pairs: `tokens` holds the chosen answers, these the rejected ones (None: a plain row)
    rejected: list[Optional[list[int]]] = field(default_factory=list)
    rejected_starts: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def _rejected(self) -> tuple[list[Optional[list[int]]], list[int]]:
        missing = len(self) - len(self.rejected)
        return self.rejected + [None] * missing, self.rejected_starts + [0] * missing

    def __add__(self, other: TokenizedSet) -> TokenizedSet:
        (mine, my_starts), (theirs, their_starts) = self._rejected(), other._rejected()
        pairs = any(r is not None for r in mine + theirs)
        return TokenizedSet(self.tokens + other.tokens, self.starts + other.starts,
                            self.quality + other.quality, self.dropped + other.dropped,
                            mine + theirs if pairs else [], my_starts + their_starts if pairs else [])

    def head(self, count: int) -> TokenizedSet:
        """The first `count` rows (references, not copies)."""
        return TokenizedSet(self.tokens[:count], self.starts[:count], self.quality[:count], 0,
                            self.rejected[:count], self.rejected_starts[:count])

    def is_pair(self, i: int) -> bool:
        return i < len(self.rejected) and self.rejected[i] is not None

    def token_count(self) -> int:
        return sum(len(t) for t in self.tokens)


def read_records(path: Path, pairs: bool = False) -> list[dict[str, Any]]:
    """Processed records (chat or completions; preference pairs with `pairs`) from a jsonl file,
    with errors naming the line."""
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
            if pairs and not isinstance(record.get("rejected"), str):
                raise DataError(f"{path}, line {number}: a dpo or orpo stage trains on preference pairs, and this "
                                "record has no 'rejected' answer; prepare the stage's data with its chosen and "
                                "rejected fields (dataset.chosen_field, dataset.rejected_field)")
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


def _tokens(tokenizer, messages: list[dict[str, str]], max_seq_length: int,
            mask_prompt: bool) -> Optional[tuple[list[int], int]]:
    """The chat-templated tokens and the first one the loss counts; None when truncation leaves
    nothing to learn from."""
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
    return (full, start) if start <= len(full) - 1 else None


def tokenize(records: list[dict[str, Any]], tokenizer, max_seq_length: int, mask_prompt: bool,
             pairs: bool = False) -> TokenizedSet:
    """Chat-template each record; the loss covers the last assistant turn (or everything
    when mask_prompt is off). Rows longer than max_seq_length are truncated. With `pairs`,
    each record is a preference pair (the rejected answer in place of the last turn; the
    prompt is always masked, the preference is about the answers) and a pair is dropped whole."""
    out = TokenizedSet()
    for record in records:
        messages = messages_of(record)
        chosen = _tokens(tokenizer, messages, max_seq_length, mask_prompt or pairs)
        rejected = None
        if pairs:
            other = messages[:-1] + [{"role": "assistant", "content": record["rejected"]}]
            rejected = _tokens(tokenizer, other, max_seq_length, True)
        if chosen is None or (pairs and rejected is None):
            out.dropped += 1
            continue
        out.tokens.append(chosen[0])
        out.starts.append(chosen[1])
        out.quality.append(record.get("quality"))
        if rejected is not None:
            out.rejected.append(rejected[0])
            out.rejected_starts.append(rejected[1])
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
    """A batch laid out for the model: ids [B, L] (int32), the positions whose next token counts
    in the loss (`select`, flat indices into the [B, L-1] grid of inputs), those next tokens
    (`labels`) and their weights (1, or 0 for the entries that only round `select` up to a
    steady size). `positions` [B, L] is set when rows are packed: each row restarts at 0, which
    is what keeps packed rows from seeing each other."""

    ids: np.ndarray
    select: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    tokens: int  # real (unpadded) tokens in the batch
    positions: Optional[np.ndarray] = None
    owners: Optional[np.ndarray] = None  # per `select` entry, its row's place in the batch (-1: padding)
    # preference batches (collate_pairs): rows 0..pairs-1 are the chosen answers, pairs..2*pairs-1 the
    # rejected ones in the same order, any later rows plain (replay); `reference` holds the reference
    # model's log-probabilities of the 2*pairs answers
    pairs: int = 0
    reference: Optional[np.ndarray] = None

    @property
    def targets(self) -> int:
        """Tokens that count in the loss."""
        return int(self.weights.sum())

    @property
    def rows(self) -> int:
        """Training rows laid out in the batch (every row has a target, so an owner)."""
        return int(self.owners.max()) + 1


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """Best-fit decreasing: the row indices of each sequence of at most `width` tokens, the
    longest rows first, each into the fullest sequence it still fits (a new one if none)."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [b for b in range(len(bins)) if free[b] >= lengths[i]]
        if fits:
            best = min(fits, key=lambda b: free[b])
            bins[best].append(i)
            free[best] -= lengths[i]
        else:
            bins.append([i])
            free.append(width - lengths[i])
    return bins


# Attention's share of a token's work grows with the sequence width: about width / 3000 of the
# linear layers' in a 135M model (less in larger ones), so wider packed sequences pay for their
# better fill with attention over more positions.
ATTENTION_PER_WIDTH = 1 / 3000


def pack_width(lengths: list[int], multiple: int) -> int:
    """The packed sequences' width: from the longest row up to twice it (in steps of `multiple`),
    the one whose sequences cost least (positions, with attention's share: ATTENTION_PER_WIDTH)."""
    shortest = round_up(max(lengths), multiple)
    step = max(multiple, 8)
    return min(range(shortest, 2 * shortest + 1, step),
               key=lambda w: len(pack(lengths, w)) * w * (1 + w * ATTENTION_PER_WIDTH))


def select_size(count: int, multiple: int) -> int:
    """`select` is padded to one of few sizes (compiled steps recompile for every new shape):
    a multiple of `multiple` and of a quarter of the power of two below it, at most 25% waste."""
    if multiple <= 1 or count <= 0:
        return max(count, 1)
    step = max(multiple, (1 << (count.bit_length() - 1)) // 4)
    return round_up(count, step)


def collate(data: TokenizedSet, indices, pad_id: int, multiple: int = 1, packed: bool = False) -> Batch:
    """Right-padded to the longest row, rounded up to `multiple` (fewer distinct shapes for
    compiled steps); padding never counts in the loss. With `packed`, rows share sequences
    (pack, as wide as pack_width finds cheapest) with their positions restarting at each row,
    so padding all but goes."""
    rows = [data.tokens[i] for i in indices]
    starts = [data.starts[i] for i in indices]
    lengths = [len(r) for r in rows]
    width = pack_width(lengths, multiple) if packed else round_up(max(lengths), multiple)
    layout = pack(lengths, width) if packed else [[j] for j in range(len(rows))]
    ids = np.full((len(layout), width), pad_id, dtype=np.int32)
    positions = np.zeros((len(layout), width), dtype=np.int32) if packed else None
    select, labels, owners = [], [], []
    for b, members in enumerate(layout):
        offset = 0
        for j in members:
            row = rows[j]
            ids[b, offset:offset + len(row)] = row
            if positions is not None:
                positions[b, offset:offset + len(row)] = np.arange(len(row))
            # input position p predicts token p + 1: row j's targets are its tokens start..end
            base = b * (width - 1) + offset
            select.extend(range(base + starts[j] - 1, base + len(row) - 1))
            labels.extend(row[starts[j]:])
            owners.extend([j] * (len(row) - starts[j]))
            offset += len(row)
        if positions is not None and offset < width:  # padding continues the last row (it sees nothing after)
            last = positions[b, offset - 1]
            positions[b, offset:] = np.arange(last + 1, last + 1 + width - offset)
    count = len(select)
    size = select_size(count, multiple)
    weights = np.zeros(size, dtype=np.float32)
    weights[:count] = 1.0
    return Batch(ids=ids, select=np.array(select + [0] * (size - count), dtype=np.int32),
                 labels=np.array(labels + [pad_id] * (size - count), dtype=np.int32), weights=weights,
                 tokens=sum(len(r) for r in rows), positions=positions,
                 owners=np.array(owners + [-1] * (size - count), dtype=np.int32))


def collate_pairs(data: TokenizedSet, indices, pad_id: int, multiple: int = 1, packed: bool = False,
                  reference: Optional[np.ndarray] = None) -> Batch:
    """A preference batch: the chosen answers of the pairs among `indices`, their rejected
    answers, then the plain rows (replay); `reference` [len(data), 2] gives each pair's
    reference log-probabilities (chosen, rejected)."""
    pairs = [i for i in indices if data.is_pair(i)]
    plain = [i for i in indices if not data.is_pair(i)]
    rows = TokenizedSet(tokens=[data.tokens[i] for i in pairs] + [data.rejected[i] for i in pairs]
                        + [data.tokens[i] for i in plain],
                        starts=[data.starts[i] for i in pairs] + [data.rejected_starts[i] for i in pairs]
                        + [data.starts[i] for i in plain])
    batch = collate(rows, range(len(rows)), pad_id, multiple, packed)
    batch.pairs = len(pairs)
    if reference is not None:
        batch.reference = np.concatenate([reference[pairs, 0], reference[pairs, 1]]).astype(np.float32)
    return batch


def eval_rows(data: TokenizedSet, batch_size: int, max_batches: int) -> list[np.ndarray]:
    """The rows of each validation batch, in file order: the first `max_batches` (-1 = all)."""
    count = len(data) if max_batches == -1 else min(len(data), max_batches * batch_size)
    return [np.arange(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]


def eval_batches(data: TokenizedSet, batch_size: int, max_batches: int, pad_id: int, multiple: int = 1,
                 packed: bool = False) -> list[Batch]:
    """Validation batches in file order: the first `max_batches` (-1 = all)."""
    return [collate(data, rows, pad_id, multiple, packed) for rows in eval_rows(data, batch_size, max_batches)]
