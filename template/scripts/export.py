#!/usr/bin/env python
"""Export a trained stage of a run: adapters, safetensors, huggingface, mlx or gguf.

    python scripts/export.py --run-id ID --stage 1 --format adapters
    python scripts/export.py --run-id ID --stage 2 --format huggingface --output exports/my-model
    python scripts/export.py --run-id ID --stage 2 --format gguf --quantization q8_0
    python scripts/export.py --run-id ID --stage 2 --format mlx --quantization q4
    python scripts/export.py --run-id ID --stage 2 --format huggingface --upload --hf-repo-id me/model --dry-run

Each export is a folder with a model card (README.md); an existing one is replaced only with --overwrite.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.config import EXPORT_FORMATS  # noqa: E402
from trainer.export.export import export_run  # noqa: E402


def main(args) -> dict:
    config = cli.config_from(args)
    output = Path(args.output) if args.output else None
    if output is not None and not output.is_absolute():
        output = config.root / output
    return export_run(config, args.run_id, args.stage, args.format, output, merge=not args.no_merge,
                      quantization=args.quantization, overwrite=args.overwrite, upload=args.upload,
                      repo_id=args.hf_repo_id, dry_run=args.dry_run)


def show(result: dict) -> None:
    print(f"exported run {result['run_id']} stage {result['stage']} as {result['export_format']} "
          f"({'merged' if result['merged'] else 'adapter only'}, quantization {result['quantization']}): "
          f"{result['model_size_mb']} MB")
    print(f"  {result['export_path']}")
    for name in result["files"]:
        print(f"    {name}")
    if "upload" in result:
        upload = result["upload"]
        verb = "would upload" if upload["dry_run"] else "uploaded"
        print(f"  {verb} {len(upload['files'])} files to {upload['url']} "
              f"({'private' if upload['private'] else 'public'})")
    print("usage:\n" + "\n".join("  " + line for line in result["usage_instructions"].splitlines()))


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--output", metavar="DIR", help="export folder (default: exports/<run>-stage<N>-<format>)")
    parser.add_argument("--no-merge", action="store_true", help="keep the adapter separate (not for gguf)")
    parser.add_argument("--quantization", help="gguf: f32, f16, q8_0; mlx: none, q4, q8 (default: the config's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    parser.add_argument("--upload", action="store_true", help="upload to the Hugging Face Hub (token in HF_TOKEN)")
    parser.add_argument("--hf-repo-id", metavar="USER/NAME", help="Hub repository (default: from the config)")
    parser.add_argument("--dry-run", action="store_true", help="with --upload: list what would be uploaded")
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
