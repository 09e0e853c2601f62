"""Evaluation metrics and thresholds without an engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config
from trainer.evaluate.evaluation import EvaluationError, custom_metric, normalise, text_metrics, thresholds


def test_exact_match_normalises_case_punctuation_and_spaces():
    assert normalise("  The capital of France is Paris. ") == "the capital of france is paris"
    assert normalise("RIVER") == normalise("river!") and normalise("2 plus 3 is 5.") == "2 plus 3 is 5"
    scores = text_metrics(["Paris.", "lyon"], ["paris", "Marseille"], ["accuracy"])
    assert scores == {"accuracy": 0.5}


def test_bleu_and_chrf():
    pytest.importorskip("sacrebleu")
    perfect = text_metrics(["the cat sat on the mat"], ["the cat sat on the mat"], ["bleu", "chrf"])
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    short = text_metrics(["RIVER"], ["RIVER"], ["bleu"])  # one-word answers still score
    assert short["bleu"] == pytest.approx(100)
    wrong = text_metrics(["dog"], ["cat"], ["bleu", "chrf"])
    assert wrong["bleu"] < 1 and wrong["chrf"] < 20


def test_custom_metrics_are_imported_by_name():
    length = custom_metric("os.path:basename")
    assert length("a/b") == "b"
    with pytest.raises(EvaluationError, match="cannot be imported"):
        custom_metric("no_such_module:f")


def test_custom_metric_names_are_validated(project):
    path = project / "config" / "fine_tuning_config.yaml"
    with pytest.raises(ConfigError, match="package.module:function"):
        load_config(path, environ={}, overrides={"evaluation.custom_metrics": ["no-colon"]})


def test_the_spec_thresholds_on_accuracy_stay_reachable(config):
    config.evaluation.threshold_metric, config.evaluation.threshold_mode = "accuracy", "absolute"
    config.evaluation.stage1_threshold = 0.5
    result = thresholds(config, 1, {"metrics": {"accuracy": 0.6}})
    assert result["passed"] and result["checks"]["stage1"]["threshold"] == 0.5
    config.evaluation.sequential_threshold = 0.6
    after = thresholds(config, 2, {"metrics": {"accuracy": 0.9},
                                   "forgetting": {"stage2_model": {"accuracy": 0.4}, "stage1_model": {}}})
    assert after["checks"]["stage2"]["passed"] == (0.9 >= config.evaluation.stage2_threshold)
    assert after["checks"]["sequential"]["passed"] is False and after["passed"] is False


def test_default_thresholds_are_an_improvement_over_the_base_model(config):
    evaluation = config.evaluation
    assert (evaluation.threshold_metric, evaluation.threshold_mode, evaluation.stage1_threshold) == (
        "chrf", "relative", 0.1)
    learned = thresholds(config, 1, {"metrics": {"chrf": 33.0}, "base": {"chrf": 20.0}})
    assert learned["passed"] and learned["checks"]["stage1"]["value"] == pytest.approx(0.65)
    barely = thresholds(config, 1, {"metrics": {"chrf": 21.0}, "base": {"chrf": 20.0}})
    assert barely["passed"] is False  # 5% better is under the 10% bar
    # after stage 2: better than the base on stage 2, and kept 80% of stage 1's score: below 90%
    after = thresholds(config, 2, {"metrics": {"chrf": 50.0}, "base": {"chrf": 10.0},
                                   "forgetting": {"stage1_model": {"chrf": 60.0}, "stage2_model": {"chrf": 48.0}}})
    assert after["checks"]["stage2"]["passed"] and after["checks"]["sequential"]["value"] == pytest.approx(0.8)
    assert after["passed"] is False
    # without the base model there is nothing to compare with: not judged, not failed
    alone = thresholds(config, 1, {"metrics": {"chrf": 50.0}})
    assert alone["passed"] is None and alone["checks"]["stage1"]["passed"] is None
    # a base that scores 0 is beaten by any score
    assert thresholds(config, 1, {"metrics": {"chrf": 3.0}, "base": {"chrf": 0.0}})["passed"] is True


def test_perplexity_thresholds_count_lower_as_better(config):
    config.evaluation.threshold_metric = "perplexity"
    result = thresholds(config, 1, {"metrics": {"perplexity": 10.0}, "base": {"perplexity": 56.0}})
    assert result["passed"] and result["checks"]["stage1"]["value"] == pytest.approx(4.6)
    config.evaluation.threshold_mode, config.evaluation.stage1_threshold = "absolute", 12.0
    assert thresholds(config, 1, {"metrics": {"perplexity": 10.0}})["passed"] is True
    assert thresholds(config, 1, {"metrics": {"perplexity": 13.0}})["passed"] is False


def test_threshold_settings_are_validated(project):
    path = project / "config" / "fine_tuning_config.yaml"
    with pytest.raises(ConfigError, match="above what accuracy reaches"):
        load_config(path, environ={}, overrides={"evaluation.threshold_mode": "absolute",
                                                 "evaluation.threshold_metric": "accuracy",
                                                 "evaluation.stage1_threshold": 70})
    with pytest.raises(ConfigError, match="threshold_metric 'bleu' must be one of the measured metrics"):
        load_config(path, environ={}, overrides={"evaluation.threshold_metric": "bleu",
                                                 "evaluation.metrics": ["perplexity", "chrf"]})


def test_the_harness_task_is_written_in_its_yaml_format(tmp_path):
    import yaml

    from trainer.evaluate import harness

    records = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
                             {"role": "assistant", "content": "A1"}]},
               {"messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}]
    info = harness.write_task(records, tmp_path / "lm-eval", "proj_test", 32)
    task = yaml.safe_load((tmp_path / "lm-eval" / "proj_test.yaml").read_text())
    assert task["task"] == "proj_test" and task["output_type"] == "generate_until" and task["test_split"] == "test"
    assert task["dataset_kwargs"]["data_files"]["test"] == info["data"] and task["generation_kwargs"][
        "max_gen_toks"] == 32
    assert task["metric_list"][0]["metric"] == "exact_match" and task["metric_list"][0]["ignore_case"] is True
    rows = [json.loads(line) for line in Path(info["data"]).read_text().splitlines()]
    assert rows == [{"prompt": "Q1", "answer": "A1", "system": "S"}, {"prompt": "Q2", "answer": "A2", "system": ""}]
    with pytest.raises(harness.HarnessError, match="identifiers"):
        harness.write_task(records, tmp_path, "Bad-Name", 8)
    with pytest.raises(harness.HarnessError, match="at least one row"):
        harness.write_task([], tmp_path, "empty", 8)
