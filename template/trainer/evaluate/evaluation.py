"""Evaluate a run's stage (and the base model): perplexity on the answer tokens, exact-match
accuracy of greedy (or configured) generations, BLEU and chrF, custom metrics, and for
two-stage runs a forgetting check of the stage-2 model on the stage-1 test set.

Results go to runs/<id>/stageN/evaluation/results.json with the generations in
samples.jsonl, and a summary into the run manifest. The same backend that trained the
run evaluates it (its adapter format is that engine's; a fully fine-tuned stage is a whole model).
"""

from __future__ import annotations

import importlib
import json
import math
import re
import string
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.config import FineTuningConfig
from trainer.data.training_data import eval_batches, messages_of, read_records, tokenize
from trainer.engines import fast_paths
from trainer.engines.backends import make_backend
from trainer.engines.base_trainer import Backend
from trainer.errors import ProjectError, advice
from trainer.evaluate import harness
from trainer.files import sha256_file, write_atomic, write_json
from trainer.observe.tracking import log_evaluation
from trainer.runs.training_run_manager import RunError, RunManager, now, stage_output

PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


class EvaluationError(ProjectError):
    kind = "evaluation_error"


def normalise(text: str) -> str:
    """For exact match: lower case, punctuation removed, whitespace collapsed."""
    return " ".join(PUNCTUATION.sub(" ", text.lower()).split())


def text_metrics(predictions: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    scores: dict[str, float] = {}
    if "accuracy" in metrics:
        scores["accuracy"] = sum(normalise(p) == normalise(r) for p, r in zip(predictions, references, strict=True)) \
            / max(1, len(references))
    if "bleu" in metrics or "chrf" in metrics:
        try:
            from sacrebleu.metrics import BLEU, CHRF
        except ImportError as error:
            raise EvaluationError("BLEU and chrF need sacrebleu: pip install -e '.[evaluation]'") from error
        if "bleu" in metrics:  # effective order: short answers are not scored zero for lacking 4-grams
            scores["bleu"] = BLEU(effective_order=True).corpus_score(predictions, [references]).score
        if "chrf" in metrics:
            scores["chrf"] = CHRF().corpus_score(predictions, [references]).score
    return scores


def custom_metric(name: str) -> Callable[[list[str], list[str]], float]:
    """A user metric named 'package.module:function', called as function(predictions, references)."""
    module, _, function = name.partition(":")
    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError, ValueError) as error:
        raise EvaluationError(f"evaluation.custom_metrics entry {name!r} cannot be imported: {error}") from None


