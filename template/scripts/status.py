#!/usr/bin/env python
"""Show a run's status (or list every run): stage, iteration, progress, last metrics, ETA.

    python scripts/status.py                     # all runs
    python scripts/status.py --run-id ID --json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer import cli  # noqa: E402
from trainer.runs.training_run_manager import RunManager  # noqa: E402


def main(args) -> dict:
    manager = RunManager(cli.config_from(args))
    if args.run_id:
        return manager.status(args.run_id)
    return {"runs": manager.list_runs()}


def show(result: dict) -> None:
    if "runs" in result:
        for run in result["runs"] or [{"run_id": "(no runs yet)", "status": "", "progress": None}]:
            progress = f"{run['progress']:.0f}%" if run.get("progress") is not None else ""
            print(f"{run['run_id']:50} {run['status']:12} {progress}")
        return
    print(f"{result['run_id']}: {result['status']}" + (f" (pid {result['pid']})" if result.get("pid") else ""))
    if result.get("stage"):
        print(f"  stage {result['stage']}, iteration {result.get('iteration')}/{result.get('total_iterations')}, "
              f"{result.get('progress')}% done, eta {result.get('eta_seconds')} s")
    if result.get("last_metrics"):
        print(f"  last metrics: {result['last_metrics']}")
    if result.get("error"):
        print(f"  error: {result['error']}")


if __name__ == "__main__":
    parser = cli.parser(__doc__.splitlines()[0])
    parser.add_argument("--run-id", help="one run (default: list all runs)")
    arguments = parser.parse_args()
    sys.exit(cli.run(main, arguments, show))
