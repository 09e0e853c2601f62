"""Carbon accounting and tracking without training: reading CodeCarbon CSVs (including empty
and corrupt ones), trackers that fail or hang, alerts and summaries, a real CodeCarbon
measurement when installed, MLflow URIs, and the monitoring API."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from trainer.observe import emissions, tracking

COLUMNS = ["timestamp", "run_id", "duration", "emissions", "energy_consumed", "cpu_energy", "gpu_energy",
           "ram_energy", "cpu_power", "gpu_power", "ram_power", "country_name", "region", "tracking_mode"]


def write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, 0) for c in COLUMNS})
    return path


def row(session: str, kg: float, kwh: float, seconds: float) -> dict:
    return {"run_id": session, "emissions": kg, "energy_consumed": kwh, "cpu_energy": kwh / 2, "ram_energy": kwh / 2,
            "duration": seconds, "country_name": "France", "tracking_mode": "process"}


def test_a_stage_csv_sums_its_sessions(tmp_path: Path):
    # two tracker sessions (a resumed stage); each session's last row is its cumulative total
    path = write_csv(tmp_path / "r_stage1_emissions.csv", [row("a", 0.001, 0.01, 60), row("a", 0.002, 0.02, 120),
                                                            row("b", 0.003, 0.03, 180)])
    record = emissions.read_csv(path)
    assert record["status"] == "measured" and record["sessions"] == 2
    assert record["emissions_kg"] == pytest.approx(0.005) and record["energy_kwh"] == pytest.approx(0.05)
    assert record["duration_seconds"] == pytest.approx(300)
    assert record["carbon_intensity_g_per_kwh"] == pytest.approx(100)
    assert record["emissions_per_hour_kg"] == pytest.approx(0.005 / (300 / 3600))


@pytest.mark.parametrize(("content", "reason"), [
    ("", "is empty"),
    (",".join(COLUMNS) + "\n", "is empty"),
    (",".join(COLUMNS) + "\n2026,a,ten,lots,x,0,0,0,0,0,0,France,,process\n", "column emissions is not a number"),
    ("\x00\x01garbage without columns\n1,2\n", "unreadable"),
])
def test_empty_or_corrupt_csvs_are_unavailable_with_the_reason(tmp_path: Path, content: str, reason: str):
    path = tmp_path / "r_stage1_emissions.csv"
    path.write_text(content)
    record = emissions.read_csv(path)
    assert record["status"] == "unavailable" and reason in record["reason"] and path.name in record["reason"]
    assert emissions.read_csv(tmp_path / "missing.csv")["reason"] == "missing.csv does not exist"


class FailingAtStart:
    def start(self):
        raise RuntimeError("no power source")


class FailingAtStop:
    def start(self):
        pass

    def stop(self):
        raise OSError("cannot write the CSV")


class Hanging:
    def start(self):
        time.sleep(5)


def test_tracker_failures_never_raise(config, monkeypatch):
    config.carbon_tracking.enabled = True
    started = emissions.StageEmissions(config, "r", 1, factory=FailingAtStart)
    started.start()
    assert started.stop() == {"status": "unavailable",
                              "reason": "the tracker failed to start: RuntimeError: no power source"}
    stopped = emissions.StageEmissions(config, "r", 1, factory=FailingAtStop)
    stopped.start()
    assert stopped.flush() is None
    assert "failed to stop: OSError: cannot write the CSV" in stopped.stop()["reason"]
    monkeypatch.setattr(emissions, "START_TIMEOUT", 0.2)
    hanging = emissions.StageEmissions(config, "r", 1, factory=Hanging)
    began = time.monotonic()
    hanging.start()
    assert time.monotonic() - began < 2, "a hanging tracker must not hold up training"
    assert "did not start within" in hanging.stop()["reason"]
    config.carbon_tracking.enabled = False
    off = emissions.StageEmissions(config, "r", 1, factory=FailingAtStart)
    off.start()
    assert off.stop()["reason"] == "carbon_tracking.enabled is false"


def test_the_configured_factory_is_used(config, tmp_path, monkeypatch):
    (tmp_path / "my_trackers.py").write_text("def broken(config, run_id, stage):\n    raise ValueError(stage)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config.carbon_tracking.enabled = True
    config.carbon_tracking.tracker_factory = "my_trackers:broken"
    tracker = emissions.StageEmissions(config, "r", 2)
    tracker.start()
    assert tracker.stop()["reason"] == "the tracker failed to start: ValueError: 2"
    with pytest.raises(ValueError, match="package.module:function"):
        config.carbon_tracking.tracker_factory = "no-colon"


def test_totals_flag_alerts(config):
    config.carbon_tracking.alerts.high_emissions_kg = 0.004
    config.carbon_tracking.alerts.high_emissions_per_hour_kg = 1.0
    stages = {"stage1": emissions.record_of(row("a", 0.003, 0.03, 3600), Path("s1.csv")),
              "stage2": emissions.record_of(row("b", 0.002, 0.02, 1800), Path("s2.csv"))}
    summary = emissions.totals(stages, config)
    assert summary["status"] == "measured" and summary["total_kg"] == pytest.approx(0.005)
    assert summary["alerts"] == [{"alert": "high_emissions", "value_kg": pytest.approx(0.005),
                                  "threshold_kg": 0.004}]
    partial = emissions.totals({**stages, "stage2": {"status": "unavailable", "reason": "x"}}, config)
    assert partial["status"] == "partial" and partial["total_kg"] == pytest.approx(0.003)


def test_equivalencies_cite_their_constants():
    eq = emissions.equivalencies(4.0)
    assert eq["miles_driven"] == pytest.approx(10.0) and eq["smartphones_charged"] == pytest.approx(4 / 0.00822)
    assert set(eq["sources"]) == {"miles_driven", "km_flown", "tree_years_to_absorb", "smartphones_charged"}
    assert all("kg" in source for source in eq["sources"].values())


def test_a_real_codecarbon_measurement(config, project):
    pytest.importorskip("codecarbon")
    config.carbon_tracking.enabled = True
    config.carbon_tracking.offline_mode = True
    config.carbon_tracking.measure_power_secs = 1
    tracker = emissions.StageEmissions(config, "real-run", 1)
    tracker.start()
    sum(i * i for i in range(2_000_000))
    record = tracker.stop()
    assert record["status"] == "measured" and record["emissions_kg"] > 0 and record["energy_kwh"] > 0
    assert record["tracking_mode"] == "process" and record["measurement"]  # how power was obtained
    path = project / "emissions" / "real-run_stage1_emissions.csv"
    assert Path(record["csv"]) == path and emissions.read_csv(path)["emissions_kg"] == pytest.approx(
        record["emissions_kg"])


def test_mlflow_local_stores_live_in_the_project(config, project):
    config.mlflow.tracking_uri = "sqlite:///mlruns/mlflow.db"
    assert tracking.mlflow_uri(config) == f"sqlite:///{project / 'mlruns' / 'mlflow.db'}"
    config.mlflow.tracking_uri = "http://127.0.0.1:5000"
    assert tracking.mlflow_uri(config) == "http://127.0.0.1:5000"
    assert tracking.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_an_unreachable_mlflow_server_switches_tracking_off(config, project):
    pytest.importorskip("mlflow")
    config.mlflow.enabled = True
    config.mlflow.tracking_uri = "http://127.0.0.1:9"  # the discard port: nothing listens
    tracker = tracking.Tracking(config, project, "r")
    began = time.monotonic()
    tracker.start({"x": 1})
    tracker.on_train_loss_report({"stage": 1, "iteration": 1, "train_loss": 1.0})
    state = tracker.finish("completed")
    assert state["mlflow"]["status"] == "failed" and "Error" in state["mlflow"]["reason"]
    assert time.monotonic() - began < 60


def test_the_monitoring_api_without_runs(config):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from trainer.observe.monitor_api import create_app

    client = TestClient(create_app(config))
    assert client.get("/runs").json() == {"runs": []}
    assert client.get("/emissions/aggregate").json()["runs"] == 0
    missing = client.get("/emissions/nope-1/summary")
    assert missing.status_code == 404 and "unknown run id 'nope-1'" in missing.json()["detail"]
    assert client.get("/runs/nope-1/status").status_code == 404


def test_machine_mode_yields_to_process_mode_while_another_run_trains(config, project):
    import fcntl
    import os

    config.carbon_tracking.tracking_mode = "machine"
    assert emissions.tracking_mode(config, "mine") == ("machine", None)
    other = project / "runs" / "other-1"
    other.mkdir(parents=True)
    (other / "run-manifest.json").write_text("{}")
    (other / "status.json").write_text('{"status": "running"}')
    fd = os.open(other / ".lock", os.O_RDWR | os.O_CREAT)
    try:  # a live process (this one, from a different descriptor) holds the other run's lock
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        mode, why = emissions.tracking_mode(config, "mine")
        assert mode == "process" and "other-1" in why
    finally:
        os.close(fd)
    config.carbon_tracking.tracking_mode = "process"
    assert emissions.tracking_mode(config, "mine") == ("process", None)
