#!/usr/bin/env python
"""Prepare data/processed/{train,valid,test}.jsonl and a quality report from data/raw/.

    python scripts/prepare_dataset.py                  # the files in dataset.raw_files
    python scripts/prepare_dataset.py --input my.csv   # other files (format from extension)
    python scripts/prepare_dataset.py --skip-invalid   # drop bad rows, list them in the report
    python scripts/prepare_dataset.py --stage 2 --input domain.jsonl   # stage 2's data -> data/processed/stage2
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.data.dataset_preparator import DatasetError, plan, write  # noqa: E402


def main(args) -> dict:
    config = cli.config_from(args)
    inputs = [Path(p) for p in args.input] if args.input else None
    options = {"skip_invalid": args.skip_invalid,
               "tokenizer_path": Path(args.tokenizer).expanduser().resolve() if args.tokenizer else None,
               "output_dir": Path(args.output_dir).resolve() if args.output_dir else None}
    if args.stage == 2 and config.training.num_stages != 2:
        raise cli.ProjectError("--stage 2: this project trains one stage (training.num_stages is 1)")
    if args.stage or inputs or config.training.num_stages == 1:
        return write([plan(config, inputs, stage=args.stage or 1, **options)])[0]
    # both stages, all or nothing: stage 1's summary at the top level, stage 2's under "stage2"
    first = plan(config, stage=1, **options)
    try:
        second = plan(config, stage=2, **options)
    except DatasetError as error:
        raise DatasetError(f"stage 2: {error} (stage 1's data validated, and was not written either)",
                           details=error.details) from None
    one, two = write([first, second])
    return {**one, "stage2": two}


def show(result: dict) -> None:
    if "stage2" in result:
        print("stage 1:")
        show({k: v for k, v in result.items() if k != "stage2"})
        print("stage 2:")
        show(result["stage2"])
        return
    counts = result["counts"]
    print(f"read {counts['rows_read']} rows: {counts['accepted']} accepted, {counts['rejected']} rejected, "
          f"{counts['duplicates_removed']} duplicates removed")
    for name, output in result["outputs"].items():
        print(f"  {name:5} {output['rows']:7} rows -> {output['path']}")
    for error in result["rejected"]:
        where = error["file"] + (f", {error['unit']} {error['line']}" if error["line"] else "")
        print(f"  rejected {where}: {error['field'] or ''} {error['reason']}")
    print(f"quality report ({result['length_unit']}): {result['report']}")


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", metavar="FILE", help="raw files to read instead of dataset.raw_files")
    parser.add_argument("--skip-invalid", action="store_true", help="drop invalid rows and report them")
    parser.add_argument("--tokenizer", metavar="DIR", help="model directory whose tokenizer measures lengths")
    parser.add_argument("--stage", type=int, choices=(1, 2),
                        help="prepare one stage (default: every configured stage)")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="where the splits go instead of dataset.processed_dir (e.g. data/processed/stage2)")
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
