"""The whole job through MCP alone, by a client that is not ours: tests/raw_client.py speaks
JSON-RPC over stdio from the specification (no mcp SDK) and declares no capabilities. On a
two-stage project with its own data files (a jsonl for stage 1, a parquet for stage 2), it
brings the data in, builds the base model, prepares, configures, trains in the background,
monitors, evaluates, asks the model, exports, reads the emissions, commits, and updates the
project to a newer template tag; no other process is started, and every call answers within
60 s (the long ones through jobs)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from raw_client import RawClient, ToolFailed

from conftest import REPO, UNTRUSTED
from mcp_wrapper import __version__
from test_update import git, release_v020, template  # noqa: F401  (template is a fixture)

pytest.importorskip("torch")
pytest.importorskip("peft")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TASKS = [("Spell the word {} backwards.", lambda w: w[::-1]), ("Write the word {} in capitals.", str.upper)]
WORDS = ("apple", "river", "stone", "cloud", "maple", "tiger", "piano", "candle", "harbor", "meadow", "violet",
         "copper", "lantern", "pepper", "saddle", "thunder", "willow", "canyon", "falcon", "garden", "amber",
         "bridge", "cactus", "desert", "ember", "forest", "glacier", "hollow", "island", "jungle")


def rows(task: int) -> list[dict]:
    prompt, answer = TASKS[task]
    return [{"instruction": prompt.format(w), "output": answer(w), "quality_score": 0.6 + (i % 4) / 10}
            for i, w in enumerate(WORDS)]


@pytest.mark.slow
def test_the_whole_job_through_mcp_alone(tmp_path, template):  # noqa: F811
    root = tmp_path / "work"
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    (inbox / "general.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(0)), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(rows(1)), inbox / "domain.parquet")
    client = RawClient([sys.executable, "-m", "mcp_wrapper", "--template", str(template), "--trust", str(template),
                        "--output-dir", str(root / "projects"), "--allowed-root", str(root)],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=str(tmp_path))
    try:
        found = client.request("server/discover")
        assert found["_meta"]["io.modelcontextprotocol/serverInfo"] == {"name": "olmo-fine-tuning",
                                                                        "version": __version__}
        assert "2026-07-28" in found["supportedVersions"]
        tools = {t["name"] for t in client.request("tools/list")["tools"]}
        assert {"import_data", "set_base_model", "commit_project", "wait_for_job"} <= tools

        generated = client.call("generate_fine_tuning_project", project_name="words", training={
            "num_stages": 2, "backend": "transformers", "save_steps": 10, "eval_steps": 10,
            "stage1": {"iterations": 20, "learning_rate": 3e-3, "warmup_steps": 2},
            "stage2": {"iterations": 10, "learning_rate": 2e-3, "warmup_steps": 1, "replay_ratio": 0.2}})
        project = generated["project_path"]
        assert generated["template_version"] == "v0.1.0"
        at = {"project_path": project}

        one = client.call("import_data", **at, files=[str(inbox / "general.jsonl")], replace_samples=True)
        two = client.call("import_data", **at, files=["../../inbox/domain.parquet"], stage=2, replace_samples=True)
        assert one["validation"]["counts"]["accepted"] == two["validation"]["counts"]["accepted"] == len(WORDS)
        assert two["imported"][0]["path"] == "data/raw/stage2/domain.parquet" and two["unmatched"] == []
        model = client.call("set_base_model", **at, tiny=True)
        assert model["local_path"] == "models/tiny-olmo2"
        prepared = client.call("prepare_dataset", **at)
        assert {k: v["counts"]["rows_read"] for k, v in prepared["stages"].items()} == {"stage1": 30, "stage2": 30}

        run_id = client.call("configure_training_run", **at, run_name="raw",
                             override_params={"training": {"log_steps": 5}})["run_id"]
        started = client.call("start_training", **at, run_id=run_id)
        assert started["status"] in ("running", "completed") and started["estimated_duration_minutes"] >= 1
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            seen = client.call("monitor_training_progress", **at, run_id=run_id)
            if seen["status"] not in ("running", "not_started"):
                break
            assert seen["status"] != "running" or seen["estimated_completion_time"] is not None or \
                seen["current_iteration"] is None
            time.sleep(1)
        assert seen["status"] == "completed", seen

        evaluated = client.call("evaluate_model", **at, run_id=run_id, stage=2, max_samples=4, wait_seconds=0)
        assert evaluated["evaluation_results"]["perplexity"] > 1 and evaluated["forgetting"] is not None
        answer = client.call("generate_text", **at, run_id=run_id, prompt="Spell the word amber backwards.",
                             max_tokens=8)
        assert UNTRUSTED.fullmatch(answer["response"]) and answer["model"]["stage"] == 2
        exported = client.call("export_model", **at, run_id=run_id, stage=2, export_format="adapters")
        assert (Path(exported["export_path"]) / "peft" / "adapter_model.safetensors").is_file()
        emissions = client.call("get_emissions_report", **at, run_id=run_id)
        assert set(emissions["report"]["stages"]) == {"stage1", "stage2"}

        # the tree is committed (runs, models and processed data are ignored), then updated
        with pytest.raises(ToolFailed, match="commit_project"):
            client.call("update_project", **at)  # the imported data and config change are not committed yet
        committed = client.call("commit_project", **at, message="my data and base model")
        assert committed["committed"] and "data/raw/stage2/domain.parquet" in committed["files"]
        assert git(Path(project), "status", "--porcelain") == ""
        release_v020(template)
        updated = client.call("update_project", **at)
        assert (updated["previous_version"], updated["new_version"]) == ("v0.1.0", "v0.2.0")
        assert updated["conflicts"] == [] and "config/fine_tuning_config.yaml" in updated["changed_files"]
        config = (Path(project) / "config" / "fine_tuning_config.yaml").read_text()
        assert 'local_path: "models/tiny-olmo2"' in config and "checkpoint_steps: 10" in config
        raw = Path(project) / "data" / "raw"  # the samples the import replaced stay away: only the user's data
        assert sorted(p.name for p in raw.rglob("*.*")) == ["domain.parquet", "general.jsonl"]
        assert client.call("commit_project", **at, message="template v0.2.0")["committed"]
        assert client.call("monitor_training_progress", **at, run_id=run_id)["status"] == "completed"
    finally:
        code = client.close()
    assert code == 0
    slowest = max(client.durations, key=lambda item: item[1])
    print(f"{len(client.durations)} requests; the slowest: {slowest[0]} {slowest[1]:.1f} s")
