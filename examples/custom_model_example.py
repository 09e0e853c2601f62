#!/usr/bin/env python
"""Any Hugging Face causal LM: a custom model (SmolLM2, a Llama-architecture model) with its own
LoRA target modules, taught to answer questions about a product's documentation.

    python examples/custom_model_example.py                           # tiny local Llama-architecture model
    python examples/custom_model_example.py --model-id HuggingFaceTB/SmolLM2-135M-Instruct

Drives the olmo-fine-tuning-mcp server over stdio with the official MCP SDK client:
generate -> prepare -> configure -> train -> evaluate -> ask -> export.
"""

from __future__ import annotations

import random

import lifecycle

FACTS = [("What port does the server listen on?", "It listens on port 8765 on 127.0.0.1."),
         ("How do I resume a stopped run?", "Run scripts/train.py with --run-id and --resume."),
         ("Where are the checkpoints?", "In runs/<run id>/stageN/checkpoints, two kept at a time."),
         ("Which formats can I export?", "Adapters, a merged Hugging Face model, mlx and GGUF."),
         ("How is carbon measured?", "With CodeCarbon, per training stage.")]


def rows(n: int = 50, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    prefixes = ["", "Quick question: ", "Please tell me: ", "Docs question. "]
    return [{"instruction": rng.choice(prefixes) + question, "output": answer, "quality": 0.9}
            for question, answer in (rng.choice(FACTS) for _ in range(n))]


async def scenario(args) -> dict:
    return await lifecycle.lifecycle(
        args, "custom-model-docs-qa",
        {"description": "Documentation Q&A on a custom Hugging Face model",
         "base_model": {"type": "custom", "model_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
         "lora": {"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj"]}},
        rows(), ["Where are the checkpoints?", "How do I resume a stopped run?"], tiny="llama")


if __name__ == "__main__":
    lifecycle.main(lifecycle.parser(__doc__.splitlines()[0], "HuggingFaceTB/SmolLM2-135M-Instruct").parse_args(),
                   scenario)
