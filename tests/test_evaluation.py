"""Evaluation through a generated two-stage project with both engines: metrics for each
stage and the base model, custom metrics, the forgetting check, files and manifest, the
engines agreeing on the base model, and the refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_training import local, make_project, train

from conftest import script

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx_lm")
pytest.importorskip("sacrebleu")

METRIC = "def mean_length(predictions, references):\n    return sum(map(len, predictions)) / max(1, len(predictions))\n"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("evaluation"), "llama", num_stages=2)
    (project / "mymetrics.py").write_text(METRIC)
    return project


@pytest.fixture(scope="module")
def evaluated(project):
    results = {}
    for backend in ("transformers", "mlx"):
        run = train(project, f"ev-{backend}", backend, "llama", "--set", "training.stage2.iterations=20",
                    "--set", "evaluation.custom_metrics=[mymetrics:mean_length]")
        run_id = Path(run["manifest_path"]).parent.name
        stages = {}
        for stage in (1, 2):
            code, out = script(project, "evaluate.py", "--run-id", run_id, "--stage", str(stage), "--max-samples", "8")
            assert code == 0, out
            stages[stage] = out
        results[backend] = {"run_id": run_id, **stages}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_each_stage_and_the_base_model_are_measured(project, evaluated, backend):
    first, second = evaluated[backend][1], evaluated[backend][2]
    metrics = first["metrics"]
    assert metrics["rows"] == 8 and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert {"accuracy", "bleu", "chrf"} <= set(metrics) and 0 <= metrics["accuracy"] <= 1
    assert metrics["custom_metrics"]["mymetrics:mean_length"] >= 0
    assert first["base"]["perplexity"] > metrics["perplexity"], "training must beat the base on its own task"
    check = first["thresholds"]["checks"]["stage1"]  # the default: chrF improvement over the base model
    assert check["threshold"] == 0.1 and check["tuned"] == metrics["chrf"] and check["base"] == first["base"]["chrf"]

    folder = Path(first["results_file"]).parent
    assert json.loads(Path(first["results_file"]).read_text())["metrics"] == metrics
    samples = [json.loads(line) for line in Path(first["samples_file"]).read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "reference", "prediction", "exact_match", "base_prediction"} <= set(
        samples[0])
    assert folder == project / "runs" / evaluated[backend]["run_id"] / "stage1" / "evaluation"

    forgetting = second["forgetting"]
    assert forgetting["stage1_model"]["rows"] == forgetting["stage2_model"]["rows"] == 8
    assert forgetting["perplexity_increase"] == pytest.approx(
        forgetting["stage2_model"]["perplexity"] / forgetting["stage1_model"]["perplexity"] - 1)
    assert set(second["thresholds"]["checks"]) == {"stage2", "sequential"}

    manifest = json.loads((project / "runs" / evaluated[backend]["run_id"] / "run-manifest.json").read_text())
    assert set(manifest["evaluation"]) == {"stage1", "stage2"}
    assert manifest["evaluation"]["stage2"]["perplexity"] == second["metrics"]["perplexity"]
    assert manifest["stages"]["stage1"]["evaluation_file"] == "stage1/evaluation/results.json"


@pytest.mark.slow
def test_the_engines_agree_on_the_base_model(evaluated):
    """Same base model, same test rows: the same perplexity, and the same greedy answers."""
    mlx, torch = evaluated["mlx"][1]["base"], evaluated["transformers"][1]["base"]
    assert mlx["perplexity"] == pytest.approx(torch["perplexity"], rel=1e-4)
    assert mlx["chrf"] == pytest.approx(torch["chrf"], abs=1e-6)


@pytest.mark.slow
def test_refusals(project):
    code, configured = script(project, "configure_run.py", "--name", "untrained", *local("llama"))
    run_id = configured["run_id"]
    code, out = script(project, "evaluate.py", "--run-id", run_id, "--stage", "1")
    assert code == 1 and "stage 1 of run" in out["error"]["message"] and "has not completed" in out["error"]["message"]
    code, out = script(project, "evaluate.py", "--run-id", "missing-run", "--stage", "1")
    assert code == 1 and "unknown run id" in out["error"]["message"]
    trained = train(project, "one", "transformers", "llama", "--set", "training.num_stages=1")
    run_id = Path(trained["manifest_path"]).parent.name
    code, out = script(project, "evaluate.py", "--run-id", run_id, "--stage", "2")
    assert code == 1 and "has no stage 2" in out["error"]["message"]
    code, out = script(project, "evaluate.py", "--run-id", run_id, "--stage", "1", "--test-data", "nope.jsonl")
    assert code == 1 and "test data not found" in out["error"]["message"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_lm_evaluation_harness_runs_base_and_tuned_on_a_local_task(project, evaluated, backend):
    """lm-evaluation-harness on a task it loads from the YAML written over the test split: its greedy
    answers through the chat template are the project's own, for the tuned model (an mlx adapter
    converted for peft) and for the base, and its numbers land in results.json."""
    pytest.importorskip("lm_eval")
    import yaml

    run_id = evaluated[backend]["run_id"]
    code, out = script(project, "evaluate.py", "--run-id", run_id, "--stage", "1", "--max-samples", "4", "--lm-eval")
    assert code == 0, out
    bench = out["lm_eval"]
    assert bench["harness"].startswith("lm-eval 0.4") and bench["rows"] == 4
    task = yaml.safe_load(Path(bench["yaml"]).read_text())
    assert task["task"] == bench["task"] and task["dataset_path"] == "json" and task["output_type"] == "generate_until"
    samples = [json.loads(line) for line in Path(out["samples_file"]).read_text().splitlines()]
    for who, ours in (("tuned", "prediction"), ("base", "base_prediction")):
        assert 0 <= bench[who]["metrics"]["exact_match"] <= 1 and bench[who]["rows"] == 4
        assert [g.strip() for g in bench[who]["generations"]] == [s[ours].strip() for s in samples], who
    assert bench["tuned"]["generations"] != bench["base"]["generations"], "the harness ran the adapter"
    saved = json.loads(Path(out["results_file"]).read_text())
    assert saved["lm_eval"]["tuned"]["metrics"] == bench["tuned"]["metrics"]

