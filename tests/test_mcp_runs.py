"""Training driven through the MCP tools (in memory): start in the background and monitor
to completion, wait with progress notifications, cancel with SIGTERM or SIGKILL, refuse a
second start, and a new server instance that finds a running run from its files."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from conftest import mcp_error, mcp_ok, unwrap
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings

pytest.importorskip("torch")
pytest.importorskip("peft")

QUICK = {"base_model": {"local_path": "models/tiny-olmo2"},
         "training": {"backend": "transformers", "stage1": {"iterations": 30, "learning_rate": 3e-3},
                      "stage2": {"iterations": 20}, "save_steps": 10, "log_steps": 5}}
LONG = {"base_model": {"local_path": "models/tiny-olmo2"},
        "training": {"backend": "transformers", "num_stages": 1, "stage1": {"iterations": 100000},
                     "save_steps": 20, "log_steps": 5, "eval_steps": 100000}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mcp-runs")
    settings = Settings(output_dir=root)
    server = build_server(settings)
    project = mcp_ok(server, "generate_fine_tuning_project",
                     {"project_name": "driven", "training": {"num_stages": 2}})["project_path"]
    subprocess.run([sys.executable, "scripts/make_tiny_model.py", "--no-verify", "--json"], cwd=project, check=True,
                   capture_output=True)
    prepared = mcp_ok(server, "prepare_dataset", {"project_path": project})
    assert set(prepared["stages"]) == {"stage1", "stage2"}
    return {"server": server, "settings": settings, "project": project}


def configure(env, name: str, params: dict) -> str:
    return mcp_ok(env["server"], "configure_training_run", {"project_path": env["project"], "run_name": name,
                                                            "override_params": params})["run_id"]


def monitor(env, run_id: str, server=None, **extra) -> dict:
    return mcp_ok(server or env["server"], "monitor_training_progress",
                  {"project_path": env["project"], "run_id": run_id, **extra})


def wait(env, run_id: str, done, timeout: float = 300, server=None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = monitor(env, run_id, server)
        if done(seen):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not get there: {seen}")


@pytest.mark.slow
def test_start_in_the_background_and_monitor_to_completion(env):
    run_id = configure(env, "background", QUICK)
    started = time.monotonic()
    out = mcp_ok(env["server"], "start_training", {"project_path": env["project"], "run_id": run_id})
    assert time.monotonic() - started < 60, "async start must not wait for training"
    assert out["training_started"] and out["pid"] > 0 and out["log_file"].endswith("train-process.log")
    assert run_id in out["monitor_command"]
    # the project's first run: the estimate comes from its own first iteration
    assert isinstance(out["estimated_duration_minutes"], int) and out["estimated_duration_minutes"] >= 1
    running = monitor(env, run_id)
    assert running["status"] != "running" or running["estimated_completion_time"] is not None
    final = wait(env, run_id, lambda s: s["status"] in ("completed", "failed"))
    assert final["status"] == "completed", final
    assert final["progress_percentage"] == 100.0 and final["process_alive"] is False
    assert final["metrics"]["train_loss"] > 0 and final["metrics"]["tokens_per_second"] > 0
    assert final["metrics"]["val_loss"] > 0 and final["current_stage"] == 2
    with_log = monitor(env, run_id, include_log=True, include_emissions=True)
    assert "stage" in unwrap(with_log["log_tail"]) and "stage 2" in with_log["log_tail"]
    assert with_log["carbon_emissions_kg"] > 0 and with_log["emissions_alerts"] == []  # CodeCarbon, per stage
    runs = {r["run_id"]: r for r in mcp_ok(env["server"], "list_runs", {"project_path": env["project"]})["runs"]}
    assert runs[run_id]["status"] == "completed"

    async def resources():
        async with Client(env["server"]) as client:
            manifest = await client.read_resource(f"runs://driven/{run_id}/manifest")
            log = await client.read_resource(f"runs://driven/{run_id}/log")
            return manifest.contents[0].text, log.contents[0].text

    manifest, log = anyio.run(resources)
    assert '"schema_version": "2.0"' in manifest and "<<<untrusted-text" in log

    evaluated = mcp_ok(env["server"], "evaluate_model", {"project_path": env["project"], "run_id": run_id,
                                                         "stage": 2, "max_samples": 4})
    assert evaluated["evaluation_results"]["rows"] == 4 and evaluated["evaluation_results"]["perplexity"] > 1
    assert set(evaluated["thresholds"]["checks"]) == {"stage2", "sequential"}
    assert evaluated["forgetting"]["stage1_model"]["rows"] == 4 and evaluated["base_results"]["perplexity"] > 1
    assert Path(evaluated["results_file"]).is_file() and Path(evaluated["samples_file"]).is_file()
    exported = mcp_ok(env["server"], "export_model", {"project_path": env["project"], "run_id": run_id, "stage": 2,
                                                       "export_format": "huggingface", "export_path": "exports/mine"})
    assert exported["success"] and exported["export_path"] == str(Path(env["project"]) / "exports" / "mine")
    assert exported["merged"] and exported["model_size_mb"] > 0 and "config.json" in exported["files"]
    assert "from_pretrained" in exported["usage_instructions"] and exported["huggingface_url"] is None
    refused = mcp_error(env["server"], "export_model", {"project_path": env["project"], "run_id": run_id, "stage": 2,
                                                        "export_format": "huggingface", "export_path": "exports/mine"})
    assert "already exists; pass overwrite" in refused
    outside = mcp_error(env["server"], "export_model", {"project_path": env["project"], "run_id": run_id, "stage": 2,
                                                        "export_format": "adapters", "export_path": "/etc/exported"})
    assert "export_path" in outside and "outside" in outside
    assert not Path("/etc/exported").exists()
    # a second project run can now estimate its duration from this one
    second = configure(env, "estimated", QUICK)
    out = mcp_ok(env["server"], "start_training", {"project_path": env["project"], "run_id": second})
    assert out["estimated_duration_minutes"] >= 1
    wait(env, second, lambda s: s["status"] == "completed")


@pytest.mark.slow
def test_sync_mode_reports_progress(env):
    run_id = configure(env, "sync", QUICK)
    seen: list[tuple[float, float, str]] = []

    async def go():
        async def progress(value, total, message):
            seen.append((value, total, message))

        async with Client(env["server"]) as client:
            return await client.call_tool("start_training", {"project_path": env["project"], "run_id": run_id,
                                                             "async_mode": False}, progress_callback=progress)

    result = anyio.run(go)
    assert not result.is_error, result.content[0].text
    out = result.structured_content
    assert out["status"] == "completed" and out["result"]["stages"]["stage2"]["iterations"] == 20
    assert seen and all(total == 100 for _, total, _ in seen)
    values = [value for value, _, _ in seen]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), f"progress must strictly increase: {values}"
    assert any("stage 1 iteration" in m for _, _, m in seen) and any("stage 2 iteration" in m for _, _, m in seen)


@pytest.mark.slow
def test_cancel_checkpoints_and_a_second_start_is_refused(env):
    run_id = configure(env, "cancel-me", LONG)
    mcp_ok(env["server"], "start_training", {"project_path": env["project"], "run_id": run_id})
    wait(env, run_id, lambda s: (s["current_iteration"] or 0) >= 25)
    text = mcp_error(env["server"], "start_training", {"project_path": env["project"], "run_id": run_id})
    assert "already running" in text

    # a new server instance (the old one restarted) finds the run from its files
    fresh = build_server(env["settings"])
    seen = monitor(env, run_id, server=fresh)
    assert seen["status"] == "running" and seen["process_alive"] is True
    out = mcp_ok(fresh, "cancel_training", {"project_path": env["project"], "run_id": run_id})
    assert out["signal"] == "SIGTERM" and out["status"] == "cancelled"
    assert out["last_checkpoint_iteration"] >= 20
    stopped = monitor(env, run_id)
    assert stopped["status"] == "cancelled"
    # the status shows the iteration the checkpoint holds, where a resume starts
    assert stopped["current_iteration"] == out["last_checkpoint_iteration"]
    again = mcp_ok(env["server"], "cancel_training", {"project_path": env["project"], "run_id": run_id})
    assert again["signal"] == "none" and "not running" in again["message"]


@pytest.mark.slow
def test_cancel_escalates_to_sigkill_after_the_grace_period(env):
    run_id = configure(env, "kill-me", LONG)
    out = mcp_ok(env["server"], "start_training", {"project_path": env["project"], "run_id": run_id})
    wait(env, run_id, lambda s: (s["current_iteration"] or 0) >= 5)
    result = mcp_ok(env["server"], "cancel_training",
                    {"project_path": env["project"], "run_id": run_id, "grace_seconds": 0})
    assert result["signal"] == "SIGTERM then SIGKILL" and result["status"] == "cancelled"
    seen = monitor(env, run_id)
    assert seen["status"] == "cancelled" and seen["process_alive"] is False
    assert "killed after 0 s" in seen["error"]
    assert not Path(f"/proc/{out['pid']}").exists() or "zombie" not in Path(f"/proc/{out['pid']}/status").read_text()


@pytest.mark.slow
def test_a_refused_start_is_reported(env):
    run_id = configure(env, "q4", {"base_model": {"quantization": "q4"}, "training": {"backend": "transformers"}})
    text = mcp_error(env["server"], "start_training", {"project_path": env["project"], "run_id": run_id})
    assert "training did not start" in text and "needs CUDA" in text
    assert monitor(env, run_id)["status"] == "not_started"
