"""The benchmark scripts run and print their tables (small sizes; no timing is asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def test_weighting_and_preparation_benchmark_prints_its_tables():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "weighting_and_data.py"), "--sizes", "2000"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    lines = out.splitlines()
    weighting = lines[lines.index("quality weighting: index sampling vs duplicated rows") + 2].split()
    assert weighting[0] == "2000" and int(weighting[6]) > 2000, out  # duplication grows the data set
    assert float(weighting[7]) > 1, "index sampling must need less memory than copies"
    preparation = lines[lines.index("data preparation (scripts/prepare_dataset.py's code path)") + 2].split()
    assert preparation[0] == "2000" and float(preparation[2]) > 0, out


@pytest.mark.slow
def test_transformers_benchmark_runs_both_sides():
    pytest.importorskip("peft")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "transformers_vs_trainer.py"), "--steps", "2",
                          "--repeats", "1", "--rows", "60", "--precision", "bf16"],
                         capture_output=True, text=True, timeout=900).stdout
    assert "project, packing / HF Trainer:" in out, out[-3000:]
    assert "precision bf16 on every side" in out and "bf16 matmul peak" in out  # the baselines checked it too
    names = ("project transformers", "project, packing", "HF Trainer + peft", "TRL SFTTrainer, packing")
    rows = {line[:26].strip(): line[26:].split() for line in out.splitlines() if line.startswith(names)
            and "/" not in line}
    assert set(rows) == set(names)
    assert all(float(values[0]) > 0 and float(values[1]) > 0 and values[2].endswith("%") for values in rows.values())


@pytest.mark.slow
def test_mlx_benchmark_runs_both_sides():
    pytest.importorskip("mlx_lm")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "mlx_vs_mlx_lm.py"), "--steps", "2", "--repeats", "1",
                          "--rows", "60", "--small"], capture_output=True, text=True, timeout=900).stdout
    assert "ratio (project mlx / raw):" in out, out[-3000:]
    rows = {line[:20].strip(): line[20:].split() for line in out.splitlines()
            if line.startswith(("project mlx", "project, grouped", "raw mlx_lm.lora"))}
    assert set(rows) == {"project mlx", "project, grouped", "raw mlx_lm.lora"}
    for name, values in rows.items():
        tokens_per_second, wall, peak, tokens = map(float, values)
        assert tokens_per_second > 0 and wall > 0 and peak > 0.05, (name, values)
        assert tokens > 2 * 4, "two steps of 4 rows train on more than one token a row"


@pytest.mark.slow
def test_dpo_benchmark_runs_both_sides():
    pytest.importorskip("trl")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "dpo_vs_trl.py"), "--steps", "2", "--repeats", "1",
                          "--rows", "30"], capture_output=True, text=True, timeout=900).stdout
    assert "ratio (project / TRL):" in out, out[-3000:]
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines()
            if line.startswith(("project DPO", "TRL DPOTrainer"))}
    assert set(rows) == {"project DPO", "TRL DPOTrainer"}
    assert all(float(values[0]) > 0 and float(values[1]) > 0 and values[2].endswith("%") for values in rows.values())
    assert "reference pass" in out
