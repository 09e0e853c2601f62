"""Monitor latency against the size of a run's metrics file, and copier copy time.

    python bench/monitor_latency.py [--sizes 1000 100000 1000000] [--calls 50]

monitor_training_progress reads status.json and the tail of metrics.jsonl, so its cost
should not grow with the file. Prints p50/p95 per size and the median copy time, then the
hostile files of issue 13: a 20 MB last line in metrics.jsonl, a 50 MB status.json, and
list_runs over a project holding both.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from copier import run_copy  # noqa: E402

from mcp_wrapper.settings import BUNDLED_TEMPLATE, Settings  # noqa: E402
from mcp_wrapper.tools import Tools  # noqa: E402


def write_run(project: Path, run_id: str, lines: int) -> None:
    run = project / "runs" / run_id
    run.mkdir(parents=True)
    (run / "run-manifest.json").write_text(json.dumps({"schema_version": "2.0", "stages": {}, "emissions": None}))
    (run / "status.json").write_text(json.dumps({"run_id": run_id, "status": "running", "stage": 1,
                                                 "iteration": lines, "total_iterations": lines * 2,
                                                 "progress": 50.0, "eta_seconds": 100.0}))
    record = {"stage": 1, "iteration": 0, "total_iterations": lines * 2, "train_loss": 1.2345, "val_loss": None,
              "learning_rate": 2e-5, "tokens_per_second": 1234.5, "peak_memory_gb": 1.5, "elapsed": 1.0,
              "eta": 100.0, "time": 1.7e9}
    with (run / "metrics.jsonl").open("w") as handle:
        for i in range(1, lines + 1):
            record["iteration"] = i
            handle.write(json.dumps(record) + "\n")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        copies = []
        for i in range(5):
            start = time.perf_counter()
            run_copy(str(BUNDLED_TEMPLATE), str(root / f"p{i}"), defaults=True, quiet=True, vcs_ref="HEAD")
            copies.append(time.perf_counter() - start)
        print(f"copier copy: median {statistics.median(copies):.3f} s over {len(copies)} copies")
        tools = Tools(Settings(output_dir=root))
        project = root / "p0"
        for size in args.sizes:
            run_id = f"bench-{size}"
            write_run(project, run_id, size)
            megabytes = (project / "runs" / run_id / "metrics.jsonl").stat().st_size / 1e6
            timings = []
            for _ in range(args.calls):
                start = time.perf_counter()
                seen = tools.monitor(str(project), run_id, True, False, None)
                timings.append((time.perf_counter() - start) * 1000)
            assert seen.metrics.train_loss == 1.2345 and seen.current_iteration == size
            print(f"monitor, {size:>9,} metric lines ({megabytes:7.1f} MB): p50 {percentile(timings, 0.5):6.2f} ms, "
                  f"p95 {percentile(timings, 0.95):6.2f} ms")
        hostile(tools, project, args.calls)


def timed(call, calls: int) -> str:
    timings = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        timings.append((time.perf_counter() - start) * 1000)
    return f"p50 {percentile(timings, 0.5):6.2f} ms, p95 {percentile(timings, 0.95):6.2f} ms"


def hostile(tools: Tools, project: Path, calls: int) -> None:
    """Files a hostile dataset or a broken writer could leave: the monitor reads bounded tails."""
    write_run(project, "long-line", 10)
    with (project / "runs" / "long-line" / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"stage": 1, "iteration": 11, "note": "x" * 20_000_000}) + "\n")
    print("monitor, a 20 MB last metrics line:       "
          + timed(lambda: tools.monitor(str(project), "long-line", True, False, None), calls))
    write_run(project, "huge-status", 10)
    (project / "runs" / "huge-status" / "status.json").write_text(
        json.dumps({"status": "running", "padding": "y" * 50_000_000}))
    seen = tools.monitor(str(project), "huge-status", True, False, None)
    assert seen.status == "unreadable", seen.status
    print("monitor, a 50 MB status.json (unreadable): "
          + timed(lambda: tools.monitor(str(project), "huge-status", True, False, None), calls))
    runs = len(tools.list_runs(str(project), None).runs)
    print(f"list_runs over {runs} runs, both above among them: "
          + timed(lambda: tools.list_runs(str(project), None), max(5, calls // 5)))


if __name__ == "__main__":
    main()
