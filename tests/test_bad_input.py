"""Bad data through a generated project's own script: the --json error names the file,
the line (parquet: row) and the field, the exit code is 1, and data/ is left untouched."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import render, script, snapshot


@pytest.fixture
def project(tmp_path):
    return render(tmp_path / "project", project_name="bad-input")


def test_broken_jsonl_line(project):
    raw = project / "data" / "raw" / "sample_dataset.jsonl"
    lines = raw.read_text().splitlines()
    lines[41] = lines[41][:-5]  # cut the end off line 42
    raw.write_text("\n".join(lines) + "\n")
    before = snapshot(project / "data")
    code, out = script(project, "prepare_dataset.py")
    assert code == 1
    error = out["error"]
    assert error["type"] == "dataset_error"
    assert "data/raw/sample_dataset.jsonl, line 42: malformed JSON" in error["message"]
    assert [(e["file"], e["line"]) for e in error["errors"]] == [("data/raw/sample_dataset.jsonl", 42)]
    assert snapshot(project / "data") == before


def test_csv_missing_the_output_column(project):
    path = project / "data" / "raw" / "extra.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instruction", "quality"])
        writer.writerow(["What is 1 plus 1?", "0.9"])
    before = snapshot(project / "data")
    code, out = script(project, "prepare_dataset.py", "--input", str(path))
    assert code == 1
    assert out["error"]["errors"] == [{"file": "data/raw/extra.csv", "line": 0, "field": "output",
                                       "reason": "missing column (columns: instruction, quality)", "unit": "line"}]
    assert "data/raw/extra.csv: field 'output': missing column" in out["error"]["message"]
    assert snapshot(project / "data") == before


def test_parquet_with_a_non_numeric_quality_column(project):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = project / "data" / "raw" / "scored.parquet"
    pq.write_table(pa.table({"instruction": ["a?", "b?", "c?", "d?"], "output": ["A.", "B.", "C.", "D."],
                             "quality": ["0.9", "0.8", "very good", "n/a"]}), path)
    before = snapshot(project / "data")
    code, out = script(project, "prepare_dataset.py", "--input", str(path))
    assert code == 1
    assert [(e["line"], e["field"], e["reason"]) for e in out["error"]["errors"]] == [
        (3, "quality", "non-numeric quality score 'very good'"),
        (4, "quality", "non-numeric quality score 'n/a'"),
    ]
    assert "data/raw/scored.parquet, row 3: field 'quality'" in out["error"]["message"]
    assert snapshot(project / "data") == before


def test_skip_invalid_keeps_going_and_reports(project):
    raw = project / "data" / "raw" / "sample_dataset.jsonl"
    with raw.open("a") as handle:
        handle.write('{"instruction": "no answer"}\n')
    code, out = script(project, "prepare_dataset.py", "--skip-invalid")
    assert code == 0
    assert out["counts"]["rejected"] == 1
    assert out["rejected"][0]["field"] == "output" and out["rejected"][0]["reason"] == "missing field"
    report = json.loads((project / out["report"]).read_text())
    assert report["rejected"] == out["rejected"]


def test_invalid_config_is_reported_as_config_error(project):
    code, out = script(project, "prepare_dataset.py", env={"OLMO_DATASET__TRAIN_SPLIT": "2"})
    assert code == 1
    assert out["error"]["type"] == "config_error"
    assert any("dataset.train_split" in p and "OLMO_DATASET__TRAIN_SPLIT" in p for p in out["error"]["problems"])
