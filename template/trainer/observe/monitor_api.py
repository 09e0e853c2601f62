"""The monitoring API (FastAPI): run status and metrics, and emissions per run and overall.

    GET /runs                          every run with its status
    GET /runs/{run_id}/status          status.json (progress, latest metrics, emissions so far)
    GET /runs/{run_id}/metrics?tail=N  the last N records of metrics.jsonl
    GET /emissions/{run_id}/current    the newest CodeCarbon reading of the run's latest stage
    GET /emissions/{run_id}/summary    totals, per stage, per hour, equivalencies, recommendations
    GET /emissions/aggregate           every run together

Unknown runs are 404 with a message that lists known runs. Served by scripts/monitor_training.py.
"""

from __future__ import annotations

import csv
import json
from typing import Any

from fastapi import FastAPI, HTTPException, Query

from trainer.config import FineTuningConfig
from trainer.observe import emissions
from trainer.runs.training_run_manager import RunError, RunManager


def create_app(config: FineTuningConfig) -> FastAPI:
    app = FastAPI(title=f"{config.project.name}: training monitor",
                  description="Run status, metrics and carbon emissions of this fine-tuning project")
    manager = RunManager(config)

    def known(run_id: str) -> dict[str, Any]:
        try:
            return manager.manifest(run_id)
        except RunError as error:
            raise HTTPException(status_code=404, detail=str(error)) from None

    @app.get("/runs")
    def runs() -> dict[str, Any]:
        return {"runs": manager.list_runs()}

    @app.get("/runs/{run_id}/status")
    def status(run_id: str) -> dict[str, Any]:
        known(run_id)
        return manager.status(run_id)

    @app.get("/runs/{run_id}/metrics")
    def metrics(run_id: str, tail: int = Query(default=100, ge=1, le=100000)) -> dict[str, Any]:
        known(run_id)
        path = manager.run_dir(run_id) / "metrics.jsonl"
        records = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines()[-tail:]:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line being written
        return {"run_id": run_id, "records": records}

    @app.get("/emissions/aggregate")
    def aggregate() -> dict[str, Any]:
        return emissions.report(config)

    @app.get("/emissions/{run_id}/summary")
    def summary(run_id: str) -> dict[str, Any]:
        known(run_id)
        return emissions.report(config, run_id)

    @app.get("/emissions/{run_id}/current")
    def current(run_id: str) -> dict[str, Any]:
        manifest = known(run_id)
        stages = sorted(int(k.removeprefix("stage")) for k in manifest["stages"])
        files = [(n, emissions.csv_path(config, run_id, n)) for n in stages]
        present = [(n, p) for n, p in files if p.is_file() and p.stat().st_size > 0]
        if not present:
            raise HTTPException(status_code=404, detail=f"no emissions recorded for run {run_id} yet "
                                                        f"(carbon tracking: {config.carbon_tracking.enabled})")
        stage, path = present[-1]
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise HTTPException(status_code=404, detail=f"{path.name} is empty")
        try:
            reading = emissions.record_of(rows[-1], path)
        except ValueError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        return {"run_id": run_id, "stage": stage, "timestamp": rows[-1].get("timestamp"),
                "status": manager.status(run_id).get("status"), **reading}

    return app
