#!/usr/bin/env python
"""Bring raw data files into data/raw/ (or data/raw/stage2/), validated as preparation reads them.

    python scripts/import_data.py ~/data/notes.jsonl                  # stage 1, next to the samples
    python scripts/import_data.py --replace-samples a.csv b.parquet   # and drop the template's samples
    python scripts/import_data.py --stage 2 domain.jsonl              # stage 2's data

Nothing is copied unless every file validates; then run scripts/prepare_dataset.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.data.data_import import import_files  # noqa: E402


def main(args) -> dict:
    config = cli.config_from(args)
    return import_files(config, args.files, stage=args.stage, replace_samples=args.replace_samples,
                        overwrite=args.overwrite, skip_invalid=args.skip_invalid)


def show(result: dict) -> None:
    counts = result["validation"]["counts"]
    for item in result["imported"]:
        print(f"imported {item['source']} -> {item['path']}")
    for sample in result["removed_samples"]:
        print(f"removed the sample {sample}")
    print(f"validated {counts['rows_read']} rows: {counts['accepted']} accepted, {counts['rejected']} rejected, "
          f"{counts['duplicates_removed']} duplicates")
    for path in result["unmatched"]:
        print(f"warning: {path} is not matched by the stage's raw_files patterns; pass it to prepare_dataset.py "
              "with --input")


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="jsonl, csv or parquet files")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=1, help="whose data (default: 1)")
    parser.add_argument("--replace-samples", action="store_true", help="remove the template's sample files")
    parser.add_argument("--overwrite", action="store_true", help="replace files of the same name")
    parser.add_argument("--skip-invalid", action="store_true", help="import even with invalid rows (listed)")
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
