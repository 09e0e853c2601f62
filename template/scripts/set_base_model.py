#!/usr/bin/env python
"""Set the project's base model: build the tiny one, or bring a local model folder or GGUF file.

    python scripts/set_base_model.py --tiny                       # models/tiny-<architecture>, random weights
    python scripts/set_base_model.py ~/models/SmolLM2-135M-Instruct   # copied into models/
    python scripts/set_base_model.py ~/Downloads/model.Q8_0.gguf     # converted into models/model.Q8_0/

Either way base_model.local_path in the config points at it afterwards (only that line changes).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.errors import ProjectError  # noqa: E402
from trainer.models import base_model, tiny_model  # noqa: E402


def main(args) -> dict:
    config = cli.config_from(args)
    config_file = Path(args.config)
    if args.tiny == bool(args.source):
        raise ProjectError("give a model folder or GGUF file, or --tiny (one of them)")
    if args.tiny:
        return base_model.build_tiny(config, args.architecture, args.seed, config_file)
    return base_model.bring(config, args.source, args.name, config_file)


def show(result: dict) -> None:
    print(f"base model ({result['kind']}): {result['path']}")
    print(f"  base_model.local_path: {result['local_path']}")


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", help="a Hugging Face model folder or a .gguf file")
    parser.add_argument("--tiny", action="store_true", help="build the tiny smoke-test model instead")
    parser.add_argument("--architecture", choices=tiny_model.ARCHITECTURES,
                        help="with --tiny (default: the architecture of base_model.type)")
    parser.add_argument("--seed", type=int, default=0, help="with --tiny")
    parser.add_argument("--name", help="the folder name under models/ (default: the source's name)")
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
