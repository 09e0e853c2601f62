"""The model card (README.md) written into every export: what the model is, how it was made
(base model, data hashes, hyperparameters, stage lineage), how it scored, what it emitted,
and how to use it. Hugging Face reads the YAML front matter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LIBRARY = {"adapters": "peft", "safetensors": "transformers", "huggingface": "transformers", "mlx": "mlx",
           "gguf": "gguf"}


def _full(manifest: dict[str, Any]) -> bool:
    return manifest.get("config", {}).get("training", {}).get("fine_tune") == "full"


def _front_matter(manifest: dict[str, Any], fmt: str, merged: bool) -> str:
    base = manifest["base_model"]
    tags = ["fine-tuned", "full-fine-tune" if _full(manifest) else "lora", fmt, "olmo-fine-tuning-mcp"]
    lines = ["---", f"base_model: {json.dumps(base.get('model_id') or base.get('source'))}",
             f"library_name: {LIBRARY[fmt] if merged or fmt in ('gguf', 'mlx') else 'peft'}",
             "pipeline_tag: text-generation", "tags:"] + [f"  - {tag}" for tag in tags] + ["---", ""]
    return "\n".join(lines)


def _stages(manifest: dict[str, Any], stage: int) -> list[str]:
    config = manifest.get("config", {})
    lines = ["## Training", "",
             f"{'Full fine-tuning' if _full(manifest) else 'LoRA'} of "
             f"`{manifest['base_model'].get('model_id') or manifest['base_model']['source']}` "
             f"with the {manifest['backend'].get('resolved')} backend; run `{manifest['run_id']}`.", "",
             "| stage | starts from | iterations | learning rate | batch size | train rows | train data sha256 |",
             "|---|---|---|---|---|---|---|"]
    lineage = {entry["stage"]: entry["starts_from"] for entry in manifest.get("lineage", [])}
    for number in range(1, stage + 1):
        entry = manifest["stages"][f"stage{number}"]
        train = entry.get("data", {}).get("train", {})
        lines.append(f"| {number} | {lineage.get(number, '')} | {entry['iterations']} | {entry['learning_rate']} | "
                     f"{entry['batch_size']} | {train.get('rows', '')} | `{train.get('sha256', '')}` |")
    lora = config.get("lora", {})
    methods = [manifest["stages"][f"stage{n}"].get("method", "sft") for n in range(1, stage + 1)]
    if set(methods) != {"sft"}:  # preference training is said, with what DPO was measured against
        lines += ["", "Methods: " + ", ".join(f"stage {n} {m.upper()}" for n, m in enumerate(methods, 1))
                  + " (DPO against the model as its stage started; ORPO needs no reference)."]
    kind = "DoRA" if lora.get("use_dora") else "LoRA"
    if _full(manifest):
        lines += ["", "Every weight trained (full fine-tuning): each stage saved a whole model.", ""]
    else:
        lines += ["", f"{kind}: rank {lora.get('rank')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
                      f"target modules {', '.join(lora.get('target_modules', []))}, layers {lora.get('num_layers')} "
                      "(-1 = all).", ""]
    training = config.get("training", {})
    lines += [f"Max sequence length {training.get('max_seq_length')}, seed {training.get('seed')}, "
              f"gradient accumulation {training.get('gradient_accumulation_steps')}.", ""]
    return lines


def _evaluation(run_dir: Path, stage: int) -> list[str]:
    results = run_dir / f"stage{stage}" / "evaluation" / "results.json"
    if not results.is_file():
        return ["## Evaluation", "", "Not evaluated yet (scripts/evaluate.py).", ""]
    data = json.loads(results.read_text(encoding="utf-8"))
    columns = ("perplexity", "accuracy", "bleu", "chrf")
    rows = [("this model", data["metrics"])]
    if "base" in data:
        rows.append(("base model", data["base"]))
    if "forgetting" in data:
        rows.append(("on the stage-1 test set", data["forgetting"]["stage2_model"]))
    lines = ["## Evaluation", "", f"On {data['test_data']['rows']} test rows (sha256 "
             f"`{data['test_data']['sha256']}`), {data['evaluated_at']}.", "",
             "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, metrics in rows:
        lines.append(f"| {name} | " + " | ".join(f"{metrics[c]:.4f}" if c in metrics else "-" for c in columns) + " |")
    bench = data.get("lm_eval")
    if bench:  # lm-evaluation-harness on a task written over the same rows
        scores = "; ".join(f"{who} model {', '.join(f'{k} {v:.4f}' for k, v in bench[who]['metrics'].items())}"
                           for who in ("tuned", "base") if who in bench)
        lines += ["", f"lm-evaluation-harness ({bench['harness']}), task `{bench['task']}` ({bench['rows']} rows, "
                      f"chat template, greedy): {scores}."]
    passed = data.get("thresholds", {}).get("passed")
    verdict = {True: "passed", False: "not passed"}.get(passed, "not judged")
    checks = data.get("thresholds", {}).get("checks", {})
    lines += ["", f"Thresholds ({data.get('thresholds', {}).get('mode', 'absolute')}): {verdict}"
              + "".join(f"; {name}: {c['metric']} {'n/a' if c['value'] is None else format(c['value'], '.4f')} vs "
                        f"{c['threshold']}" for name, c in checks.items()) + ".", ""]
    return lines


def _emissions(manifest: dict[str, Any]) -> list[str]:
    emissions = manifest.get("emissions")
    if not emissions or emissions.get("total_kg") is None:
        return ["## Emissions", "", "Not measured for this run.", ""]
    return ["## Emissions", "", f"{emissions['total_kg']:.6f} kg CO2eq for training (CodeCarbon).", ""]


def render(manifest: dict[str, Any], run_dir: Path, stage: int, fmt: str, merged: bool, usage: str) -> str:
    title = f"# {manifest['project']['name']}: run {manifest['run_id']}, stage {stage} ({fmt})"
    what = ("The fully fine-tuned model." if _full(manifest) else "The LoRA adapter merged into the base model."
            if merged else "The LoRA adapter only; load it on the base model.")
    parts = [_front_matter(manifest, fmt, merged), title, "", what, ""]
    parts += _stages(manifest, stage) + _evaluation(run_dir, stage) + _emissions(manifest)
    parts += ["## Usage", "", usage.strip(), ""]
    return "\n".join(parts)
