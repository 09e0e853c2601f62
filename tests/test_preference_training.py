"""Preference training end to end through generated projects, on both engines: the classic
recipe (SFT stage 1, then DPO stage 2 against the SFT model, with replay) learns to prefer the
chosen answers and resumes after kill -9 exactly as an uninterrupted run; ORPO trains alone."""

from __future__ import annotations

import json
import math

import pytest
from test_training_failures import LOCAL, configure, kill_9_after

from conftest import render, script

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx_lm")

SETTINGS = ["--set", "training.stage1.iterations=20", "--set", "training.stage1.learning_rate=5e-3",
            "--set", "training.stage2.iterations=120", "--set", "training.stage2.learning_rate=3e-3",
            "--set", "training.stage2.warmup_steps=0", "--set", "training.stage2.replay_ratio=0.25",
            "--set", "training.save_steps=10", "--set", "training.log_steps=10", "--set", "training.eval_steps=40"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = render(tmp_path_factory.mktemp("preference") / "p", model_type="llama", num_stages=2,
                     stage2_method="dpo")
    assert script(project, "make_tiny_model.py", "--no-verify")[0] == 0
    code, out = script(project, "prepare_dataset.py")
    assert code == 0, out
    return project


def stage2_lines(project, run_id: str) -> list[dict]:
    lines = (project / "runs" / run_id / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("stage") == 2 and "val_loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_sft_then_dpo_learns_and_resumes_after_kill_9_exactly(project, backend):
    settings = [*SETTINGS, "--set", f"training.backend={backend}"]
    code, reference = script(project, "train.py", "--name", f"ref-{backend}", *LOCAL, *settings)
    assert code == 0, reference
    first, second = reference["stages"]["stage1"], reference["stages"]["stage2"]
    assert first["val_loss"] < first["val_loss_before"]
    # DPO starts at log 2 (the policy is its reference, the SFT model) and learns to prefer the chosen answers
    assert second["val_loss_before"] == pytest.approx(math.log(2), abs=1e-6)
    assert second["val_loss"] < math.log(2) - 0.05
    lines = stage2_lines(project, reference["run_id"])
    assert lines[-1]["val_reward_accuracy"] > 0.5 and lines[-1]["val_reward_margin"] > 0
    run_dir = project / "runs" / reference["run_id"]
    metadata = json.loads((run_dir / "stage2" / "training_metadata.json").read_text())
    assert metadata["method"]["name"] == "dpo" and metadata["method"]["beta"] == 0.1 and metadata["rows"]["replay"] > 0
    assert metadata["method"]["reference"]["pairs"] > 0 and metadata["method"]["reference"]["seconds"] >= 0
    assert (run_dir / "stage2" / "reference_logps.json").is_file()

    run_id = configure(project, f"killed-{backend}", *settings)
    done = kill_9_after(project, run_id, 30, stage=2)
    assert done and max(done) < 120, "the kill came after the end; nothing was tested"
    cached = (project / "runs" / run_id / "stage2" / "reference_logps.json").read_bytes()
    code, out = script(project, "train.py", "--run-id", run_id, "--resume")
    assert code == 0, out
    resumed = out["stages"]["stage2"]
    assert resumed["resumed_from"] == max(done)
    assert resumed["val_loss"] == pytest.approx(second["val_loss"], rel=1e-4)
    assert resumed["train_loss"] == pytest.approx(second["train_loss"], rel=1e-4)
    for ours, theirs in zip(stage2_lines(project, run_id)[-1:], lines[-1:], strict=True):
        assert ours["val_reward_margin"] == pytest.approx(theirs["val_reward_margin"], rel=1e-3, abs=1e-6)
    assert (project / "runs" / run_id / "stage2" / "reference_logps.json").read_bytes() == cached


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_orpo_trains_on_pairs_alone(tmp_path, backend):
    project = render(tmp_path / "orpo", model_type="llama", num_stages=1, stage1_method="orpo")
    assert script(project, "make_tiny_model.py", "--no-verify")[0] == 0
    assert script(project, "prepare_dataset.py")[0] == 0
    assert '"rejected"' in (project / "data" / "processed" / "train.jsonl").read_text()
    code, out = script(project, "train.py", "--name", "orpo", *LOCAL, "--set", f"training.backend={backend}",
                       "--set", "training.stage1.iterations=30", "--set", "training.stage1.learning_rate=5e-3",
                       "--set", "training.eval_steps=30", "--set", "training.log_steps=10")
    assert code == 0, out
    stage = out["stages"]["stage1"]
    assert stage["val_loss"] < stage["val_loss_before"]
    lines = [json.loads(line) for line in (project / "runs" / out["run_id"] / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*lines)
    assert {"reward_accuracy", "reward_margin", "chosen_reward", "val_reward_accuracy", "val_reward_margin"} <= keys


@pytest.mark.slow
def test_a_dpo_stage_refuses_data_without_pairs(project):
    code, out = script(project, "configure_run.py", "--name", "nopairs", *LOCAL,
                       "--stage2-train", "data/processed/train.jsonl")
    assert code != 0 and "rejected" in out["error"]["message"] and "line 1" in out["error"]["message"]
    assert not list((project / "runs").glob("nopairs-*"))
