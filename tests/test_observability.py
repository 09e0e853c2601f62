"""Carbon accounting, experiment tracking and dashboards through a generated project, all
real: CodeCarbon per stage, MLflow (a local store and an `mlflow server` on loopback),
W&B offline, the emissions report, the MCP tools, the FastAPI monitor under uvicorn, and the
Streamlit dashboard (AppTest, and Chromium loading the served page). Plus the failures that
must not fail training: a tracker raising at start or stop, a corrupt CSV, MLflow down."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from test_training import FAST, local, make_project

from conftest import mcp_ok, script
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("codecarbon")
mlflow = pytest.importorskip("mlflow")
pytest.importorskip("wandb")

TRACKED = ["--set", "training.backend=transformers", "--set", "training.stage2.iterations=20",
           "--set", "carbon_tracking.measure_power_secs=1"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wandb_history(run_dir: Path) -> list[dict]:
    """History records of an offline W&B run, read from its .wandb file (a LevelDB-style log
    of protobuf records: 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    position, chunks, pending = 7, [], b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
    history = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return history


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("observed"), "olmo", num_stages=2, enable_carbontracking=True,
                        enable_mlflow=True, enable_wandb=True)


@pytest.fixture(scope="module")
def run(project):
    code, out = script(project, "train.py", "--name", "tracked", *local("olmo"), *FAST, *TRACKED)
    assert code == 0, out
    return out


