"""End to end over stdio: the real SDK client starts the real server as a subprocess
(`python -m mcp_wrapper`), generates a two-stage project on a tiny OLMo-2 model, prepares,
configures, trains in the background to completion, evaluates, lists runs, and cancels a
second run mid-training. Every byte the server wrote to stdout must be JSON-RPC."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters, types

from conftest import REPO

pytest.importorskip("torch")
pytest.importorskip("peft")


@pytest.mark.slow
def test_full_lifecycle_over_stdio(tmp_path):
    record = tmp_path / "server-stdout.bin"
    root = tmp_path / "projects"
    params = StdioServerParameters(
        command=sys.executable,
        args=[str(REPO / "tests" / "stdio_recorder.py"), str(record), sys.executable, "-m", "mcp_wrapper",
              "--output-dir", str(root)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(tmp_path),
    )

    async def call(client: Client, tool: str, arguments: dict) -> dict:
        result = await client.call_tool(tool, arguments)
        assert not result.is_error, result.content[0].text
        return result.structured_content

    async def lifecycle() -> dict:
        async with Client(params, read_timeout_seconds=600) as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            assert {"generate_fine_tuning_project", "start_training", "cancel_training"} <= tools
            project = (await call(client, "generate_fine_tuning_project", {
                "project_name": "stdio-e2e", "base_model": {"type": "olmo", "local_path": "models/tiny-olmo2"},
                "training": {"num_stages": 2, "stage1": {"iterations": 20, "learning_rate": 3e-3, "warmup_steps": 2},
                             "stage2": {"iterations": 10}, "backend": "transformers"}}))["project_path"]
            # the tiny model is built by the project's own script (no hub access)
            subprocess.run([sys.executable, "scripts/make_tiny_model.py", "--no-verify", "--json"], cwd=project,
                           check=True, capture_output=True)
            await call(client, "prepare_dataset", {"project_path": project})
            run_id = (await call(client, "configure_training_run",
                                 {"project_path": project, "run_name": "e2e"}))["run_id"]
            await call(client, "start_training", {"project_path": project, "run_id": run_id})
            deadline = time.monotonic() + 300
            while True:
                seen = await call(client, "monitor_training_progress", {"project_path": project, "run_id": run_id})
                if seen["status"] != "running" and seen["status"] != "not_started" or time.monotonic() > deadline:
                    break
                await anyio.sleep(0.3)
            assert seen["status"] == "completed", seen
            evaluated = await call(client, "evaluate_model", {"project_path": project, "run_id": run_id, "stage": 1,
                                                              "max_samples": 3, "include_base": False})
            assert evaluated["evaluation_results"]["rows"] == 3 and evaluated["base_results"] is None
            exported = await call(client, "export_model", {"project_path": project, "run_id": run_id, "stage": 2,
                                                           "export_format": "adapters"})
            assert {"peft/adapter_model.safetensors", "mlx/adapters.safetensors"} <= set(exported["files"])
            second = (await call(client, "configure_training_run", {
                "project_path": project, "run_name": "long",
                "override_params": {"training": {"num_stages": 1, "stage1": {"iterations": 100000}}}}))["run_id"]
            await call(client, "start_training", {"project_path": project, "run_id": second})
            while (await call(client, "monitor_training_progress",
                              {"project_path": project, "run_id": second}))["current_iteration"] in (None, 0):
                await anyio.sleep(0.2)
            cancelled = await call(client, "cancel_training", {"project_path": project, "run_id": second})
            runs = await call(client, "list_runs", {"project_path": project})
            return {"project": project, "runs": runs, "cancelled": cancelled, "run_id": run_id}

    out = anyio.run(lifecycle)
    statuses = {run["run_id"]: run["status"] for run in out["runs"]["runs"]}
    assert statuses[out["run_id"]] == "completed"
    assert out["cancelled"]["status"] == "cancelled" and out["cancelled"]["signal"] == "SIGTERM"
    assert Path(out["project"], "runs", out["run_id"], "stage2", "adapters", "adapter_model.safetensors").is_file()

    lines = record.read_bytes().split(b"\n")
    assert lines[-1] == b"", "the server's stdout must end with a complete message"
    messages = [types.jsonrpc_message_adapter.validate_json(line) for line in lines[:-1]]
    assert len(messages) > 20
