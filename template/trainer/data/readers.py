"""Raw data files -> rows, each with its line (jsonl, csv) or row (parquet) number: the
formats, their encodings (a UTF-8 byte order mark is accepted, other encodings are refused
naming the byte), and the errors that name file, line and field."""

from __future__ import annotations

import csv
import glob
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from trainer import guard
from trainer.config import DatasetSection
from trainer.errors import ProjectError, advice

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
# Long documents in one cell are fine up to this (the csv module's default is 128 KiB).
csv.field_size_limit(max(csv.field_size_limit(), 16 << 20))


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


def shown(value: Any, limit: int = 60) -> str:
    """A value quoted in an error: its repr, cut short (rows can hold megabytes)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
