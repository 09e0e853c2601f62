"""The examples run as a user runs them: each starts the server over stdio with the official
MCP SDK client and takes its scenario from generation to export on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, UNTRUSTED

pytest.importorskip("torch")
pytest.importorskip("peft")

EXAMPLES = {"health_narrative_example.py": ("health-narrative-olmo", "olmo", 1),
            "security_analysis_example.py": ("security-analysis-llama", "llama", 2),
            "custom_model_example.py": ("custom-model-docs-qa", "custom", 1)}


def run_example(name: str, output: Path, *flags: str, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "examples" / name), "--output-dir", str(output),
                           "--iterations", "10", "--json", *flags], capture_output=True, text=True, timeout=1200,
                          cwd=output.parent, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_an_example_runs_its_scenario_end_to_end(name, tmp_path):
    project_name, model_type, stages = EXAMPLES[name]
    summary = run_example(name, tmp_path / "projects", "--server", f"{sys.executable} -m mcp_wrapper")
    project = Path(summary["project_path"])
    assert project == tmp_path / "projects" / project_name
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert answers["model_type"] == model_type and answers["num_stages"] == stages
    manifest = json.loads((project / "runs" / summary["run_id"] / "run-manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"].values()] == ["completed"] * stages
    assert set(summary["rows"]) == {f"stage{n}" for n in range(1, stages + 1)} and min(summary["rows"].values()) > 10
    assert summary["evaluation"]["rows"] > 0 and summary["evaluation"]["perplexity"] > 1
    assert summary["answers"] and all(UNTRUSTED.fullmatch(a) for a in summary["answers"].values())
    exported = Path(summary["export_path"])
    assert (exported / "peft" / "adapter_model.safetensors").is_file()
    assert (exported / "mlx" / "adapters.safetensors").is_file()
