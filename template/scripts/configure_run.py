#!/usr/bin/env python
"""Configure a training run: a run directory with a config snapshot, its data and a manifest.

    python scripts/configure_run.py --name first-try
    python scripts/configure_run.py --name big --set training.stage1.iterations=500 --set lora.rank=16
    python scripts/configure_run.py --name two-stage --stage2-train domain/train.jsonl --stage2-valid domain/valid.jsonl

Data defaults: data/processed/{train,valid,test}.jsonl for stage 1 and
data/processed/stage2/... for stage 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.runs.training_run_manager import RunManager  # noqa: E402

SPLITS = ("train", "valid", "test")


def data_args(args) -> dict:
    data = {}
    for stage in (1, 2):
        prefix = "" if stage == 1 else "stage2_"
        given = {split: getattr(args, prefix + split) for split in SPLITS}
        if any(given.values()):
            data[stage] = {split: Path(p).resolve() if p else None for split, p in given.items()}
    return data


def main(args) -> dict:
    config = cli.config_from(args)
    return RunManager(config).configure(args.name, data_args(args), cli.parse_sets(args.set),
                                        config_path=Path(args.config))


def show(result: dict) -> None:
    print(f"configured run {result['run_id']} in {result['run_directory']}")
    for stage, info in result["configuration_summary"]["stages"].items():
        print(f"  {stage}: {info['iterations']} iterations at lr {info['learning_rate']:g}, rows {info['rows']}")
    print(f"train it: python scripts/train.py --run-id {result['run_id']}")


def add_arguments(parser) -> None:
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value for this run")
    for split in SPLITS:
        parser.add_argument(f"--{split}", metavar="FILE", help=f"stage-1 {split} data (processed jsonl)")
        parser.add_argument(f"--stage2-{split}", dest=f"stage2_{split}", metavar="FILE", help=f"stage-2 {split} data")


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="run name; the run id adds a timestamp")
    add_arguments(parser)
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
