#!/usr/bin/env python
"""Talk to a trained model: answer a prompt, or chat, with a run's adapter or an export.

    python scripts/generate.py --run-id ID --prompt "Summarise: ..."      # the run's last stage
    python scripts/generate.py --run-id ID --stage 1 --backend transformers --prompt "..."
    python scripts/generate.py --export exports/ID-stage1-huggingface --prompt "..."
    python scripts/generate.py --run-id ID --chat                          # interactive; an empty line ends it
    python scripts/generate.py --prompt "..."                              # the base model alone
    echo '{"prompt": "...", "system": "..."}' | python scripts/generate.py --request-stdin --json

--request-stdin reads the prompt and the system message as one JSON object: text of any kind
(a leading '-', a NUL, megabytes) arrives exactly as sent, with no argv limits (the MCP
server uses it). The prompt and system message together may take at most
training.max_seq_length tokens after the chat template.

Greedy by default (--temperature 0); the prompt goes through the model's chat template, as
in training. Engine: --backend, else the one that trained the run, else mlx, then transformers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.evaluate.generation import GenerationError, check_length, check_options, load_model, reply  # noqa: E402


def request(args) -> None:
    """--request-stdin: the prompt and system message from one JSON object on stdin."""
    try:
        sent = json.loads(sys.stdin.read())
    except ValueError as error:
        raise GenerationError(f"--request-stdin: stdin is not one JSON object: {error}") from None
    if not isinstance(sent, dict) or not isinstance(sent.get("prompt"), str) or not isinstance(
            sent.get("system") or "", str):
        raise GenerationError('--request-stdin: expected {"prompt": "...", "system": "..." or null}')
    args.prompt, args.system = sent["prompt"], sent.get("system") or None


def main(args) -> dict:
    config = cli.config_from(args)
    if args.request_stdin:
        request(args)
    if not args.chat and args.prompt is None:
        raise GenerationError("give --prompt TEXT (or --prompt - to read it from stdin), or --chat")
    settings = config.evaluation.generation
    def given(value, default):
        return default if value is None else value

    options = {"max_tokens": given(args.max_tokens, settings.max_tokens),
               "temperature": given(args.temperature, settings.temperature), "top_p": given(args.top_p, settings.top_p)}
    check_options(**options)  # before the (slow) load
    model = load_model(config, args.run_id, args.stage, Path(args.export) if args.export else None, args.backend)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if not args.chat:
        prompt = sys.stdin.read() if args.prompt == "-" and not args.request_stdin else args.prompt
        messages.append({"role": "user", "content": prompt})
        check_length(model, messages, config.training.max_seq_length)
        return {"model": model.description, **options, "prompt": prompt, "response": reply(model, messages, **options)}
    turns = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        answer = reply(model, messages, **options)
        messages.append({"role": "assistant", "content": answer})
        turns.append({"prompt": line.rstrip("\n"), "response": answer})
        if not args.json:
            print(f"model> {answer}", flush=True)
    return {"model": model.description, **options, "turns": turns}


def show(result: dict) -> None:
    if "response" in result:
        print(result["response"])


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--run-id", help="a trained run (default: the base model alone)")
    which.add_argument("--export", metavar="FOLDER", help="an exported model or adapter (scripts/export.py)")
    parser.add_argument("--stage", type=int, choices=(1, 2), help="the run's stage (default: its last completed)")
    parser.add_argument("--backend", choices=("mlx", "transformers"), help="the engine to load with")
    parser.add_argument("--prompt", help="the user message; - reads it from stdin")
    parser.add_argument("--chat", action="store_true", help="a conversation: one user turn per stdin line")
    parser.add_argument("--system", help="a system message before the conversation")
    parser.add_argument("--request-stdin", action="store_true",
                        help='read {"prompt": ..., "system": ...} as JSON from stdin (no --prompt/--system)')
    parser.add_argument("--max-tokens", type=int, help="default: evaluation.generation.max_tokens")
    parser.add_argument("--temperature", type=float, help="0 is greedy (default: evaluation.generation.temperature)")
    parser.add_argument("--top-p", type=float, help="default: evaluation.generation.top_p")
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
