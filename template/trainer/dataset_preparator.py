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

import csv
import glob
import hashlib
import io
import json
import math
import random
import statistics
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from trainer import guard, weighting
from trainer.config import DatasetSection, FineTuningConfig
from trainer.errors import ProjectError, advice
from trainer.files import sha256_file, write_atomic

SPLITS = ("train", "valid", "test")
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
ROLES = {"system", "user", "assistant"}
MAX_LISTED_ERRORS = 1000


class DatasetError(ProjectError):
    kind = "dataset_error"


@dataclass(frozen=True)
class RowError:
    file: str
    line: int  # 1-based line (jsonl, csv) or row (parquet); 0 = the whole file
    field: Optional[str]
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        where = f"{self.file}" if self.line == 0 else f"{self.file}, {self.unit} {self.line}"
        what = f"field '{self.field}': " if self.field else ""
        return f"{where}: {what}{self.reason}"


@dataclass
class Example:
    messages: list[dict[str, str]]
    source: str
    quality: Optional[float] = None
    metadata: Optional[dict[str, Any]] = None

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.messages, sort_keys=True).encode()).hexdigest()

    def prompt_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] != "assistant")

    def completion_text(self) -> str:
        return "\n".join(m["content"] for m in self.messages if m["role"] == "assistant")


@dataclass
class Rejected(Exception):
    """Raised while mapping a row; becomes a RowError with the row's location."""

    field: Optional[str]
    reason: str


# ----------------------------------------------------------------- reading


def find_inputs(dataset: DatasetSection, root: Path, stage: int = 1) -> list[Path]:
    """The raw files of a stage (dataset.raw_files, or stage2_raw_files), sorted, each once."""
    patterns = dataset.raw_files if stage == 1 else dataset.stage2_raw_files
    key = "raw_files" if stage == 1 else "stage2_raw_files"
    found: dict[Path, None] = {}
    for pattern in patterns:
        full = Path(pattern).expanduser()
        full = full if full.is_absolute() else root / full
        for match in sorted(glob.glob(str(full))):
            path = Path(match)
            if path.is_file():  # a link in data/raw to a file outside the roots is refused
                found.setdefault(guard.check_path(path, f"dataset.{key}: {match}"), None)
    if not found:
        where = "data/raw/" if stage == 1 else "data/raw/stage2/"
        raise DatasetError(
            f"no raw data files match dataset.{key} {patterns} (relative to {root}); "
            + advice(f"put {dataset.format} files in {where} or pass --input",
                     f"put data files in {where} or pass input_files to prepare_dataset"),
            details={"patterns": patterns, "stage": stage},
        )
    return list(found)


def file_format(path: Path, default: str) -> str:
    return FORMATS.get(path.suffix.lower(), default)


BOM = b"\xef\xbb\xbf"  # spreadsheets save "CSV UTF-8" with it; some editors put it in JSONL too


def _not_utf8(raw: bytes, error: UnicodeDecodeError, start: int) -> str:
    """Why `raw` (read from byte offset `start` of its file) is refused."""
    return (f"not UTF-8 text (byte {raw[error.start:error.start + 1]!r} at byte offset {start + error.start} "
            "of the file); save it as UTF-8")


# Long documents in one cell are fine up to this (the csv module's default is 128 KiB).
csv.field_size_limit(max(csv.field_size_limit(), 16 << 20))


