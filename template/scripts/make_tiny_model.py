#!/usr/bin/env python
"""Build a tiny model of the configured architecture (random weights, local tokenizer).

    python scripts/make_tiny_model.py                      # models/tiny-<architecture>
    python scripts/make_tiny_model.py --architecture llama --hidden-size 256 --layers 4

Use it as the base model without downloading anything:
    OLMO_BASE_MODEL__LOCAL_PATH=models/tiny-olmo2 python scripts/...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.models import tiny_model  # noqa: E402
from trainer.models.base_model import corpus  # noqa: E402

SHAPE_FLAGS = {
    "vocab_size": "--vocab-size", "hidden_size": "--hidden-size", "intermediate_size": "--intermediate-size",
    "num_hidden_layers": "--layers", "num_attention_heads": "--heads", "num_key_value_heads": "--kv-heads",
}


def main(args) -> dict:
    config = cli.config_from(args)
    architecture = args.architecture or config.base_model.architecture
    output = Path(args.output) if args.output else config.root / "models" / f"tiny-{architecture}"
    shape = {key: getattr(args, key) for key in SHAPE_FLAGS if getattr(args, key) is not None}
    return tiny_model.build(architecture, output.resolve(), corpus(config), seed=args.seed,
                            shape=shape, verify=not args.no_verify, rope_theta=args.rope_theta)


def show(result: dict) -> None:
    print(f"tiny {result['architecture']} model, {result['parameters']:,} parameters, "
          f"vocab {result['vocab_size']} -> {result['path']}")
    if "verified" in result:
        print(f"  loads with: {', '.join(k for k, v in result['verified'].items() if v is True)}")
    print(f"  use it: OLMO_BASE_MODEL__LOCAL_PATH={result['path']}")


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--architecture", choices=tiny_model.ARCHITECTURES,
                        help="default: the architecture of base_model.type")
    parser.add_argument("--output", help="default: models/tiny-<architecture>")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-verify", action="store_true", help="skip loading it back with both engines")
    parser.add_argument("--rope-theta", type=float, help="RoPE base (default: the architecture's, 10000)")
    for key, flag in SHAPE_FLAGS.items():
        parser.add_argument(flag, dest=key, type=int, help=f"default {tiny_model.DEFAULT_SHAPE[key]}")
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
