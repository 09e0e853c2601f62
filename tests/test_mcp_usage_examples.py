"""MCP-USAGE.md's examples are run, in the document's order, against a real server: every
request must name only the tool's own arguments and succeed, and every field the example's
response shows must be in the real response (nested objects included). A wrong example fails.

The examples' places are mapped onto this test's folders (/home/me/... -> tmp), and the ids
they show (a run, a job) onto the ones the calls before them returned."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from conftest import REPO, mcp_call, mcp_ok
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings
from test_update import release_v020, template  # noqa: F401  (template is a fixture)

pytest.importorskip("torch")
pytest.importorskip("peft")

EXAMPLE = re.compile(r"<!-- example: (\w+) -->\s*```json\n(.*?)```\s*```json\n(.*?)```", re.DOTALL)
RUN_ID, LONG_RUN_ID = "first-try-20261203-101500", "long-20261203-101730"
JOB_ID, CANCEL_JOB_ID = "evaluate_model-20261203-101620-3fa9c2", "export_model-20261203-101840-9b1d4e"


def examples() -> list[tuple[str, str, str]]:
    return EXAMPLE.findall((REPO / "MCP-USAGE.md").read_text(encoding="utf-8"))


def shown_fields(shown: Any, real: Any, where: str) -> None:
    """Every key the example shows is in the real answer ("..." stands for more, left out)."""
    if not isinstance(shown, dict):
        return
    assert isinstance(real, dict), f"{where}: the example shows an object, the server answered {real!r}"
    for key, value in shown.items():
        if key == "...":
            continue
        assert key in real, f"{where}.{key} is in the example but not in the answer ({sorted(real)})"
        shown_fields(value, real[key], f"{where}.{key}")


def rows(topic: str, count: int) -> str:
    return "".join(json.dumps({"instruction": f"Summarize {topic} note {i}.", "input": f"{topic} finding {i}",
                               "output": f"{topic} summary {i}", "quality_score": 0.5 + (i % 5) / 10}) + "\n"
                   for i in range(count))


@pytest.mark.slow
def test_every_example_of_mcp_usage_runs(tmp_path, template):  # noqa: F811
    assert len(examples()) >= 17, "every tool has a runnable example"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "narratives.jsonl").write_text(rows("narrative", 40))
    (tmp_path / "data" / "cardiology.jsonl").write_text(rows("cardiology", 30))
    server = build_server(Settings(template=str(template), output_dir=tmp_path / "fine-tuning-projects",
                                   allowed_roots=[tmp_path], trusted_templates=[str(template)]))

    async def schemas():
        async with Client(server) as client:
            return {tool.name: tool.input_schema for tool in (await client.list_tools()).tools}

    inputs = anyio.run(schemas)
    ids: dict[str, str] = {}
    project = None
    recorded = []
    for tool, request, response in examples():
        # what happened before the call in the document's story
        if tool == "monitor_training_progress":  # the example shows a completed run
            deadline = time.monotonic() + 600
            while mcp_ok(server, tool, {"project_path": project, "run_id": ids[RUN_ID]})["status"] == "running":
                assert time.monotonic() < deadline
                time.sleep(1)
        if tool == "cancel_training":  # a long run is running
            ids[LONG_RUN_ID] = mcp_ok(server, "configure_training_run", {
                "project_path": project, "run_name": "long",
                "override_params": {"training": {"stage1": {"iterations": 100000}, "save_steps": 2}}})["run_id"]
            mcp_ok(server, "start_training", {"project_path": project, "run_id": ids[LONG_RUN_ID]})
            time.sleep(3)
        if tool == "cancel_job":  # an export is under way
            started = mcp_call(server, "export_model", {"project_path": project, "run_id": ids[RUN_ID], "stage": 2,
                                                        "export_format": "mlx", "wait_seconds": 0})
            ids[CANCEL_JOB_ID] = started.structured_content["job_id"]
        if tool == "update_project":  # the template's maintainers released v0.2.0
            release_v020(template)
        text = request.replace("/home/me", str(tmp_path))
        for shown, real in ids.items():
            text = text.replace(shown, real)
        arguments = json.loads(text)
        unknown = set(arguments) - set(inputs[tool]["properties"])
        assert not unknown, f"the {tool} example passes arguments the tool does not take: {unknown}"
        result = mcp_call(server, tool, arguments)
        assert not result.is_error, f"the {tool} example fails: {result.content[0].text}"
        out = result.structured_content
        recorded.append({"tool": tool, "arguments": arguments, "result": out})
        shown_fields(json.loads(response), out, tool)
        if tool == "update_project":  # the samples import_data replaced are not brought back
            raw = Path(project) / "data" / "raw"
            assert sorted(p.name for p in raw.rglob("*.jsonl")) == ["cardiology.jsonl", "narratives.jsonl"]
        if tool == "generate_fine_tuning_project":
            project = out["project_path"]
        if tool == "configure_training_run" and arguments["run_name"] == "first-try":
            ids[RUN_ID] = out["run_id"]
        if out.get("job_id") and out.get("job_status") == "running":
            ids[JOB_ID] = out["job_id"]
    if os.environ.get("OLMO_RECORD_EXAMPLES"):  # to refresh the document's answers by hand
        Path(os.environ["OLMO_RECORD_EXAMPLES"]).write_text(json.dumps(recorded, indent=1, default=str))
