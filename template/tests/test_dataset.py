"""Dataset preparation: mapping, validation with precise errors, deterministic splits,
the quality report, and nothing written (or modified) when input is bad."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import load_config
from trainer.data.dataset_preparator import DatasetError, prepare
from trainer.errors import ProjectError

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, str]:
    """Content hashes of every file below `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def good_row(config, i: int, **extra) -> dict:
    d = config.dataset
    row = {d.instruction_field: f"Question number {i}?", d.output_field: f"Answer number {i}."}
    if d.quality_field:
        row[d.quality_field] = 0.5
    row.update(extra)
    return row


def use_only(project: Path, name: str, lines: list[str]):
    """Replace the raw data with one jsonl file and point the config at it."""
    for old in (project / "data" / "raw").iterdir():
        if old.is_file():
            old.unlink()
    (project / "data" / "raw" / name).write_text("".join(line + "\n" for line in lines))
    return load_config(project / "config" / "fine_tuning_config.yaml", environ={},
                       overrides={"dataset.raw_files": [f"data/raw/{name}"]})


def test_sample_dataset_prepares_into_three_chat_splits(config, project):
    raw_before = snapshot(project / "data" / "raw")
    result = prepare(config)
    counts = result["counts"]
    assert counts["rejected"] == 0 and counts["accepted"] >= 150
    assert counts["train"] + counts["valid"] + counts["test"] == counts["accepted"]
    assert abs(counts["test"] - round(counts["accepted"] * config.dataset.test_split)) <= 1
    train = rows(project / "data" / "processed" / "train.jsonl")
    assert len(train) == counts["train"]
    first = train[0]
    assert [m["role"] for m in first["messages"]][-2:] == ["user", "assistant"]
    assert all(m["content"].strip() for m in first["messages"])
    assert first["source"].startswith("data/raw/sample_dataset")
    if config.dataset.quality_field:
        assert all(0 <= r["quality"] <= 1 for r in train)
    assert snapshot(project / "data" / "raw") == raw_before, "raw data must never change"


def test_split_is_deterministic_and_seeded(config, project):
    prepare(config)
    first = (project / "data" / "processed" / "test.jsonl").read_text()
    prepare(config)
    assert (project / "data" / "processed" / "test.jsonl").read_text() == first
    other = load_config(project / "config" / "fine_tuning_config.yaml", environ={},
                        overrides={"training.seed": config.training.seed + 1})
    prepare(other)
    assert (project / "data" / "processed" / "test.jsonl").read_text() != first


def test_splits_do_not_overlap(config, project):
    prepare(config)
    seen = {}
    for split in ("train", "valid", "test"):
        for record in rows(project / "data" / "processed" / f"{split}.jsonl"):
            key = json.dumps(record["messages"], sort_keys=True)
            assert key not in seen, f"{record['source']} in {split} and {seen.get(key)}"
            seen[key] = split


def test_quality_report_has_counts_histogram_and_lengths(config, project):
    result = prepare(config)
    report = json.loads((project / result["report"]).read_text())
    assert report == json.loads((project / "data" / "quality_reports" / "latest.json").read_text())
    assert report["counts"]["accepted"] == result["counts"]["accepted"]
    assert len(report["inputs"]) == 1 and len(report["inputs"][0]["sha256"]) == 64
    if config.dataset.quality_field:
        assert sum(b["count"] for b in report["quality"]["histogram"]) == report["quality"]["rows_with_score"]
        assert report["quality"]["rows_with_score"] == report["counts"]["accepted"]
    assert report["lengths"]["unit"] == "characters"
    assert report["lengths"]["total"]["max"] >= report["lengths"]["total"]["p50"] > 0
    if config.dataset.metadata_field:
        assert report["categories"]


def test_malformed_json_line_names_file_and_line_and_writes_nothing(config, project):
    good = json.dumps(good_row(config, 1))
    lines = [good, good.replace("1", "2"), '{"instruction": "x", ', good.replace("1", "3")]
    config = use_only(project, "broken.jsonl", lines)
    before = snapshot(project / "data")
    with pytest.raises(DatasetError) as caught:
        prepare(config)
    assert "data/raw/broken.jsonl, line 3: malformed JSON" in str(caught.value)
    assert caught.value.details["errors"][0]["line"] == 3
    assert snapshot(project / "data") == before


def test_missing_and_empty_fields_are_named(config, project):
    d = config.dataset
    no_output = good_row(config, 2)
    del no_output[d.output_field]
    empty_instruction = good_row(config, 3, **{d.instruction_field: "   "})
    config = use_only(project, "d.jsonl", [json.dumps(good_row(config, 1)), json.dumps(no_output),
                                          json.dumps(empty_instruction)])
    with pytest.raises(DatasetError) as caught:
        prepare(config)
    message = str(caught.value)
    assert f"line 2: field '{d.output_field}': missing field" in message
    assert f"line 3: field '{d.instruction_field}': value is empty" in message


def test_non_numeric_and_out_of_range_quality(config, project):
    d = config.dataset
    if not d.quality_field:
        pytest.skip("this project has no quality field")
    config = use_only(project, "q.jsonl", [json.dumps(good_row(config, 1, **{d.quality_field: "high"})),
                                          json.dumps(good_row(config, 2, **{d.quality_field: 7.5}))])
    with pytest.raises(DatasetError) as caught:
        prepare(config)
    message = str(caught.value)
    assert f"line 1: field '{d.quality_field}': non-numeric quality score 'high'" in message
    assert f"line 2: field '{d.quality_field}': quality score must be in [0, 1], got 7.5" in message


def test_skip_invalid_writes_valid_rows_and_reports_rejects(config, project):
    lines = [json.dumps(good_row(config, i)) for i in range(10)] + ["not json"]
    config = use_only(project, "mixed.jsonl", lines)
    result = prepare(config, skip_invalid=True)
    assert result["counts"]["accepted"] == 10 and result["counts"]["rejected"] == 1
    assert result["rejected"][0]["line"] == 11
    report = json.loads((project / result["report"]).read_text())
    assert report["rejected"][0]["reason"].startswith("malformed JSON")


def test_duplicates_are_removed_before_splitting(config, project):
    lines = [json.dumps(good_row(config, i)) for i in range(10)]
    config = use_only(project, "dups.jsonl", lines + lines[:3])
    result = prepare(config)
    assert result["counts"]["accepted"] == 10 and result["counts"]["duplicates_removed"] == 3


def test_rows_already_in_chat_or_completion_form_are_accepted(config, project):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}
    completion = {"prompt": "2+2?", "completion": "4"}
    lines = [json.dumps(good_row(config, i)) for i in range(5)] + [json.dumps(chat), json.dumps(completion)]
    config = use_only(project, "forms.jsonl", lines)
    assert prepare(config)["counts"]["accepted"] == 7
    everything = [r for s in ("train", "valid", "test") for r in rows(project / "data" / "processed" / f"{s}.jsonl")]
    assert chat["messages"] in [r["messages"] for r in everything]


def test_bad_chat_rows_are_rejected(config, project):
    no_answer = {"messages": [{"role": "user", "content": "Hi?"}]}
    bad_role = {"messages": [{"role": "robot", "content": "Hi?"}, {"role": "assistant", "content": "x"}]}
    config = use_only(project, "chat.jsonl", [json.dumps(no_answer), json.dumps(bad_role)])
    with pytest.raises(DatasetError) as caught:
        prepare(config)
    assert "line 1: field 'messages': the last message must be the assistant's answer" in str(caught.value)
    assert "line 2: field 'messages': message 0 has role 'robot'" in str(caught.value)


def test_empty_dataset_is_an_error(config, project):
    config = use_only(project, "empty.jsonl", [])
    with pytest.raises(DatasetError, match="no valid rows in data/raw/empty.jsonl"):
        prepare(config)


def test_no_matching_files_is_an_error(config, project):
    config = load_config(project / "config" / "fine_tuning_config.yaml", environ={},
                         overrides={"dataset.raw_files": ["data/raw/*.nothing"]})
    with pytest.raises(DatasetError, match="no raw data files match"):
        prepare(config)


def test_csv_missing_output_column_is_named(config, project):
    d = config.dataset
    path = project / "data" / "raw" / "table.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([d.instruction_field])
        writer.writerow(["What?"])
    before = snapshot(project / "data")
    with pytest.raises(DatasetError) as caught:
        prepare(config, [path])
    assert f"data/raw/table.csv: field '{d.output_field}': missing column" in str(caught.value)
    assert snapshot(project / "data") == before


def test_csv_rows_with_metadata_json(config, project):
    d = config.dataset
    path = project / "data" / "raw" / "table.csv"
    header = [d.instruction_field, d.output_field] + ([d.metadata_field] if d.metadata_field else [])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        metadata = ['{"category": "x"}'] if d.metadata_field else []
        for i in range(6):
            writer.writerow([f"Q{i}, with a comma", f"A{i}\nover two lines"] + metadata)
        writer.writerow(["Q9", "A9"] + (["{not json"] if d.metadata_field else []))
    result = prepare(config, [path], skip_invalid=True)
    assert result["counts"]["accepted"] == (6 if d.metadata_field else 7)
    if d.metadata_field:
        # the bad row starts on line 14: header, then six records of two lines each
        assert result["rejected"][0]["line"] == 14 and result["rejected"][0]["field"] == d.metadata_field


def test_parquet_non_numeric_quality_names_row_and_field(config, project):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    d = config.dataset
    quality = d.quality_field or "quality"
    config = load_config(project / "config" / "fine_tuning_config.yaml", environ={},
                         overrides={"dataset.quality_field": quality})
    table = pa.table({d.instruction_field: ["a?", "b?", "c?"], d.output_field: ["A", "B", "C"],
                      quality: ["0.9", "excellent", "0.1"]})
    path = project / "data" / "raw" / "scores.parquet"
    pq.write_table(table, path)
    before = snapshot(project / "data")
    with pytest.raises(DatasetError) as caught:
        prepare(config, [path])
    expected = f"data/raw/scores.parquet, row 2: field '{quality}': non-numeric quality score 'excellent'"
    assert expected in str(caught.value)
    assert snapshot(project / "data") == before


def test_script_json_contract(project):
    """scripts/prepare_dataset.py --json prints one JSON object last and exits 0 only on success."""
    script = ROOT / "scripts" / "prepare_dataset.py"
    config_path = project / "config" / "fine_tuning_config.yaml"
    ok = subprocess.run([sys.executable, str(script), "--config", str(config_path), "--json"],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout.strip().splitlines()[-1])
    assert result["counts"]["accepted"] > 0
    (project / "data" / "raw" / "bad.jsonl").write_text("{oops\n")
    bad = subprocess.run([sys.executable, str(script), "--config", str(config_path), "--json",
                          "--input", str(project / "data" / "raw" / "bad.jsonl")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    error = json.loads(bad.stdout.strip().splitlines()[-1])["error"]
    assert error["type"] == "dataset_error" and error["errors"][0]["line"] == 1


def test_byte_order_marks_from_spreadsheets_and_editors_are_accepted(config, project):
    d = config.dataset
    table = project / "data" / "raw" / "excel.csv"
    with table.open("w", newline="", encoding="utf-8-sig") as handle:  # Excel's "CSV UTF-8"
        writer = csv.writer(handle)
        writer.writerow([d.instruction_field, d.output_field])
        writer.writerows([[f"Q{i}?", f"A{i}."] for i in range(5)])
    lines = project / "data" / "raw" / "bom.jsonl"
    lines.write_text("".join(json.dumps(good_row(config, i)) + "\n" for i in range(5)), encoding="utf-8-sig")
    result = prepare(config, [table, lines])
    assert result["counts"]["accepted"] == 10 and result["counts"]["rejected"] == 0


def test_bytes_that_are_not_utf8_name_file_line_and_offset(config, project):
    path = project / "data" / "raw" / "binary.jsonl"
    first = (json.dumps(good_row(config, 1)) + "\n").encode()
    path.write_bytes(first + b'{"x": "\xff\xfe"}\n')
    with pytest.raises(DatasetError) as caught:
        prepare(config, [path])
    assert f"data/raw/binary.jsonl, line 2: not UTF-8 text (byte b'\\xff' at byte offset {len(first) + 7}" \
        in str(caught.value)
    table = project / "data" / "raw" / "latin1.csv"
    table.write_bytes(b"a,b\nok,fine\ncaf\xe9,x\n")
    with pytest.raises(DatasetError, match=r"data/raw/latin1.csv, line 3: not UTF-8 text"):
        prepare(config, [table])
    huge = project / "data" / "raw" / "huge.csv"  # one cell over the csv module's 16 MiB field limit
    huge.write_text(f"{config.dataset.instruction_field},{config.dataset.output_field}\nq,{'x' * (17 << 20)}\n")
    with pytest.raises(DatasetError, match=r"data/raw/huge.csv, line 2: not readable as CSV \(field larger"):
        prepare(config, [huge])
    assert not (project / "data" / "processed").exists(), "nothing is written"


def test_a_corrupt_parquet_file_is_named(config, project):
    pytest.importorskip("pyarrow")
    path = project / "data" / "raw" / "broken.parquet"
    path.write_bytes(b"PAR1" + bytes(range(256)) * 4)
    with pytest.raises(DatasetError, match=r"data/raw/broken.parquet: not a readable parquet file"):
        prepare(config, [path])


def test_both_stages_are_written_or_neither(config, project):
    """scripts/prepare_dataset.py prepares every stage; a bad stage-2 file leaves stage 1 untouched."""
    config_path = project / "config" / "fine_tuning_config.yaml"
    if config.training.num_stages != 2:
        pytest.skip("a one-stage project")
    script = ROOT / "scripts" / "prepare_dataset.py"
    run = [sys.executable, str(script), "--config", str(config_path), "--json"]
    assert subprocess.run(run, capture_output=True, text=True, check=False).returncode == 0
    sample = next(p for p in sorted((project / "data" / "raw").iterdir()) if p.is_file())
    if sample.suffix == ".csv":  # a new stage-1 row, so that stage 1's outputs would change
        with sample.open(newline="") as handle:
            header = next(csv.reader(handle))
        with sample.open("a", newline="") as handle:
            csv.DictWriter(handle, header).writerow(good_row(config, 1000))
    else:
        with sample.open("a") as handle:
            handle.write(json.dumps(good_row(config, 1000)) + "\n")
    bad_name = f"zz-bad.{config.dataset.format}"
    (project / "data" / "raw" / "stage2" / bad_name).write_text("{oops\n")
    before = snapshot(project / "data" / "processed")
    bad = subprocess.run(run, capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    error = json.loads(bad.stdout.strip().splitlines()[-1])["error"]
    assert error["message"].startswith("stage 2: ") and "stage 1's data validated, and was not written" \
        in error["message"] and bad_name in error["message"]
    assert snapshot(project / "data" / "processed") == before


def test_raw_files_of_every_supported_format_are_found_by_default(config, project):
    """A parquet file in a csv project (or any other mix) is read by its extension."""
    from trainer.data.dataset_preparator import find_inputs

    folders = [(1, project / "data" / "raw")]
    if config.training.num_stages == 2:
        folders.append((2, project / "data" / "raw" / "stage2"))
    for stage, folder in folders:
        added = [folder / f"extra-{stage}.{ext}" for ext in ("jsonl", "csv", "parquet", "pq")]
        for path in added:
            path.write_text("")
        found = find_inputs(config.dataset, project, stage)
        assert set(added) <= set(found), f"stage {stage}: {sorted(map(str, found))}"


def test_import_copies_only_data_that_validates_and_keeps_the_rest(config, project, tmp_path):
    from trainer.data.data_import import import_files

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    good = inbox / "mine.jsonl"
    field, answer = config.dataset.instruction_field, config.dataset.output_field
    good.write_text("".join(json.dumps({field: f"q{i}", answer: f"a{i}"}) + "\n" for i in range(12)))
    bad = inbox / "bad.jsonl"
    bad.write_text(json.dumps({field: "q"}) + "\n")
    raw = project / "data" / "raw"
    before = sorted(p.name for p in raw.iterdir())
    with pytest.raises(DatasetError, match=r"(?s)nothing was imported.*bad\.jsonl, line 1"):
        import_files(config, [good, bad], replace_samples=True)
    assert sorted(p.name for p in raw.iterdir()) == before
    out = import_files(config, [good], replace_samples=True)
    assert out["validation"]["counts"]["accepted"] == 12 and out["unmatched"] == []
    assert (raw / "mine.jsonl").read_bytes() == good.read_bytes()
    assert not [p for p in raw.glob("sample_dataset.*")] and out["removed_samples"]
    with pytest.raises(ProjectError, match="already exists"):
        import_files(config, [good])


def test_preference_pairs_keep_the_rejected_answer_and_bad_pairs_name_line_and_field(project):
    lines = [json.dumps({"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"answer {i}"})
             for i in range(6)]
    use_only(project, "pairs.jsonl", lines)
    config = load_config(project / "config" / "fine_tuning_config.yaml", environ={},
                         overrides={"dataset.raw_files": ["data/raw/pairs.jsonl"], "training.stage1.method": "dpo"})
    prepare(config)
    processed = [r for split in ("train", "valid", "test")
                 for r in rows(project / "data" / "processed" / f"{split}.jsonl")]
    assert len(processed) == 6
    for record in processed:  # a chat record (SFT reads it as the chosen answer) plus the rejected answer
        question, answer = record["messages"][0]["content"], record["messages"][-1]["content"]
        number = question.split()[1].rstrip("?")
        assert answer == f"Answer {number}." and record["rejected"] == f"answer {number}"

    bad = [*lines[:2], json.dumps({"prompt": "x?", "chosen": "y"}),
           json.dumps({"prompt": "z?", "chosen": "same", "rejected": "same"})]
    (project / "data" / "raw" / "pairs.jsonl").write_text("".join(line + "\n" for line in bad))
    before = snapshot(project / "data")
    with pytest.raises(DatasetError) as caught:
        prepare(config)
    message = str(caught.value)
    assert "data/raw/pairs.jsonl, line 3: field 'rejected': missing field" in message
    assert "line 4: field 'rejected': the rejected answer is the chosen one" in message
    assert snapshot(project / "data") == before
