#!/usr/bin/env python
"""Security log analysis in two stages: Llama learns to read auth and web logs (stage 1), then
to triage web-application attacks (stage 2, starting from the stage-1 adapter and replaying
20% stage-1 rows against forgetting).

    python examples/security_analysis_example.py                      # tiny local Llama, minutes on a CPU
    python examples/security_analysis_example.py --model-id meta-llama/Llama-3.2-1B-Instruct

Drives the olmo-fine-tuning-mcp server over stdio with the official MCP SDK client:
generate -> prepare (both stages) -> configure -> train -> evaluate -> ask -> export.
"""

from __future__ import annotations

import random

import lifecycle

IPS = ["10.0.0.5", "203.0.113.7", "198.51.100.23", "192.0.2.44"]


def general(n: int = 60, seed: int = 11) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ip, count = rng.choice(IPS), rng.randint(1, 60)
        if rng.random() < 0.5:
            log = f"sshd: Failed password for root from {ip} port 22 ({count} times in 5 minutes)"
            verdict = ("brute force: block the address and require keys" if count > 10 else
                       "probably a mistyped password: no action")
        else:
            log = f"nginx: {ip} GET /index.html 200 ({count} requests per minute)"
            verdict = "normal traffic" if count < 40 else "unusually high request rate: rate-limit the address"
        out.append({"instruction": "Analyse this log line and give a verdict.", "input": log, "output": verdict,
                    "quality": round(rng.uniform(0.6, 1.0), 2)})
    return out


def web_attacks(n: int = 40, seed: int = 13) -> list[dict]:
    rng = random.Random(seed)
    attacks = [("GET /search?q=' OR 1=1 --", "SQL injection attempt: block and review the query handling"),
               ("GET /page?name=<script>alert(1)</script>", "reflected XSS attempt: encode output, block the address"),
               ("GET /../../etc/passwd", "path traversal attempt: block; check the file-serving code"),
               ("POST /login (user=admin, 500 attempts)", "credential stuffing: lock the account, add rate limits")]
    out = []
    for _ in range(n):
        request, verdict = rng.choice(attacks)
        out.append({"instruction": "Triage this web request.", "input": f"{rng.choice(IPS)} {request}",
                    "output": verdict, "quality": round(rng.uniform(0.7, 1.0), 2)})
    return out


async def scenario(args) -> dict:
    return await lifecycle.lifecycle(
        args, "security-analysis-llama",
        {"description": "Log analysis and web-attack triage", "base_model": {"type": "llama"},
         "training": {"stage2": {"replay_ratio": 0.2}}},
        general(), ["Triage this web request.\n\n203.0.113.7 GET /search?q=' OR 1=1 --"],
        tiny="llama", stage2_rows=web_attacks())


if __name__ == "__main__":
    lifecycle.main(lifecycle.parser(__doc__.splitlines()[0], "meta-llama/Llama-3.2-1B-Instruct").parse_args(),
                   scenario)
