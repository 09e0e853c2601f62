"""GGUF K-quants and llama.cpp's other types, by llama.cpp's own quantizer: libllama's
`llama_model_quantize` (shipped in llama-cpp-python) takes the f16 GGUF this project writes
to any type the installed library offers, with llama.cpp's own choices per tensor (Q4_K_M
keeps some tensors at Q6_K, rows that do not fill 256-wide K blocks fall back to other types).

The quantizer runs in a child process: a llama.cpp built for another CPU can die outright, and
the export then reports it instead of dying with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# ours: written by trainer.export.gguf_export itself; the rest: llama.cpp's (LLAMA_FTYPE_MOSTLY_<NAME>)
OURS = ("f32", "f16", "q8_0")
LLAMA = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
         "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")
TIMEOUT = 3600


class QuantizeError(RuntimeError):
    """llama.cpp could not quantize (the type, the file, or the library)."""


def offered() -> list[str]:
    """The types of LLAMA the installed llama-cpp-python knows; [] when it is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return []
    return [name for name in LLAMA if hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")]


def quantize(source: Path, target: Path, kind: str, threads: int = 0) -> dict[str, Any]:
    """`source` (an f16/f32 GGUF) quantized to `kind` in `target`; returns size and time."""
    began = time.perf_counter()
    child = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    try:
        out = subprocess.run([sys.executable, "-c", child, __file__, str(source), str(target), kind, str(threads)],
                             capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        raise QuantizeError(f"llama.cpp did not quantize to {kind} within {TIMEOUT} s") from None
    if out.returncode != 0 or not target.is_file():
        why = f"signal {-out.returncode}" if out.returncode < 0 else f"exit {out.returncode}"
        raise QuantizeError(f"llama.cpp could not quantize to {kind} ({why}): {out.stderr.strip()[-1500:]}")
    return {"quantizer": "llama.cpp llama_model_quantize", "seconds": round(time.perf_counter() - began, 3),
            "source_mb": round(source.stat().st_size / 1e6, 3), "size_mb": round(target.stat().st_size / 1e6, 3),
            **json.loads(out.stdout.strip().splitlines()[-1])}


def _child(source: str, target: str, kind: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}")
    params.nthread = threads
    code = llama_cpp.llama_model_quantize(source.encode(), target.encode(), params)
    if code != 0:
        print(f"llama_model_quantize returned {code}", file=sys.stderr)
        raise SystemExit(1)
    print(json.dumps({"llama_cpp_version": llama_cpp.__version__}))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
