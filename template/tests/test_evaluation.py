"""Evaluation metrics and thresholds without an engine."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, load_config
from trainer.evaluation import EvaluationError, custom_metric, normalise, text_metrics, thresholds


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


def test_thresholds_on_accuracy(config):
    config.evaluation.stage1_threshold = 0.5
    result = thresholds(config, 1, {"metrics": {"accuracy": 0.6}})
    assert result["passed"] and result["checks"]["stage1"]["threshold"] == 0.5
    config.evaluation.sequential_threshold = 0.6
    after = thresholds(config, 2, {"metrics": {"accuracy": 0.9},
                                   "forgetting": {"stage2_model": {"accuracy": 0.4}}})
    assert after["checks"]["stage2"]["passed"] == (0.9 >= config.evaluation.stage2_threshold)
    assert after["checks"]["sequential"]["passed"] is False and after["passed"] is False
