"""What the engine benchmarks share: a generated project with a locally built model of tens of
millions of parameters, variable-length chat data prepared by the project, and a way to run
a command and read the JSON line it ends with."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# Llama architecture, about 24M parameters (21M in matmuls)
SHAPE = {"vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6,
         "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 2048}
SMALL = {**SHAPE, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 4}


def parser(doc: str, steps: int, batch: int) -> argparse.ArgumentParser:
    """The knobs every engine comparison takes; defaults per benchmark."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--steps", type=int, default=steps, help="training steps per run")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per side (medians are reported)")
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--rows", type=int, default=400, help="synthetic chat rows of variable length")
    p.add_argument("--real", action="store_true",
                   help="the real SmolLM2-135M-Instruct (scripts/fetch_smollm2.py) instead of the built model")
    p.add_argument("--precision", choices=("float32", "bf16"), default="float32",
                   help="every side's: float32, or bfloat16 matmuls under autocast (TRL's own default is bf16)")
    return p


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Instruction data of widely varying length (what padding wastes time on)."""
    rng = random.Random(seed)
    words = ("the model answers questions about rivers cities numbers history science language and more "
             "with short or long explanations that vary a lot in length").split()
    rows = []
    for i in range(n):
        question = " ".join(rng.choices(words, k=rng.randint(4, 40)))
        answer = " ".join(rng.choices(words, k=rng.choice([rng.randint(3, 20), rng.randint(40, 200)])))
        rows.append({"instruction": f"{question} ({i})?", "output": answer, "quality": 0.5})
    return rows


def run(argv: list[str], cwd: Path) -> dict:
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{argv[1]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


# The end of each baseline script (run with `python -c`, after it built `trainer`): train, noting the
# dtype the first q_proj's frozen matmul really produces (bfloat16 under autocast) and the peak memory.
TRAIN_AND_MEASURE = r'''
matmuls = set()
next(m for n, m in trainer.model.named_modules() if n.endswith("q_proj.base_layer")).register_forward_hook(
    lambda module, inputs, output: matmuls.add(str(output.dtype).removeprefix("torch.")))
metrics = trainer.train().metrics
peak = next(int(l.split()[1]) for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
'''


def check_precision(name: str, precision: str, out: dict) -> None:
    """Stop unless a side ran at `precision`: a baseline by the dtype its matmuls produced, the
    project by its stage-1 training metadata (autocast on, float32 weights)."""
    if "manifest_path" in out:
        facts = json.loads((Path(out["manifest_path"]).parent / "stage1" / "training_metadata.json").read_text())
        found = facts["base_model"]
        ran = "bf16" if found.get("precision") == "bf16 autocast" else found.get("dtype", "").removeprefix("torch.")
    else:
        dtypes = out.get("matmul_dtypes", [])
        ran = {("bfloat16",): "bf16", ("float32",): "float32"}.get(tuple(dtypes), f"{dtypes}")
    if ran != precision:
        raise SystemExit(f"{name} ran at {ran}, not at precision {precision}: the sides would not compare")


def median(values: list[dict], key: str) -> float:
    return statistics.median(v[key] for v in values)


def real_model(project: Path, model: Path) -> dict:
    """SmolLM2-135M-Instruct brought into the project as models/bench-llama (set_base_model.py:
    GGUF -> Hugging Face folder, checked in both engines); its summary as tiny_model.build gives."""
    sys.path.insert(0, str(REPO / "scripts"))
    from fetch_smollm2 import fetch

    run([sys.executable, "scripts/set_base_model.py", "--json", str(fetch()), "--name", model.name], project)
    config = json.loads((model / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "np") as weights:
        parameters = sum(int(np.prod(weights.get_slice(k).get_shape())) for k in weights.keys())
    return {"parameters": parameters, "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
            "model": "SmolLM2-135M-Instruct (real, from its GGUF)"}


def bench_project(folder: Path, backend: str, n_rows: int, shape: dict = SHAPE,
                  real: bool = False) -> tuple[Path, Path, dict]:
    """A generated project with the benchmark model in models/bench-llama (built locally, or the
    real SmolLM2 with `real`) and its data prepared into data/processed/; returns (project, model
    folder, the model's summary)."""
    from copier import run_copy

    project = folder / "bench"
    run_copy(str(REPO), str(project), defaults=True, quiet=True, vcs_ref="HEAD", unsafe=True,
             data={"project_name": "bench", "backend": backend, "enable_quality_weighting": False,
                   "enable_carbontracking": False, "enable_evaluation": False})
    rows = synthetic_rows(n_rows)
    raw = project / "data" / "raw" / "bench.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sys.path.insert(0, str(project))
    from trainer.models import tiny_model

    model = project / "models" / "bench-llama"
    if real:
        summary = real_model(project, model)
    else:
        summary = {**tiny_model.build("llama", model, [r["instruction"] + " " + r["output"] for r in rows],
                                      shape=shape, verify=False), "hidden_size": shape["hidden_size"],
                   "model": "llama, built locally (random weights)"}
    run([sys.executable, "scripts/prepare_dataset.py", "--json", "--input", str(raw), "--tokenizer", str(model)],
        project)
    return project, model, summary


def project_args(steps: int, batch: int, learning_rate: float, precision: str = "float32") -> list[str]:
    """scripts/train.py settings shared by the comparisons: LoRA rank 8, scale 2 on q, k, v, o of
    every layer, constant learning rate, no gradient checkpointing, one validation batch."""
    return ["--set", "base_model.local_path=models/bench-llama", "--set", f"training.precision={precision}",
            "--set", f"training.stage1.iterations={steps}", "--set", f"training.stage1.batch_size={batch}",
            "--set", f"training.stage1.learning_rate={learning_rate}", "--set", "training.stage1.warmup_steps=0",
            "--set", "training.lr_schedule=constant", "--set", "training.gradient_checkpointing=false",
            "--set", "training.max_seq_length=512", "--set", "lora.rank=8", "--set", "lora.alpha=16",
            "--set", "lora.dropout=0.0", "--set", "lora.target_modules=[q_proj, k_proj, v_proj, o_proj]",
            "--set", f"training.eval_steps={steps}", "--set", f"training.save_steps={steps}",
            "--set", f"training.log_steps={steps}", "--set", "training.val_batches=1"]
