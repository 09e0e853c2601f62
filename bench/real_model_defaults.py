"""What a LoRA run on a real pretrained model needs: learning rates swept on SmolLM2-135M-Instruct
(the real model, scripts/fetch_smollm2.py) with the project's own scripts, on the main job's two
tasks (scripts/demo_tasks.py: spell a word with dashes; write an ISO date in words).

    python bench/real_model_defaults.py [--iterations 40] [--stage1-rates 2e-5,1e-4,2e-4,5e-4,1e-3]
                                        [--stage2-rates 1e-6,2e-5,1e-4] [--samples 12]

Stage 1 (spell) is trained alone at each stage-1 rate; then whole two-stage runs (stage 2: dates,
with the default replay of stage-1 rows) at the chosen stage-1 rate and each stage-2 rate. Each
row prints the held-out validation loss before and after, and exact-match accuracy and chrF of
greedy generation on the stage's test rows for the base model and the tuned one (and, after
stage 2, what the stage-2 model kept of stage 1). These figures chose the template's defaults.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, run

sys.path.insert(0, str(REPO / "scripts"))
from demo_tasks import write  # noqa: E402
from fetch_smollm2 import fetch  # noqa: E402


def project(folder: Path) -> Path:
    from copier import run_copy

    dest = folder / "real"
    run_copy(str(REPO), str(dest), defaults=True, quiet=True, vcs_ref="HEAD", unsafe=True,
             data={"project_name": "real", "model_type": "llama", "num_stages": 2, "backend": "transformers",
                   "enable_carbontracking": False})
    python = sys.executable
    run([python, "scripts/set_base_model.py", "--json", str(fetch()), "--name", "smollm2"], dest)
    files = write(folder / "tasks")
    run([python, "scripts/import_data.py", "--json", "--replace-samples", str(files["spell"])], dest)
    run([python, "scripts/import_data.py", "--json", "--stage", "2", "--replace-samples", str(files["dates"])], dest)
    run([python, "scripts/prepare_dataset.py", "--json"], dest)
    return dest


def train(dest: Path, name: str, sets: dict, stage: int | None) -> dict:
    argv = [sys.executable, "scripts/train.py", "--json", "--name", name]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    if stage:
        argv += ["--stage", str(stage)]
    return run(argv, dest)


def evaluate(dest: Path, run_id: str, stage: int, samples: int) -> dict:
    return run([sys.executable, "scripts/evaluate.py", "--json", "--run-id", run_id, "--stage", str(stage),
                "--max-samples", str(samples)], dest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--stage1-rates", default="2e-5,1e-4,2e-4,5e-4,1e-3")
    p.add_argument("--stage2-rates", default="1e-6,2e-5,1e-4")
    p.add_argument("--stage1-rate", type=float, default=None, help="for the stage-2 sweep (default: the best)")
    p.add_argument("--samples", type=int, default=12, help="test rows generated per model")
    args = p.parse_args()
    common = {"training.stage1.iterations": args.iterations, "training.stage2.iterations": args.iterations,
              "training.stage1.warmup_steps": 4, "training.stage2.warmup_steps": 0,
              "training.eval_steps": args.iterations, "training.save_steps": args.iterations,
              "evaluation.generation.max_tokens": 24}
    with tempfile.TemporaryDirectory() as tmp:
        dest = project(Path(tmp))
        print(f"SmolLM2-135M-Instruct, transformers backend, {args.iterations} iterations, batch 4, LoRA defaults")
        print(f"{'stage-1 lr':>10} {'val loss':>15} {'acc base':>9} {'acc tuned':>9} {'chrF base':>9} "
              f"{'chrF tuned':>10} {'seconds':>8}")
        best = (None, -1.0)
        for rate in [float(r) for r in args.stage1_rates.split(",")]:
            start = time.perf_counter()
            out = train(dest, f"s1-{rate:g}", {**common, "training.stage1.learning_rate": rate}, 1)
            ev = evaluate(dest, out["run_id"], 1, args.samples)
            s = out["stages"]["stage1"]
            print(f"{rate:>10g} {s['val_loss_before']:>7.3f}->{s['val_loss']:<7.3f} {ev['base']['accuracy']:>9.2f} "
                  f"{ev['metrics']['accuracy']:>9.2f} {ev['base']['chrf']:>9.1f} {ev['metrics']['chrf']:>10.1f} "
                  f"{time.perf_counter() - start:>8.0f}", flush=True)
            score = ev["metrics"]["chrf"]
            if score > best[1]:
                best = (rate, score)
        rate1 = args.stage1_rate or best[0]
        print(f"\nstage 2 after stage 1 at {rate1:g} (replay of stage-1 rows as configured)")
        print(f"{'stage-2 lr':>10} {'val loss':>15} {'acc base':>9} {'acc tuned':>9} {'chrF base':>9} "
              f"{'chrF tuned':>10} {'kept chrF':>16} {'seconds':>8}")
        for rate in [float(r) for r in args.stage2_rates.split(",")]:
            start = time.perf_counter()
            out = train(dest, f"s2-{rate:g}", {**common, "training.stage1.learning_rate": rate1,
                                                "training.stage2.learning_rate": rate}, None)
            ev = evaluate(dest, out["run_id"], 2, args.samples)
            s, f = out["stages"]["stage2"], ev["forgetting"]
            print(f"{rate:>10g} {s['val_loss_before']:>7.3f}->{s['val_loss']:<7.3f} {ev['base']['accuracy']:>9.2f} "
                  f"{ev['metrics']['accuracy']:>9.2f} {ev['base']['chrf']:>9.1f} {ev['metrics']['chrf']:>10.1f} "
                  f"{f['stage1_model']['chrf']:>7.1f}->{f['stage2_model']['chrf']:<7.1f} "
                  f"{time.perf_counter() - start:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
