"""Quality weighting by index sampling vs duplicating rows, and data preparation throughput.

    python bench/weighting_and_data.py [--sizes 10000 100000 1000000] [--skip-prepare]

1. Weighting: the generated project draws batches by weighted sampling of row indices
   (trainer.data.training_data.Sampler); the usual alternative copies every high-quality row
   `multiplier` times before shuffling. For each size: peak Python memory (tracemalloc) and
   time to set up, and the time to draw 100 batches of 16.
2. Preparation: scripts/prepare_dataset.py's code path (trainer.data.dataset_preparator.prepare)
   on synthetic JSONL: rows per second and peak memory, and how both grow with the size.

The project's code is imported from template/ (its Python files are copied verbatim).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import tempfile
import time
import tracemalloc
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The template's trainer package, pinned: template/trainer/ has no __init__.py (it is rendered from
# a .jinja), so a plain import would make it a namespace package any installed project shadows.
_package = types.ModuleType("trainer")
_package.__path__ = [str(REPO / "template" / "trainer")]
sys.modules["trainer"] = _package

MULTIPLIER, THRESHOLD, BATCH = 2.5, 0.8, 16


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "the a model answer question river city number capital plus minus equals what is of".split()
    return [{"instruction": " ".join(rng.choices(words, k=12)) + f" #{i}?",
             "output": " ".join(rng.choices(words, k=20)), "quality": round(rng.random(), 3),
             "metadata": {"category": rng.choice(["geo", "math", "misc"])}} for i in range(n)]


def measure(function):
    gc.collect()
    tracemalloc.start()
    began = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - began
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak / 2**20


def weighting(n: int) -> dict:
    from trainer.data.training_data import Sampler, quality_weights

    data = rows(n)
    qualities = [r["quality"] for r in data]

    def by_index():
        sampler = Sampler([(quality_weights(qualities, MULTIPLIER, THRESHOLD, True), 1.0)], BATCH, 42, 1)
        return sampler

    def by_copies():
        # what duplication-based weighting does: copy good rows `multiplier` times (2.5 -> 2 or 3
        # copies, drawn so the expectation is 2.5), then shuffle the expanded list
        rng = random.Random(42)
        expanded = []
        for row in data:
            copies = 1
            if row["quality"] >= THRESHOLD:
                copies = int(MULTIPLIER) + (rng.random() < MULTIPLIER - int(MULTIPLIER))
            expanded.extend(dict(row) for _ in range(copies))
        rng.shuffle(expanded)
        return expanded

    sampler, index_seconds, index_mib = measure(by_index)
    began = time.perf_counter()
    for iteration in range(100):
        sampler.batch(iteration)
    draw_ms = (time.perf_counter() - began) * 10
    expanded, copy_seconds, copy_mib = measure(by_copies)
    result = {"rows": n, "index_setup_s": index_seconds, "index_peak_mib": index_mib,
              "index_ms_per_batch": draw_ms, "copies_setup_s": copy_seconds, "copies_peak_mib": copy_mib,
              "copies_rows": len(expanded)}
    return result


def preparation(n: int, folder: Path) -> dict:
    """Prepare n rows in a fresh interpreter: wall time (no tracing overhead) and peak RSS."""
    import subprocess

    out = subprocess.run([sys.executable, __file__, "--child-prepare", str(n), str(folder)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _high_water_mib() -> float:
    """This process's peak resident memory (VmHWM: per address space, so not inherited from the
    parent as ru_maxrss is across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child_prepare(n: int, folder: Path) -> None:
    from trainer.config import load_config
    from trainer.data.dataset_preparator import prepare

    project = folder / f"p{n}"
    (project / "config").mkdir(parents=True)
    (project / "data" / "raw").mkdir(parents=True)
    with (project / "data" / "raw" / "data.jsonl").open("w") as handle:
        for row in rows(n, seed=1):
            handle.write(json.dumps(row) + "\n")
    (project / "config" / "fine_tuning_config.yaml").write_text(
        "project:\n  name: bench\ndataset:\n  format: jsonl\n  raw_files: [data/raw/data.jsonl]\n")
    config = load_config(project / "config" / "fine_tuning_config.yaml", environ={}, root=project)
    baseline = _high_water_mib()
    began = time.perf_counter()
    summary = prepare(config)
    seconds = time.perf_counter() - began
    peak = _high_water_mib()
    print(json.dumps({"rows": n, "seconds": seconds, "rows_per_second": n / seconds, "peak_rss_mib": peak,
                      "rss_growth_mib": peak - baseline, "accepted": summary["counts"]["accepted"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--skip-prepare", action="store_true")
    parser.add_argument("--child-prepare", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_prepare:
        return _child_prepare(int(args.child_prepare[0]), Path(args.child_prepare[1]))
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}; "
          f"multiplier {MULTIPLIER}, threshold {THRESHOLD}, batch {BATCH}")
    print("\nquality weighting: index sampling vs duplicated rows")
    print(f"{'rows':>9} {'index MiB':>10} {'index s':>8} {'ms/batch':>9} {'copies MiB':>11} {'copies s':>9} "
          f"{'copied rows':>12} {'memory x':>9}")
    for n in args.sizes:
        r = weighting(n)
        print(f"{n:>9} {r['index_peak_mib']:>10.1f} {r['index_setup_s']:>8.3f} {r['index_ms_per_batch']:>9.3f} "
              f"{r['copies_peak_mib']:>11.1f} {r['copies_setup_s']:>9.3f} {r['copies_rows']:>12} "
              f"{r['copies_peak_mib'] / max(r['index_peak_mib'], 1e-9):>9.1f}")
    if args.skip_prepare:
        return
    print("\ndata preparation (scripts/prepare_dataset.py's code path)")
    print(f"{'rows':>9} {'seconds':>8} {'rows/s':>9} {'peak RSS MiB':>13} {'growth MiB':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            r = preparation(n, Path(tmp))
            print(f"{n:>9} {r['seconds']:>8.2f} {r['rows_per_second']:>9.0f} {r['peak_rss_mib']:>13.1f} "
                  f"{r['rss_growth_mib']:>11.1f}")


if __name__ == "__main__":
    main()
