#!/usr/bin/env python
"""Train a run's LoRA adapters with the mlx or transformers backend.

    python scripts/train.py --name first-try               # configure a run with defaults, then train it
    python scripts/train.py --run-id first-try-20250101-120000
    python scripts/train.py --run-id ... --stage 2          # one stage only
    python scripts/train.py --run-id ... --resume           # continue from the last complete checkpoint

Progress goes to the terminal and to runs/<id>/metrics.jsonl; SIGTERM saves a
checkpoint and ends the run as cancelled.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configure_run import add_arguments, data_args  # noqa: E402

from trainer import cli  # noqa: E402
from trainer.engines import distributed  # noqa: E402
from trainer.engines.pipeline import train_run  # noqa: E402
from trainer.runs.training_run_manager import RunManager  # noqa: E402


def main(args) -> dict:
    config = cli.config_from(args)
    run_id = args.run_id
    if run_id is None and distributed.launched():
        raise cli.ProjectError("under a launcher every process would configure a run of its own: configure the run "
                               "first (python scripts/configure_run.py --name NAME), then launch with --run-id")
    if run_id is None:
        configured = RunManager(config).configure(args.name, data_args(args), cli.parse_sets(args.set),
                                                  config_path=Path(args.config))
        run_id = configured["run_id"]
    elif args.set or any(v for k, v in vars(args).items() if k.endswith(("train", "valid", "test"))):
        raise cli.ProjectError("--set and data files configure a new run: use them with --name, not --run-id")
    return train_run(config, run_id, stage=args.stage, resume=args.resume, quiet=args.json)


def show(result: dict) -> None:
    print(f"\nrun {result['run_id']}: {result['status']} ({result['backend']})")
    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    for stage, metrics in result["stages"].items():
        print(f"  {stage}: train loss {fmt(metrics['train_loss'])}, validation loss {fmt(metrics['val_loss_before'])}"
              f" -> {fmt(metrics['val_loss'])}, {metrics['tokens_per_second']:.0f} tok/s, "
              f"peak memory {metrics['peak_memory_gb']:.2f} GB")


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="a configured run")
    which.add_argument("--name", help="configure a new run with this name and train it")
    parser.add_argument("--stage", type=int, choices=(1, 2), help="train only this stage")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    add_arguments(parser)
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
