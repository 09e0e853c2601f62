#!/usr/bin/env python
"""Prepare data/processed/{train,valid,test}.jsonl and a quality report from data/raw/.

    python scripts/prepare_dataset.py                  # the files in dataset.raw_files
    python scripts/prepare_dataset.py --input my.csv   # other files (format from extension)
    python scripts/prepare_dataset.py --skip-invalid   # drop bad rows, list them in the report
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.dataset_preparator import prepare  # noqa: E402


def main(args) -> dict:
    config = cli.config_from(args)
    inputs = [Path(p) for p in args.input] if args.input else None
    tokenizer = Path(args.tokenizer).expanduser().resolve() if args.tokenizer else None
    return prepare(config, inputs, skip_invalid=args.skip_invalid, tokenizer_path=tokenizer)


def show(result: dict) -> None:
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
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