def evaluate_model(backend: Backend, records: list[dict[str, Any]], config: FineTuningConfig,
                   batch_size: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Metrics of the loaded model on `records`, and one sample per record."""
    evaluation, training = config.evaluation, config.training
    metrics: dict[str, Any] = {"rows": len(records)}
    if "perplexity" in evaluation.metrics:
        data = tokenize(records, backend.tokenizer, training.max_seq_length, training.mask_prompt)
        fast_paths.check(backend, packed=False)  # logits only where the loss counts, when exact
        loss = backend.evaluate(eval_batches(data, batch_size, -1, backend.pad_id, backend.pad_multiple))
        metrics.update(loss=loss, perplexity=math.exp(min(loss, 700)))
    conversations = [messages_of(r) for r in records]
    prompts = [backend.tokenizer.apply_chat_template(m[:-1], tokenize=False, add_generation_prompt=True)
               for m in conversations]
    references = [m[-1]["content"] for m in conversations]
    generation = evaluation.generation
    predictions = backend.generate(prompts, generation.max_tokens, generation.temperature, generation.top_p)
    metrics.update(text_metrics(predictions, references, evaluation.metrics))
    custom = {name: float(custom_metric(name)(predictions, references)) for name in evaluation.custom_metrics}
    if custom:
        metrics["custom_metrics"] = custom
    samples = [{"prompt": m[-2]["content"] if len(m) > 1 else "", "reference": ref, "prediction": pred,
                "exact_match": normalise(pred) == normalise(ref)}
               for m, ref, pred in zip(conversations, references, predictions, strict=True)]
    return metrics, samples


def load_inference(config: FineTuningConfig, backend_name: str, adapter: Optional[Path], seed: int,
                   source: Optional[str] = None) -> Backend:
    """A model ready to evaluate or answer: the base (or `source`, an exported model, which is
    loaded as saved) with `adapter` (in the engine's format) if given, in inference mode."""
    # at the weights' dtype, without autocast (float32 on CUDA too when training.precision says so)
    precision = "float32" if config.training.precision == "float32" else "auto"
    backend = make_backend(backend_name, seed, precision=precision)
    quantization = config.base_model.quantization if source is None else "none"
    backend.load(source or config.model_source(), quantization, config.root / "models" / "quantized")
    if adapter is not None:
        backend.add_adapters(config.lora, False, adapter)
    backend.eval_mode()
    return backend


def load_stage(config: FineTuningConfig, backend_name: str, run_dir: Path, manifest: dict[str, Any], stage: int,
               seed: int) -> Backend:
    """A run stage's model for inference: the base with the stage's adapter, or the whole model it trained."""
    output, full = stage_output(run_dir, manifest, stage)
    return load_inference(config, backend_name, None if full else output, seed, str(output) if full else None)


def benchmark(config: FineTuningConfig, run_dir: Path, manifest: dict[str, Any], stage: int,
              records: list[dict[str, Any]], source: Path, include_base: bool) -> dict[str, Any]:
    """The stage's model (and the base) on an lm-evaluation-harness task over `records` (trainer.evaluate.harness)."""
    from trainer.models.merge import adapter_as

    folder = run_dir / f"stage{stage}" / "evaluation" / "lm-eval"
    name = re.sub(r"[^a-z0-9_]+", "_", f"{config.project.name}_{source.stem}".lower())
    task = harness.write_task(records, folder, name, config.evaluation.generation.max_tokens)
    output, full = stage_output(run_dir, manifest, stage)
    batch = config.training.stage(stage).batch_size
    with tempfile.TemporaryDirectory(prefix=".tmp-harness-", dir=folder) as scratch:
        if full:
            tuned = harness.run(folder, name, str(output), None, batch)
        else:  # the harness loads adapters with peft: mlx-lm's are converted first
            tuned = harness.run(folder, name, config.model_source(), adapter_as(
                output, "peft", config.model_source(), Path(scratch)), batch)
    result = {**task, "source": str(source), "harness": tuned.pop("harness"), "tuned": tuned}
    if include_base:
        result["base"] = harness.run(folder, name, config.model_source(), None, batch)
        result["base"].pop("harness")
    return result


def evaluate_run(config: FineTuningConfig, run_id: str, stage: int, test_file: Optional[Path] = None,
                 include_base: bool = True, max_samples: Optional[int] = None,
                 lm_eval: bool = False) -> dict[str, Any]:
    """Evaluate a completed stage of a run; writes results.json and samples.jsonl. With `lm_eval`
    also on an lm-evaluation-harness task over the same rows (results.json's `lm_eval`)."""
    manager = RunManager(config)
    run_dir = manager.run_dir(run_id)
    with manager.lock(run_id):
        manifest = manager.manifest(run_id)
        run_config = manager.run_config(run_id)
        key = f"stage{stage}"
        if key not in manifest["stages"]:
            raise RunError(f"run {run_id} has no stage {stage}; its stages: {sorted(manifest['stages'])}")
        if manifest["stages"][key]["status"] != "completed":
            raise RunError(f"stage {stage} of run {run_id} has not completed (status "
                           f"{manifest['stages'][key]['status']}); train it first")
        backend_name = manifest["backend"]["resolved"]
        test_file = test_file or run_dir / key / "training-data" / "test.jsonl"
        if not test_file.is_file():
            raise EvaluationError(f"test data not found: {test_file}; "
                                  + advice("pass --test-data", "pass test_dataset to evaluate_model"))

        def records_of(path: Path) -> list[dict[str, Any]]:
            records = read_records(path)
            return records[:max_samples] if max_samples else records

        records = records_of(test_file)
        batch = run_config.training.stage(stage).batch_size
        seed = run_config.training.seed
        tuned = load_stage(run_config, backend_name, run_dir, manifest, stage, seed)
        metrics, samples = evaluate_model(tuned, records, run_config, batch)
        result: dict[str, Any] = {
            "run_id": run_id, "stage": stage, "backend": backend_name, "evaluated_at": now(),
            "test_data": {"path": str(test_file), "sha256": sha256_file(test_file), "rows": len(records)},
            "generation": run_config.evaluation.generation.model_dump(), "metrics": metrics,
        }
        if stage == 2:
            stage1_test = run_dir / "stage1" / "training-data" / "test.jsonl"
            if stage1_test.is_file():
                old = records_of(stage1_test)
                after, _ = evaluate_model(tuned, old, run_config, batch)
                stage1_model = load_stage(run_config, backend_name, run_dir, manifest, 1, seed)
                before, _ = evaluate_model(stage1_model, old, run_config, batch)
                result["forgetting"] = {
                    "test_data": str(stage1_test), "stage1_model": before, "stage2_model": after,
                    "perplexity_increase": (after["perplexity"] / before["perplexity"] - 1)
                    if "perplexity" in before else None,
                    "accuracy_change": after.get("accuracy", 0) - before.get("accuracy", 0)
                    if "accuracy" in before else None,
                }
        if include_base:
            base = load_inference(run_config, backend_name, None, seed)
            result["base"], base_samples = evaluate_model(base, records, run_config, batch)
            for sample, answer in zip(samples, base_samples, strict=True):  # side by side in samples.jsonl
                sample["base_prediction"] = answer["prediction"]
        if lm_eval:
            result["lm_eval"] = benchmark(run_config, run_dir, manifest, stage, records, test_file, include_base)
        result["thresholds"] = thresholds(run_config, stage, result)
        folder = run_dir / key / "evaluation"
        write_json(folder / "results.json", result)
        write_atomic(folder / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        summary = {k: metrics[k] for k in ("perplexity", "accuracy", "bleu", "chrf") if k in metrics}
        if result.get("lm_eval", {}).get("tuned", {}).get("metrics", {}).get("exact_match") is not None:
            summary["lm_eval_exact_match"] = result["lm_eval"]["tuned"]["metrics"]["exact_match"]
        tracking_error = log_evaluation(config, manifest, stage, summary, folder / "results.json")
        if tracking_error:
            result["tracking_error"] = tracking_error
        manager.update_manifest(run_id, lambda m: (
            m.__setitem__("evaluation", {**(m.get("evaluation") or {}), key: {
                **summary, "passed": result["thresholds"]["passed"], "results_file": f"{key}/evaluation/results.json",
                "evaluated_at": result["evaluated_at"]}}),
            m["stages"][key].__setitem__("evaluation_file", f"{key}/evaluation/results.json")))
        return {**result, "results_file": str(folder / "results.json"), "samples_file": str(folder / "samples.jsonl")}


LOWER_IS_BETTER = {"perplexity"}


def gain(metric: str, value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """How much better `value` is than `reference`, as a fraction of it (0.1 = 10% better; for
    perplexity, 10% lower). None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return reference / value - 1 if metric in LOWER_IS_BETTER else value / reference - 1


def thresholds(config: FineTuningConfig, stage: int, result: dict[str, Any]) -> dict[str, Any]:
    """Pass/fail of a stage on `evaluation.threshold_metric`.

    relative (the default): the stage's model must beat the base model on the same held-out rows
    by stageN_threshold (0.1 = 10% better), and after stage 2 the stage-2 model must keep
    sequential_threshold of the stage-1 model's score on the stage-1 test set (0.9 = 90%).
    A base that scores 0 is beaten by any score above 0.
    absolute (the spec's): the metric itself must reach the thresholds (at most, for perplexity).
    A check whose numbers are missing (the base model not evaluated) reads passed: null."""
    evaluation = config.evaluation
    metric, relative = evaluation.threshold_metric, evaluation.threshold_mode == "relative"
    lower = metric in LOWER_IS_BETTER
    limit = evaluation.stage1_threshold if stage == 1 else evaluation.stage2_threshold
    value = result["metrics"].get(metric)
    if relative:
        base = (result.get("base") or {}).get(metric)
        improvement = gain(metric, value, base)
        if improvement is None and base == 0 and value is not None:
            passed: Optional[bool] = value > 0 if not lower else False
        else:
            passed = None if improvement is None else improvement >= limit
        check = {"metric": f"{metric}, improvement over the base model", "value": improvement,
                 "tuned": value, "base": base, "threshold": limit, "passed": passed}
    else:
        check = {"metric": metric, "value": value, "threshold": limit,
                 "passed": None if value is None else (value <= limit if lower else value >= limit)}
    checks = {f"stage{stage}": check}
    if "forgetting" in result:
        before = result["forgetting"]["stage1_model"].get(metric)
        after = result["forgetting"]["stage2_model"].get(metric)
        bar = evaluation.sequential_threshold
        if relative:
            kept = None if before is None or after is None or (after if lower else before) == 0 else (
                before / after if lower else after / before)
            checks["sequential"] = {"metric": f"{metric} on the stage-1 test set, kept from the stage-1 model",
                                    "value": kept, "stage1_model": before, "stage2_model": after, "threshold": bar,
                                    "passed": None if kept is None else kept >= bar}
        else:
            checks["sequential"] = {"metric": f"{metric} on the stage-1 test set", "value": after, "threshold": bar,
                                    "passed": None if after is None else (after <= bar if lower else after >= bar)}
    verdicts = [c["passed"] for c in checks.values()]
    return {"mode": evaluation.threshold_mode, "checks": checks,
            "passed": False if False in verdicts else (None if None in verdicts else True)}
