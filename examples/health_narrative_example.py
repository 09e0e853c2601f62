#!/usr/bin/env python
"""Health narratives: fine-tune OLMo to turn structured patient summaries into plain-language
narratives, with quality-weighted training (rows rated by clinicians count more).

    python examples/health_narrative_example.py                       # tiny local OLMo-2, minutes on a CPU
    python examples/health_narrative_example.py --model-id allenai/OLMo-2-0425-1B-Instruct

Drives the olmo-fine-tuning-mcp server over stdio with the official MCP SDK client:
generate -> prepare -> configure -> train -> evaluate -> ask -> export.
"""

from __future__ import annotations

import random

import lifecycle

CONDITIONS = [("type 2 diabetes", "metformin", "HbA1c 7.9%"), ("hypertension", "lisinopril", "BP 150/95"),
              ("asthma", "an inhaled corticosteroid", "peak flow 70% of predicted"),
              ("heart failure", "a beta blocker", "ejection fraction 35%"),
              ("chronic kidney disease", "an ACE inhibitor", "eGFR 48")]


def rows(n: int = 60, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        condition, drug, finding = rng.choice(CONDITIONS)
        age, sex = rng.randint(30, 85), rng.choice(["woman", "man"])
        visit = rng.choice(["follow-up", "first", "annual"])
        summary = f"age {age}; sex {sex}; dx {condition}; rx {drug}; finding {finding}; visit {visit}"
        narrative = (f"A {age}-year-old {sex} came for a {visit} visit about {condition}. The key result was "
                     f"{finding}. The plan is to continue {drug} and check again in three months.")
        quality = round(rng.uniform(0.85, 1.0) if i % 3 else rng.uniform(0.3, 0.7), 2)
        out.append({"instruction": "Write a plain-language narrative of this patient summary.", "input": summary,
                    "output": narrative, "quality": quality, "metadata": {"source": "synthetic", "id": i}})
    return out


async def scenario(args) -> dict:
    return await lifecycle.lifecycle(
        args, "health-narrative-olmo",
        {"description": "Plain-language patient narratives from structured summaries",
         "base_model": {"type": "olmo"},
         "training": {"quality_weighting": {"enabled": True, "multiplier": 2.5, "threshold": 0.8}}},
        rows(), ["Write a plain-language narrative of this patient summary.\n\nage 62; sex woman; dx asthma; "
                 "rx an inhaled corticosteroid; finding peak flow 70% of predicted; visit follow-up"],
        tiny="olmo2")


if __name__ == "__main__":
    lifecycle.main(lifecycle.parser(__doc__.splitlines()[0], "allenai/OLMo-2-0425-1B-Instruct").parse_args(),
                   scenario)
