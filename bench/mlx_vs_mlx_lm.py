"""The generated project's mlx backend vs the raw `mlx_lm.lora` command, on the same model and data.

    python bench/mlx_vs_mlx_lm.py [--steps 10] [--repeats 3] [--batch 4]

Both sides train the same locally built Llama-architecture model (about 24M parameters,
random weights, its tokenizer trained on the data) on the project's prepared chat data
(data/processed/, which `mlx_lm.lora --data` reads as is) with the same LoRA (rank 8, scale 2
on q, k, v, o of every layer), AdamW at a constant learning rate without clipping, batch
size, prompt masking and max_seq_length. Runs alternate and medians are reported.

The raw command trains on exactly the rows the project's default run draws (a data file of
those rows, in that order), so both sides see the same tokens. mlx-lm batches rows of similar
length (it sorts the data by length), so the project runs twice: with its default batches
(random rows) and with `training.length_grouping`, its own way of cutting batches from a
length-sorted draw (that side draws other rows).

Throughput is mlx-lm's own measure, trained tokens (the tokens the loss counts) per second
of training-step time (validation excluded); the project reports the same count as
`target_tokens`. The raw command runs through `mlx_lm.lora`'s own argument parsing and
`run()` with a `TrainingCallback` (mlx-lm's reporting hook) that keeps its reports. Peak
memory is each process's peak resident set; wall time is the whole command.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import SHAPE, SMALL, bench_project, median, parser, project_args, run

LEARNING_RATE = 2e-4
GROUP = 8

RAW_SCRIPT = r'''
import json, resource, sys, types
import numpy as np
import yaml
from mlx_lm import lora
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.utils import load

class Keep(TrainingCallback):
    reports = []

    def on_train_loss_report(self, info):
        self.reports.append(info)

# what `mlx_lm.lora` does: lora.main's argument handling, then lora.run's steps (run() itself
# drops a training_callback it is given in mlx-lm 0.32, so its three steps are spelled out)
args = vars(lora.build_parser().parse_args(sys.argv[1:]))
with open(args["config"]) as handle:
    for key, value in yaml.safe_load(handle).items():
        if args.get(key) is None:
            args[key] = value
for key, value in lora.CONFIG_DEFAULTS.items():
    if args.get(key) is None:
        args[key] = value
args = types.SimpleNamespace(**args)
np.random.seed(args.seed)
model, tokenizer = load(args.model)
train_set, valid_set, _ = lora.load_dataset(args, tokenizer)
lora.train_model(args, model, train_set, valid_set, Keep())
report = Keep.reports[-1]
print(json.dumps({"target_tokens_per_second": report["tokens_per_second"],
                  "target_tokens": report["trained_tokens"], "train_loss": report["train_loss"],
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2}))
'''


def same_rows(project: Path, folder: Path, steps: int, batch: int) -> Path:
    """A data folder for mlx_lm.lora whose training file holds exactly the rows the project's
    default run draws (its sampler: seed 42, stage 1, equal weights), so both train the same
    rows; mlx-lm then batches them its own way (sorted by length)."""
    sys.path.insert(0, str(project))
    import numpy as np
    from trainer.data.training_data import Sampler

    processed = project / "data" / "processed"
    rows = (processed / "train.jsonl").read_text().splitlines()
    sampler = Sampler([(np.ones(len(rows)), 1.0)], batch, 42, 1)
    folder.mkdir(parents=True)
    drawn = [rows[i] for step in range(1, steps + 1) for i in sampler.batch(step, 0)]
    (folder / "train.jsonl").write_text("\n".join(drawn) + "\n")
    (folder / "valid.jsonl").write_text((processed / "valid.jsonl").read_text())
    return folder


def timed_run(argv: list[str], cwd: Path) -> tuple[dict, float]:
    began = time.perf_counter()
    result = run(argv, cwd)
    return result, time.perf_counter() - began


def main() -> None:
    options = parser(__doc__, steps=10, batch=4)
    options.add_argument("--small", action="store_true", help="a 1M-parameter model: a quick check that both run")
    args = options.parse_args()
    if args.precision != "float32":  # the project refuses training.precision bf16 on mlx
        options.error("mlx has no bf16 autocast: the mlx benchmark runs at --precision float32")
    from importlib.metadata import version

    import mlx.core as mx

    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, mlx {version('mlx')} "
          f"({mx.default_device()}), mlx-lm {version('mlx-lm')}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        project, model, summary = bench_project(Path(tmp), "mlx", args.rows, SMALL if args.small else SHAPE,
                                                real=args.real)
        python = sys.executable
        ours_args = [python, "scripts/train.py", "--json", "--name", "bench",
                     *project_args(args.steps, args.batch, LEARNING_RATE), "--set", "training.max_grad_norm=0",
                     "--set", "training.weight_decay=0.01"]  # mlx-lm's AdamW default
        grouped_args = [*ours_args, "--set", f"training.length_grouping={GROUP}"]
        config = Path(tmp) / "mlx_lm.yaml"
        config.write_text(json.dumps({
            "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0,
                                "keys": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                         "self_attn.o_proj"]}}))
        raw_data = same_rows(project, Path(tmp) / "raw-data", args.steps, args.batch)
        raw_args = [python, "-c", RAW_SCRIPT, "--model", str(model), "--train", "--data", str(raw_data),
                    "--fine-tune-type", "lora", "--optimizer", "adamw", "--num-layers", "-1",
                    "--batch-size", str(args.batch), "--iters", str(args.steps),
                    "--learning-rate", str(LEARNING_RATE), "--steps-per-report", str(args.steps),
                    "--steps-per-eval", str(args.steps), "--val-batches", "1", "--save-every", str(args.steps),
                    "--max-seq-length", "512", "--mask-prompt", "--seed", "42",
                    "--adapter-path", str(Path(tmp) / "raw-adapters"), "-c", str(config)]
        sides = {"project mlx": ([], ours_args), "project, grouped": ([], grouped_args),
                 "raw mlx_lm.lora": ([], raw_args)}
        for repeat in range(args.repeats):
            for name, (results, argv) in sides.items():
                result, wall = timed_run(argv, project)
                if name != "raw mlx_lm.lora":
                    stage = result["stages"]["stage1"]
                    result = {"target_tokens_per_second": stage["target_tokens"] / stage["seconds"],
                              "target_tokens": stage["target_tokens"], "train_loss": stage["train_loss"],
                              "peak_gb": stage["peak_memory_gb"]}
                results.append(result | {"wall_seconds": wall})
            print(f"  repeat {repeat + 1}: " + ", ".join(
                f"{name} {results[-1]['target_tokens_per_second']:.0f} tok/s" for name, (results, _) in sides.items()))

    print(f"\nmodel: {summary['model']}, {summary['parameters'] / 1e6:.1f}M parameters, batch {args.batch}, "
          f"{args.steps} steps x "
          f"{args.repeats} alternating runs, {args.rows} rows of variable length")
    print(f"{'':20}{'trained tok/s':>14}{'wall s':>9}{'peak GB':>9}{'tokens':>8}")
    for name, (results, _) in sides.items():
        print(f"{name:20}{median(results, 'target_tokens_per_second'):>14.1f}{median(results, 'wall_seconds'):>9.1f}"
              f"{median(results, 'peak_gb'):>9.2f}{median(results, 'target_tokens'):>8.0f}")
    raw = sides["raw mlx_lm.lora"][0]
    for name in ("project mlx", "project, grouped"):
        ours = sides[name][0]
        print(f"ratio ({name} / raw): throughput "
              f"{median(ours, 'target_tokens_per_second') / median(raw, 'target_tokens_per_second'):.2f}x, "
              f"peak memory {median(ours, 'peak_gb') / median(raw, 'peak_gb'):.2f}x")


if __name__ == "__main__":
    main()
