"""Raw data (jsonl, csv, parquet) -> validated chat/completion records, split by seed.

Reads the configured raw files (never modifying them), maps the configured fields to
chat messages (rows already in `messages` or `prompt`/`completion` form are accepted
as they are), validates every row, removes exact duplicates, splits deterministically
and writes data/processed/{train,valid,test}.jsonl in mlx-lm's format, which both
training backends read. A quality report goes to data/quality_reports/.

Any invalid row is an error naming file, line (or parquet row) and field, and nothing
is written; with skip_invalid the rows are dropped and listed in the report instead.
Preparing happens in two steps, plan (read, validate, split, build the report) and write,
so that a run over both stages writes nothing unless both validate.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from trainer import guard
from trainer.config import DatasetSection, FineTuningConfig
from trainer.data import weighting
from trainer.data.readers import (  # noqa: F401  (the data room's front: re-exported for callers)
    BOM,
    FORMATS,
    DatasetError,
    RowError,
    columns_of,
    file_format,
    find_inputs,
    read_rows,
    shown,
)
from trainer.data.records import ROLES, Example, Rejected, to_example, to_record  # noqa: F401
from trainer.errors import advice
from trainer.files import sha256_file, write_atomic

SPLITS = ("train", "valid", "test")
MAX_LISTED_ERRORS = 1000


# ----------------------------------------------------------------- splitting and writing


def split(examples: list[Any], dataset: DatasetSection, seed: int) -> dict[str, list[Any]]:
    """Seeded shuffle, then cut by the configured ratios; valid and test get at least one row."""
    n = len(examples)
    if n < 3:
        raise DatasetError(f"{n} valid row(s) cannot be split into train, valid and test; at least 3 are needed")
    n_valid = max(1, round(n * dataset.validation_split))
    n_test = max(1, round(n * dataset.test_split))
    if n - n_valid - n_test < 1:
        raise DatasetError(f"{n} valid rows leave no training rows after the validation and test splits")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    cuts = {"valid": order[:n_valid], "test": order[n_valid:n_valid + n_test], "train": order[n_valid + n_test:]}
    return {name: [examples[i] for i in sorted(cuts[name])] for name in SPLITS}


# ----------------------------------------------------------------- report


def _stats(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "count": len(values),
        "min": ordered[0],
        "max": ordered[-1],
        "mean": round(statistics.fmean(ordered), 2),
        "p50": ordered[len(ordered) // 2],
        "p95": ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)],
    }


def load_tokenizer(path: Optional[Path]):
    """A `tokenizers.Tokenizer` from a model directory, or None (then lengths are in characters)."""
    if path is None or not (path / "tokenizer.json").is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def quality_report(examples: list[Example], tokenizer, max_seq_length: int) -> dict[str, Any]:
    scores = [e.quality for e in examples if e.quality is not None]
    bins = [0] * 10
    for score in scores:
        bins[min(9, int(score * 10))] += 1
    if tokenizer is not None:
        prompts = [len(ids.ids) for ids in tokenizer.encode_batch([e.prompt_text() for e in examples])]
        completions = [len(ids.ids) for ids in tokenizer.encode_batch([e.completion_text() for e in examples])]
        unit = "tokens"
    else:
        prompts = [len(e.prompt_text()) for e in examples]
        completions = [len(e.completion_text()) for e in examples]
        unit = "characters"
    totals = [p + c for p, c in zip(prompts, completions, strict=True)]
    categories = Counter(
        str(e.metadata.get("category")) for e in examples if e.metadata and "category" in e.metadata
    )
    return {
        "quality": {
            "rows_with_score": len(scores),
            "rows_without_score": len(examples) - len(scores),
            "min": min(scores) if scores else None,
            "max": max(scores) if scores else None,
            "mean": round(statistics.fmean(scores), 4) if scores else None,
            "histogram": [{"range": [i / 10, (i + 1) / 10], "count": c} for i, c in enumerate(bins)],
        },
        "lengths": {
            "unit": unit,
            "prompt": _stats(prompts),
            "completion": _stats(completions),
            "total": _stats(totals),
            # Only meaningful in tokens; chat-template tokens are not counted.
            "over_max_seq_length": sum(t > max_seq_length for t in totals) if tokenizer is not None else None,
        },
        "categories": dict(categories.most_common(50)),
    }


# ----------------------------------------------------------------- the whole preparation


@dataclass
class Preparation:
    inputs: list[dict[str, Any]] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    duplicates: list[dict[str, str]] = field(default_factory=list)
    rows_read: int = 0


def collect(config: FineTuningConfig, inputs: list[Path], preference: bool = False) -> Preparation:
    """Read and validate every row of every input file (as preference pairs with `preference`)."""
    dataset = config.dataset
    result = Preparation()
    seen: dict[str, str] = {}
    required = [dataset.chosen_field, dataset.rejected_field] if preference else [dataset.instruction_field,
                                                                                  dataset.output_field]
    for path in inputs:
        if not path.is_file():
            raise DatasetError(f"input file not found: {path}")
        guard.check_path(path, "an input file")
        name = _display(path, config.root)
        fmt = file_format(path, dataset.format)
        unit = "row" if fmt == "parquet" else "line"
        columns = columns_of(path, fmt, name)
        has_chat = columns is not None and ("messages" in columns or {"prompt", "completion"} <= set(columns))
        if preference and columns is not None and not {dataset.prompt_field, dataset.instruction_field} & set(columns):
            required_here = [*required, dataset.prompt_field]  # the prompt's column is missing too
        else:
            required_here = required
        has_chat = has_chat and not preference
        missing = [c for c in required_here if columns is not None and c not in columns and not has_chat]
        if missing:
            for column in missing:
                result.errors.append(RowError(name, 0, column, f"missing column (columns: {', '.join(columns)})", unit))
            continue
        count = 0
        for number, row in read_rows(path, fmt, name):
            count += 1
            if isinstance(row, RowError):
                result.errors.append(row)
                continue
            source = f"{name}:{number}"
            try:
                example = to_example(row, dataset, source, preference)
                to_record(example, dataset.record_format)
            except Rejected as rejected:
                result.errors.append(RowError(name, number, rejected.field, rejected.reason, unit))
                continue
            key = example.key()
            if dataset.deduplicate and key in seen:
                result.duplicates.append({"source": source, "duplicate_of": seen[key]})
                continue
            seen[key] = source
            result.examples.append(example)
        result.rows_read += count
        result.inputs.append({"path": name, "format": fmt, "rows": count, "sha256": sha256_file(path)})
    return result


def preference_stage(config: FineTuningConfig, stage: int) -> bool:
    """Whether the stage trains on preference pairs (training.stageN.method dpo or orpo)."""
    try:
        return config.training.stage(stage).method != "sft"
    except ValueError:  # a stage the config does not have: plain rows
        return False


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


@dataclass
class Plan:
    """A validated stage, ready to write: the files' texts and the summary to return."""

    writes: dict[Path, str]
    summary: dict[str, Any]


