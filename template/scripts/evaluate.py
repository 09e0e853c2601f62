#!/usr/bin/env python
"""Evaluate a trained stage of a run (and the base model): perplexity, exact-match accuracy,
BLEU, chrF, custom metrics, thresholds, and a forgetting check after stage 2.

    python scripts/evaluate.py --run-id ID --stage 1
    python scripts/evaluate.py --run-id ID --stage 2 --test-data data/processed/stage2/test.jsonl --no-base
    python scripts/evaluate.py --run-id ID --stage 1 --lm-eval   # also lm-evaluation-harness, base vs tuned

Results: runs/<id>/stageN/evaluation/results.json and samples.jsonl.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli, guard  # noqa: E402
from trainer.evaluate.evaluation import evaluate_run  # noqa: E402


def main(args) -> dict:
    config = cli.config_from(args)
    test = guard.check_path(args.test_data, "the test data (--test-data)") if args.test_data else None
    return evaluate_run(config, args.run_id, args.stage, test, include_base=not args.no_base,
                        max_samples=args.max_samples, lm_eval=args.lm_eval)


def show(result: dict) -> None:
    columns = ("perplexity", "accuracy", "bleu", "chrf")
    print(f"run {result['run_id']} stage {result['stage']} ({result['backend']}), "
          f"{result['test_data']['rows']} test rows")
    print(f"  {'model':22}" + "".join(f"{c:>12}" for c in columns))
    rows = [(f"stage {result['stage']} adapter", result["metrics"])]
    if "base" in result:
        rows.append(("base model", result["base"]))
    if "forgetting" in result:
        rows += [("stage 1 on stage-1 test", result["forgetting"]["stage1_model"]),
                 ("stage 2 on stage-1 test", result["forgetting"]["stage2_model"])]
    for name, metrics in rows:
        print(f"  {name:22}" + "".join(f"{metrics[c]:>12.4f}" if c in metrics else f"{'-':>12}" for c in columns))
    for check, info in result["thresholds"]["checks"].items():
        value = "n/a" if info["value"] is None else f"{info['value']:.4f}"
        verdict = {True: "pass", False: "FAIL", None: "not judged (evaluate with the base model)"}[info["passed"]]
        print(f"  {check}: {info['metric']} {value} vs threshold {info['threshold']} -> {verdict}")
    if "lm_eval" in result:
        bench = result["lm_eval"]
        scores = ", ".join(f"{who} {bench[who]['metrics'].get('exact_match', 0):.4f}" for who in ("tuned", "base")
                           if who in bench)
        print(f"  lm-evaluation-harness ({bench['harness']}), task {bench['task']}, exact match: {scores}")
    print(f"results: {result['results_file']}\nsamples: {result['samples_file']}")


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--test-data", metavar="FILE", help="processed jsonl (default: the stage's test split)")
    parser.add_argument("--no-base", action="store_true", help="skip evaluating the base model")
    parser.add_argument("--max-samples", type=int, metavar="N", help="evaluate the first N test rows only")
    parser.add_argument("--lm-eval", action="store_true",
                        help="also run lm-evaluation-harness on a task written over the same rows (pip install -e "
                             "'.[harness]')")
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
