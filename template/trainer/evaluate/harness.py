"""Benchmark evaluation with EleutherAI's lm-evaluation-harness (`lm-eval`), the harness
Axolotl, Oumi and torchtune run, on a task defined from local files: hub datasets cannot be
assumed reachable, so the task is written in the harness's own YAML format over a JSONL file
(the stage's test split, or any processed file named), and loaded with `include_path`.

The task prompts each row's last user message through the model's chat template (the
harness's `apply_chat_template`), generates greedily until the end of the turn, and scores
exact match (case and punctuation ignored) against the reference answer. The model is the
base, or the base with the stage's adapter in peft's format (the harness's `peft=`), or the
whole model a full fine-tune saved, all through the harness's own Hugging Face loader.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

from trainer.data.training_data import messages_of
from trainer.errors import ProjectError


class HarnessError(ProjectError):
    kind = "harness_error"


def write_task(records: list[dict[str, Any]], folder: Path, name: str, max_tokens: int) -> dict[str, Any]:
    """`folder`/<name>.jsonl (prompt, answer, system of each row) and `folder`/<name>.yaml, the task."""
    import yaml

    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise HarnessError(f"harness task names are lower-case identifiers, got {name!r}")
    rows = []
    for messages in map(messages_of, records):  # chat or completions records
        rows.append({"prompt": messages[-2]["content"] if len(messages) > 1 else "",
                     "answer": messages[-1]["content"],
                     "system": messages[0]["content"] if messages[0]["role"] == "system" else ""})
    if not rows:
        raise HarnessError("the harness needs at least one row to evaluate")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    task = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [], "max_gen_toks": max_tokens, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": True}],
        "metadata": {"version": 1.0, "source": "olmo-fine-tuning-mcp project data"},
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return {"task": name, "rows": len(rows), "data": str(data), "yaml": str(folder / f"{name}.yaml")}


def run(folder: Path, name: str, model: str, adapter: Optional[Path], batch_size: int,
        limit: Optional[int] = None) -> dict[str, Any]:
    """The task's metrics for `model` (a Hugging Face folder) with `adapter` (peft format) if given."""
    try:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise HarnessError("benchmark evaluation needs lm-evaluation-harness: pip install -e '.[harness]'") from error
    import torch

    args: dict[str, Any] = {"pretrained": model, "dtype": "auto", "trust_remote_code": False}
    if adapter is not None:
        args["peft"] = str(adapter)
    output = simple_evaluate(model="hf", model_args=args, tasks=[name], batch_size=batch_size, limit=limit,
                             device="cuda" if torch.cuda.is_available() else "cpu", apply_chat_template=True,
                             task_manager=TaskManager(include_path=str(folder), include_defaults=False),
                             log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    found = output["results"][name]
    metrics = {key.split(",")[0]: float(value) for key, value in found.items()
               if isinstance(value, (int, float)) and key.split(",")[0] not in ("sample_len", "alias")
               and "_stderr" not in key}
    samples = sorted(output.get("samples", {}).get(name, []), key=lambda s: s["doc_id"])
    return {"metrics": metrics, "rows": len(samples), "harness": f"lm-eval {getattr(lm_eval, '__version__', '?')}",
            "generations": [str((s.get("filtered_resps") or [""])[0]) for s in samples]}