def plan(
    config: FineTuningConfig,
    inputs: Optional[list[Path]] = None,
    *,
    stage: int = 1,
    output_dir: Optional[Path] = None,
    skip_invalid: bool = False,
    tokenizer_path: Optional[Path] = None,
) -> Plan:
    """Read, validate and split one stage's data; raises DatasetError before anything is written.
    Stage 1 goes to dataset.processed_dir, stage 2 to its stage2/ folder."""
    dataset = config.dataset
    paths = [Path(p).resolve() for p in inputs] if inputs else find_inputs(dataset, config.root, stage)
    out_dir = output_dir or config.resolve(dataset.processed_dir) / ("" if stage == 1 else "stage2")
    out_dir = guard.check_path(out_dir, "the output folder")
    reports_dir = guard.check_path(config.resolve(dataset.reports_dir), "dataset.reports_dir")
    prepared = collect(config, paths, preference=preference_stage(config, stage))

    if prepared.errors and not skip_invalid:
        shown = "\n".join(f"  {e}" for e in prepared.errors[:20])
        more = f"\n  ... and {len(prepared.errors) - 20} more" if len(prepared.errors) > 20 else ""
        raise DatasetError(
            f"{len(prepared.errors)} invalid row(s); nothing was written "
            + advice("(use --skip-invalid to drop them)", "(prepare_dataset with skip_invalid=true drops them)")
            + f":\n{shown}{more}",
            details={"errors": [asdict(e) for e in prepared.errors[:MAX_LISTED_ERRORS]], "stage": stage},
        )
    if not prepared.examples:
        raise DatasetError(
            f"no valid rows in {', '.join(i['path'] for i in prepared.inputs) or 'the input files'}; "
            "nothing was written",
            details={"errors": [asdict(e) for e in prepared.errors[:MAX_LISTED_ERRORS]], "stage": stage},
        )

    splits = split(prepared.examples, dataset, config.training.seed)
    writes: dict[Path, str] = {}
    outputs = {}
    for name in SPLITS:
        path = out_dir / f"{name}.jsonl"
        records = (to_record(e, dataset.record_format) for e in splits[name])
        text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        writes[path] = text
        outputs[name] = {"path": _display(path, config.root), "rows": len(splits[name]),
                         "sha256": hashlib.sha256(text.encode()).hexdigest()}

    if tokenizer_path is None and config.base_model.local_path is not None:
        tokenizer_path = config.resolve(config.base_model.local_path)
    if tokenizer_path is not None:
        tokenizer_path = guard.check_path(tokenizer_path, "the tokenizer folder")
    tokenizer = load_tokenizer(tokenizer_path)
    now = datetime.now(timezone.utc)
    report = {
        "generated_at": now.isoformat(timespec="seconds"),
        "stage": stage,
        "seed": config.training.seed,
        "record_format": dataset.record_format,
        "preference_pairs": preference_stage(config, stage),
        "fields": {k: getattr(dataset, k) for k in (
            "instruction_field", "input_field", "system_field", "output_field", "quality_field", "metadata_field",
            *(("prompt_field", "chosen_field", "rejected_field") if preference_stage(config, stage) else ()))},
        "inputs": prepared.inputs,
        "counts": {
            "rows_read": prepared.rows_read,
            "accepted": len(prepared.examples),
            "rejected": len(prepared.errors),
            "duplicates_removed": len(prepared.duplicates),
            **{name: len(splits[name]) for name in SPLITS},
        },
        "outputs": outputs,
        "rejected": [asdict(e) for e in prepared.errors[:MAX_LISTED_ERRORS]],
        "duplicates": prepared.duplicates[:MAX_LISTED_ERRORS],
        # weighting applies to the training split only (it is split off before weighting)
        "weighting": weighting.summary([e.quality for e in splits["train"]], config.training.quality_weight_multiplier,
                                       config.training.quality_threshold, config.training.quality_weighting),
        **quality_report(prepared.examples, tokenizer, config.training.max_seq_length),
    }
    label = "" if stage == 1 else "_stage2"
    report_path = reports_dir / f"quality_report{label}_{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    writes[report_path] = text
    writes[reports_dir / f"latest{label}.json"] = text
    return Plan(writes, {
        "stage": stage,
        "counts": report["counts"],
        "outputs": outputs,
        "report": _display(report_path, config.root),
        "rejected": report["rejected"][:20],
        "length_unit": report["lengths"]["unit"],
    })


def write(plans: list[Plan]) -> list[dict[str, Any]]:
    """Write validated plans (each file atomically); returns their summaries."""
    for each in plans:
        for path, text in each.writes.items():
            write_atomic(path, text)
    return [each.summary for each in plans]


def prepare(config: FineTuningConfig, inputs: Optional[list[Path]] = None, **options: Any) -> dict[str, Any]:
    """Plan and write one stage (see plan); returns its summary."""
    return write([plan(config, inputs, **options)])[0]
