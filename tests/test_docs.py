"""The documents users read name what the server really offers."""

from __future__ import annotations

import re

import anyio
from mcp import Client

from conftest import REPO
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings


def test_mcp_usage_documents_every_tool_and_resource(tmp_path):
    async def offered():
        async with Client(build_server(Settings(output_dir=tmp_path))) as client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
            return tools, templates

    tools, templates = anyio.run(offered)
    text = (REPO / "MCP-USAGE.md").read_text()
    assert set(re.findall(r"^### (\w+)$", text, flags=re.MULTILINE)) == tools
    assert all(f"`{template}`" in text for template in templates), templates
    for section in re.split(r"^### ", text, flags=re.MULTILINE)[1:]:
        assert "```json" in section, f"{section.splitlines()[0]} has no example"


def test_the_release_workflow_builds_tests_and_publishes_on_a_tag():
    import yaml

    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "release.yml").read_text())
    assert workflow[True]["push"]["tags"] == ["v*.*.*"]  # YAML reads the key `on` as True
    jobs = workflow["jobs"]
    assert list(jobs) == ["build", "test", "publish"]
    assert jobs["test"]["needs"] == "build" and jobs["publish"]["needs"] == "test"
    steps = " ".join(str(step.get("run", "")) for step in jobs["build"]["steps"] + jobs["test"]["steps"])
    assert "python -m build" in steps and "bash .ci/run" in steps
    assert any(step.get("uses", "").startswith("pypa/gh-action-pypi-publish") for step in jobs["publish"]["steps"])
    assert all(step["with"]["fetch-depth"] == 0 for job in ("build", "test")
               for step in jobs[job]["steps"] if step.get("uses", "").startswith("actions/checkout"))