def _csv_text(path: Path, name: str) -> str:
    """The whole CSV as text (BOM dropped); bytes that are not UTF-8 are an error naming the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DatasetError(f"{name}, line {line}: {_not_utf8(raw, error, 0)}") from None


def _parquet(path: Path, name: str, schema_only: bool = False):
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise DatasetError(f"{name}: reading parquet needs pyarrow (pip install pyarrow)") from error
    try:
        return pq.read_schema(path) if schema_only else pq.read_table(path)
    except (OSError, ValueError) as error:  # ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise DatasetError(f"{name}: not a readable parquet file ({error})") from None


def read_rows(path: Path, fmt: str, name: str) -> Iterator[tuple[int, Any]]:
    """(line or row number, raw row) pairs; a row that cannot be parsed is a RowError."""
    if fmt == "jsonl":
        offset = 0
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, 1):
                start, offset = offset, offset + len(raw)
                if number == 1 and raw.startswith(BOM):
                    raw, start = raw[len(BOM):], start + len(BOM)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    yield number, RowError(name, number, None, _not_utf8(raw, error, start))
                    continue
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as error:
                    yield number, RowError(name, number, None, f"malformed JSON ({error.msg} at column {error.colno})")
    elif fmt == "csv":
        reader = csv.DictReader(io.StringIO(_csv_text(path, name), newline=""))
        start = 2
        try:
            for row in reader:
                if None in row:
                    columns = len(reader.fieldnames or [])
                    yield start, RowError(name, start, None, f"row has more cells than the header's {columns} columns")
                else:
                    yield start, row
                start = reader.line_num + 1
        except csv.Error as error:  # a field over the size limit
            raise DatasetError(f"{name}, line {start}: not readable as CSV ({error})") from None
    elif fmt == "parquet":
        for number, row in enumerate(_parquet(path, name).to_pylist(), 1):
            yield number, row
    else:
        raise DatasetError(f"{name}: unsupported format '{fmt}' (supported: jsonl, csv, parquet)")


def columns_of(path: Path, fmt: str, name: str) -> Optional[list[str]]:
    """The header of a csv or the schema of a parquet file (None for jsonl)."""
    if fmt == "csv":
        try:
            return next(csv.reader(io.StringIO(_csv_text(path, name), newline="")), [])
        except csv.Error as error:
            raise DatasetError(f"{name}, line 1: not readable as CSV ({error})") from None
    if fmt == "parquet":
        return list(_parquet(path, name, schema_only=True).names)
    return None


# ----------------------------------------------------------------- mapping


def shown(value: Any, limit: int = 60) -> str:
    """A value quoted in an error: its repr, cut short (rows can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _text(row: dict[str, Any], name: str, required: bool) -> Optional[str]:
    value = row.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise Rejected(name, "missing field" if name not in row else "value is empty")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Rejected(name, f"must be text, got {type(value).__name__}")
    text = str(value)
    if not text.strip():
        if required:
            raise Rejected(name, "value is empty")
        return None
    return text


def _quality(row: dict[str, Any], name: str) -> Optional[float]:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise Rejected(name, f"non-numeric quality score {shown(value)}")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise Rejected(name, f"non-numeric quality score {shown(value)}") from None
    if not math.isfinite(score):
        raise Rejected(name, f"quality score must be a finite number, got {shown(value)}")
    if not 0 <= score <= 1:
        raise Rejected(name, f"quality score must be in [0, 1], got {score:g}")
    return score


def _metadata(row: dict[str, Any], name: str) -> Optional[dict[str, Any]]:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Rejected(name, "metadata text is not valid JSON") from None
    if not isinstance(value, dict):
        raise Rejected(name, f"metadata must be an object, got {type(value).__name__}")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise Rejected("messages", "must be a non-empty list of {role, content} objects")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise Rejected("messages", f"message {index} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise Rejected("messages", f"message {index} has role {shown(role)}; allowed: assistant, system, user")
        if not isinstance(content, str) or not content.strip():
            raise Rejected("messages", f"message {index} ({role}) has empty or non-text content")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise Rejected("messages", "the last message must be the assistant's answer")
    if not any(m["role"] == "user" for m in messages):
        raise Rejected("messages", "there is no user message")
    return messages


def to_example(row: Any, dataset: DatasetSection, source: str) -> Example:
    """Map one raw row to an Example, or raise Rejected naming the bad field."""
    if not isinstance(row, dict):
        raise Rejected(None, f"row must be an object, got {type(row).__name__}")
    if dataset.instruction_field not in row and "messages" in row:
        messages = _messages(row["messages"])
    elif "prompt" in row and "completion" in row and dataset.output_field not in row:
        messages = [{"role": "user", "content": _text(row, "prompt", True)},
                    {"role": "assistant", "content": _text(row, "completion", True)}]
    else:
        instruction = _text(row, dataset.instruction_field, True)
        extra = _text(row, dataset.input_field, False) if dataset.input_field else None
        system = _text(row, dataset.system_field, False) if dataset.system_field else None
        output = _text(row, dataset.output_field, True)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": output},
        ]
    quality = _quality(row, dataset.quality_field) if dataset.quality_field else None
    metadata = _metadata(row, dataset.metadata_field) if dataset.metadata_field else None
    return Example(messages=messages, source=source, quality=quality, metadata=metadata)


def to_record(example: Example, record_format: str) -> dict[str, Any]:
    """The processed JSONL record: mlx-lm's chat or completions format plus our extras."""
    if record_format == "chat":
        record: dict[str, Any] = {"messages": example.messages}
    else:
        turns = [m for m in example.messages if m["role"] != "system"]
        if len(turns) != 2:
            raise Rejected("messages", "a multi-turn conversation cannot be a completion record; "
                                       "use record_format: chat")
        record = {"prompt": turns[0]["content"], "completion": turns[1]["content"]}
        system = [m["content"] for m in example.messages if m["role"] == "system"]
        if system:
            record["system"] = system[0]
    if example.quality is not None:
        record["quality"] = example.quality
    if example.metadata is not None:
        record["metadata"] = example.metadata
    record["source"] = example.source
    return record


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


def collect(config: FineTuningConfig, inputs: list[Path]) -> Preparation:
    """Read and validate every row of every input file."""
    dataset = config.dataset
    result = Preparation()
    seen: dict[str, str] = {}
    required = [dataset.instruction_field, dataset.output_field]
    for path in inputs:
        if not path.is_file():
            raise DatasetError(f"input file not found: {path}")
        guard.check_path(path, "an input file")
        name = _display(path, config.root)
        fmt = file_format(path, dataset.format)
        unit = "row" if fmt == "parquet" else "line"
        columns = columns_of(path, fmt, name)
        has_chat = columns is not None and ("messages" in columns or {"prompt", "completion"} <= set(columns))
        missing = [c for c in required if columns is not None and c not in columns and not has_chat]
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
                example = to_example(row, dataset, source)
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
    prepared = collect(config, paths)

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
        "fields": {k: getattr(dataset, k) for k in (
            "instruction_field", "input_field", "system_field", "output_field", "quality_field", "metadata_field")},
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