@pytest.mark.slow
def test_emissions_per_stage_in_csvs_manifest_metrics_and_status(project, run):
    run_id = run["run_id"]
    manifest = json.loads((project / "runs" / run_id / "run-manifest.json").read_text())
    total = manifest["emissions"]
    assert total["status"] == "measured" and total["alerts"] == []
    stages = total["stages"]
    for number in (1, 2):
        record = stages[f"stage{number}"]
        assert record["status"] == "measured" and record["emissions_kg"] > 0 and record["energy_kwh"] > 0
        assert record["tracking_mode"] == "process" and record["duration_seconds"] > 0
        assert record["cpu_energy_kwh"] + record["gpu_energy_kwh"] + record["ram_energy_kwh"] == pytest.approx(
            record["energy_kwh"], rel=1e-6)
        csv_file = project / "emissions" / f"{run_id}_stage{number}_emissions.csv"
        assert Path(record["csv"]) == csv_file and csv_file.stat().st_size > 0
        assert manifest["stages"][f"stage{number}"]["emissions"] == record
        assert run["stages"][f"stage{number}"]["emissions"]["emissions_kg"] == record["emissions_kg"]
        # no readable power counters on this machine: CodeCarbon estimates, and the record says how
        assert record["measurement"] and all(mode for mode in record["measurement"].values())
    assert total["total_kg"] == pytest.approx(stages["stage1"]["emissions_kg"] + stages["stage2"]["emissions_kg"])
    lines = [json.loads(line) for line in (project / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines if line.get("type") == "emissions"] == [1, 2]
    status = json.loads((project / "runs" / run_id / "status.json").read_text())
    assert status["emissions_kg"] == pytest.approx(total["total_kg"]) and status["emissions_alerts"] == []

    code, report = script(project, "emissions_report.py", "--run-id", run_id)
    assert code == 0, report
    assert report["total_kg"] == pytest.approx(total["total_kg"]) and report["offset_cost_usd"] > 0
    assert report["equivalencies"]["miles_driven"] == pytest.approx(total["total_kg"] / 0.4)
    assert report["recommendations"] and report["carbon_intensity_g_per_kwh"] > 0
    code, everything = script(project, "emissions_report.py")
    assert code == 0 and everything["runs"] >= 1 and everything["top_emitting_runs"][0]["total_kg"] > 0


@pytest.mark.slow
def test_mlflow_local_store_has_params_metrics_emissions_and_artifacts(project, run):
    run_id = run["run_id"]
    tracked = run["tracking"]["mlflow"]
    assert tracked["status"] == "finished" and tracked["tracking_uri"].startswith("sqlite:///")
    client = mlflow.MlflowClient(tracking_uri=tracked["tracking_uri"])
    logged = client.get_run(tracked["run_id"])
    assert logged.info.run_name == run_id and logged.info.status == "FINISHED"
    assert logged.data.params["lora.rank"] == "8" and logged.data.params["backend"] == "transformers"
    reports = [json.loads(line) for line in (project / "runs" / run_id / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train_loss"] for r in reports if r["stage"] == 1 and r.get("train_loss") is not None]
    history = client.get_metric_history(tracked["run_id"], "stage1_train_loss")
    assert [m.value for m in history] == pytest.approx(train_losses)
    for number in (1, 2):
        assert logged.data.metrics[f"stage{number}_carbon_emissions_kg_co2"] > 0
        assert f"stage{number}_energy_consumed_kwh" in logged.data.metrics
    artifacts = {a.path for a in client.list_artifacts(tracked["run_id"])}
    assert {"run-manifest.json", "emissions"} <= artifacts
    assert client.list_artifacts(tracked["run_id"], "emissions/stage2")[0].path.endswith("_stage2_emissions.csv")

    code, out = script(project, "evaluate.py", "--run-id", run_id, "--stage", "2", "--max-samples", "4", "--no-base")
    assert code == 0 and "tracking_error" not in out, out
    evaluated = client.get_run(tracked["run_id"])
    assert evaluated.data.metrics["stage2_eval_perplexity"] == pytest.approx(out["metrics"]["perplexity"])
    assert client.list_artifacts(tracked["run_id"], "evaluation/stage2")[0].path.endswith("results.json")


@pytest.mark.slow
def test_wandb_offline_run_has_the_metrics(project, run):
    tracked = run["tracking"]["wandb"]
    assert tracked["status"] == "finished" and tracked["mode"] == "offline"
    history = wandb_history(Path(tracked["dir"]))
    logged = [h["stage1/train_loss"] for h in history if "stage1/train_loss" in h]
    reports = [json.loads(line) for line in
               (project / "runs" / run["run_id"] / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([r["train_loss"] for r in reports if r["stage"] == 1 and r.get("train_loss")])
    assert any("stage2/val_loss" in h for h in history)


@pytest.mark.slow
def test_mcp_emissions_report_and_monitor(project, run):
    server = build_server(Settings(output_dir=project.parent))
    report = mcp_ok(server, "get_emissions_report", {"project_path": str(project), "run_id": run["run_id"]})
    assert report["scope"] == "run" and report["report"]["total_kg"] == pytest.approx(run["emissions"]["total_kg"])
    overall = mcp_ok(server, "get_emissions_report", {"project_path": str(project)})
    assert overall["scope"] == "all runs" and overall["report"]["runs"] >= 1
    seen = mcp_ok(server, "monitor_training_progress", {"project_path": str(project), "run_id": run["run_id"],
                                                        "include_emissions": True})
    assert seen["carbon_emissions_kg"] == pytest.approx(run["emissions"]["total_kg"])
    assert seen["emissions_alerts"] == []


@pytest.mark.slow
def test_mlflow_server_on_loopback(project, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        uri = f"http://127.0.0.1:{port}"
        code, out = script(project, "train.py", "--name", "remote", *local("olmo"), *FAST,
                           "--set", "training.backend=transformers", "--set", "training.stage2.iterations=10",
                           "--set", f"mlflow.tracking_uri={uri}", "--set", "wandb.enabled=false")
        assert code == 0, out
        tracked = out["tracking"]["mlflow"]
        assert tracked["status"] == "finished" and tracked["tracking_uri"] == uri
        client = mlflow.MlflowClient(tracking_uri=uri)
        logged = client.get_run(tracked["run_id"])
        assert logged.info.run_name == out["run_id"] and logged.data.metrics["stage2_carbon_emissions_kg_co2"] > 0
        assert "run-manifest.json" in {a.path for a in client.list_artifacts(tracked["run_id"])}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


FAULTY = '''
from codecarbon import OfflineEmissionsTracker


class StopFails(OfflineEmissionsTracker):
    def stop(self):
        super().stop()
        raise OSError("disk full while writing the emissions CSV")


def faulty(config, run_id, stage):
    """Stage 1: the tracker cannot start; stage 2: it starts and fails when stopped."""
    if stage == 1:
        raise RuntimeError("no power readings available")
    return StopFails(country_iso_code="USA", output_dir=str(config.root / "emissions"),
                     output_file=f"{run_id}_stage{stage}_emissions.csv", log_level="error",
                     allow_multiple_runs=True)
'''


@pytest.mark.slow
def test_failures_are_reported_and_training_completes(project):
    (project / "faulty_trackers.py").write_text(FAULTY)
    code, out = script(project, "train.py", "--name", "faulty", *local("olmo"), *FAST, *TRACKED,
                       "--set", "carbon_tracking.tracker_factory=faulty_trackers:faulty",
                       "--set", "mlflow.tracking_uri=http://127.0.0.1:9", "--set", "wandb.enabled=false",
                       env={"PYTHONPATH": str(project)})
    assert code == 0 and out["status"] == "completed", out
    stages = out["emissions"]["stages"]
    assert stages["stage1"] == {"status": "unavailable",
                                "reason": "the tracker failed to start: RuntimeError: no power readings available"}
    assert stages["stage2"]["status"] == "unavailable"
    assert "failed to stop: OSError: disk full" in stages["stage2"]["reason"]
    assert out["emissions"]["status"] == "unavailable" and out["emissions"]["total_kg"] is None
    mlflow_state = out["tracking"]["mlflow"]
    assert mlflow_state["status"] == "failed" and mlflow_state["reason"]
    assert (project / "runs" / out["run_id"] / "stage2" / "adapters" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_corrupt_csv_is_reported_not_fatal(project, run, tmp_path):
    copy = tmp_path / "copy"
    # the project's top-level models/ (weights) is linked, not copied; trainer/models/ is code
    shutil.copytree(project, copy, ignore=lambda folder, names: [n for n in names if n in ("models", ".venv")
                                                                 and Path(folder) == project])
    (copy / "models").symlink_to(project / "models")
    (copy / "emissions" / f"{run['run_id']}_stage2_emissions.csv").write_text("timestamp,emissions\nnow,lots\n")
    code, report = script(copy, "emissions_report.py", "--run-id", run["run_id"])
    assert code == 0, report
    assert report["status"] == "partial" and report["stages"]["stage1"]["status"] == "measured"
    assert "column emissions is not a number" in report["stages"]["stage2"]["reason"]
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(copy / "scripts" / "emissions_dashboard.py"), default_timeout=120).run()
    assert not app.exception
    assert any("column emissions is not a number" in w.value for w in app.warning)


@pytest.mark.slow
def test_monitoring_api_over_loopback(project, run):
    port = free_port()
    server = subprocess.Popen([sys.executable, "scripts/monitor_training.py", "--port", str(port)], cwd=project,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/runs")
        run_id = run["run_id"]
        code, runs = get(f"{base}/runs")
        assert code == 200 and run_id in {r["run_id"] for r in runs["runs"]}
        code, status = get(f"{base}/runs/{run_id}/status")
        assert code == 200 and status["status"] == "completed" and status["emissions_kg"] > 0
        code, metrics = get(f"{base}/runs/{run_id}/metrics?tail=3")
        assert code == 200 and len(metrics["records"]) == 3 and metrics["records"][-1]["type"] == "emissions"
        code, current = get(f"{base}/emissions/{run_id}/current")
        assert code == 200 and current["stage"] == 2 and current["emissions_kg"] > 0 and current["country"]
        code, summary = get(f"{base}/emissions/{run_id}/summary")
        assert code == 200 and summary["total_kg"] == pytest.approx(run["emissions"]["total_kg"])
        code, overall = get(f"{base}/emissions/aggregate")
        assert code == 200 and overall["runs"] >= 1
        code, missing = get(f"{base}/emissions/no-such-run/summary")
        assert code == 404 and "unknown run id 'no-such-run'" in missing["detail"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.slow
def test_dashboard_renders_in_apptest_and_in_chromium(project, run, tmp_path):
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(project / "scripts" / "emissions_dashboard.py"), default_timeout=120).run()
    assert not app.exception
    assert [m.label for m in app.metric] == ["Runs", "Total emissions (kg CO2eq)", "Energy (kWh)",
                                             "Offset cost (USD)"]
    headings = [h.value for h in app.subheader]
    assert {"Runs", "Training curves", "Emissions per run and stage", "Energy breakdown (kWh)",
            "Carbon intensity (g CO2eq per kWh)"} <= set(headings)
    assert len(app.get("vega_lite_chart")) >= 5 and run["run_id"] in app.dataframe[0].value["run"].tolist()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed (CI installs Debian's package)")
    assert chromium, "CI must install chromium"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "scripts/emissions_dashboard.py", "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"],
        cwd=project, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/_stcore/health")
        flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2600", "--virtual-time-budget=30000",
                 "--run-all-compositor-stages-before-draw"]
        url = f"http://127.0.0.1:{port}/"
        # Streamlit draws over a websocket after its script runs; headless Chromium's capture does
        # not wait for that, so take it again until the page has rendered (the first run is slow).
        dom = ""
        for _ in range(15):
            dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
            if "Training curves" in dom and dom.count("vega-embed") >= 5:
                break
            time.sleep(1)
        assert "Training curves" in dom and "Emissions per run and stage" in dom, dom[-2000:]
        assert dom.count("vega-embed") >= 5, "the charts must be drawn in the browser"
        assert run["run_id"] in dom
        shot = tmp_path / "dashboard.png"
        from PIL import Image

        colours = 0
        for _ in range(15):
            subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=180, check=False)
            image = Image.open(shot).convert("RGB")
            colours = len(set(image.resize((350, 650)).getdata()))
            if colours > 200:
                break
        assert image.size == (1400, 2600) and colours > 200, "the screenshot must show a rendered page with charts"
        shutil.copy(shot, Path(os.environ.get("DASHBOARD_SCREENSHOT", tmp_path / "kept.png")))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.mark.slow
def test_dashboard_without_runs(tmp_path_factory):
    from streamlit.testing.v1 import AppTest

    from conftest import render

    project = render(tmp_path_factory.mktemp("empty") / "p")
    app = AppTest.from_file(str(project / "scripts" / "emissions_dashboard.py"), default_timeout=60).run()
    assert not app.exception and "No runs yet" in app.info[0].value
