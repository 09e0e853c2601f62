"""What an agent with nothing but MCP needs besides training: bring its data files in, give
the project a base model, commit the project for update_project, and long calls that answer
within a minute with a job to poll (wait_for_job, cancel_job) that outlives a server restart."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import mcp_call, mcp_error, mcp_ok, snapshot
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings

pytest.importorskip("torch")

ROWS = [{"instruction": f"Repeat the word {w}.", "output": w, "quality_score": 0.5 + i / 40}
        for i, w in enumerate(("apple", "river", "stone", "cloud", "maple", "tiger", "piano", "candle", "harbor",
                               "meadow", "violet", "copper", "lantern", "pepper", "saddle", "thunder", "willow",
                               "canyon", "falcon", "garden"))]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("workflow")
    settings = Settings(output_dir=root / "projects", allowed_roots=[root])
    server = build_server(settings)
    project = Path(mcp_ok(server, "generate_fine_tuning_project",
                          {"project_name": "agent", "training": {"num_stages": 2}})["project_path"])
    return {"root": root, "server": server, "settings": settings, "project": project}


def call(env, tool: str, **arguments) -> dict:
    return mcp_ok(env["server"], tool, {"project_path": str(env["project"]), **arguments})


def error(env, tool: str, **arguments) -> str:
    return mcp_error(env["server"], tool, {"project_path": str(env["project"]), **arguments})


def test_import_data_validates_first_and_loses_nothing(env):
    project, inbox = env["project"], env["root"] / "inbox"
    raw = project / "data" / "raw"
    before = snapshot(raw)
    # a bad row anywhere: nothing is copied, the samples stay, the message names file, line and field
    good = jsonl(inbox / "words.jsonl", ROWS)
    bad = jsonl(inbox / "broken.jsonl", ROWS[:3] + [{"instruction": "no answer"}])
    text = error(env, "import_data", files=[str(good), str(bad)])
    assert "nothing was imported" in text and "broken.jsonl" in text and "line 4" in text and "output" in text
    assert snapshot(raw) == before
    # outside the roots: refused before anything is read
    assert "outside" in error(env, "import_data", files=["/etc/hostname"])

    out = call(env, "import_data", files=[str(good)], replace_samples=True)
    assert out["imported"] == [{"source": str(good), "path": "data/raw/words.jsonl"}]
    assert out["removed_samples"] == ["data/raw/sample_dataset.jsonl"] and out["unmatched"] == []
    assert out["validation"]["counts"]["accepted"] == len(ROWS)
    assert (raw / "words.jsonl").read_bytes() == good.read_bytes()
    assert not (raw / "sample_dataset.jsonl").exists() and (raw / "stage2" / "sample_domain.jsonl").exists()
    assert not [p for p in raw.iterdir() if p.name.startswith(".tmp-")]
    # the same name again: refused unless overwrite, and then replaced
    assert "already exists" in error(env, "import_data", files=[str(good)])
    jsonl(good, ROWS[:12])
    assert call(env, "import_data", files=[str(good)], overwrite=True)["validation"]["counts"]["accepted"] == 12

    # stage 2, a relative path (the project's), and preparation picks both stages up
    jsonl(project / "incoming" / "domain.jsonl", ROWS[5:])
    two = call(env, "import_data", files=["incoming/domain.jsonl"], stage=2, replace_samples=True)
    assert two["imported"][0]["path"] == "data/raw/stage2/domain.jsonl"
    assert two["removed_samples"] == ["data/raw/stage2/sample_domain.jsonl"]
    prepared = call(env, "prepare_dataset")
    assert prepared["stages"]["stage1"]["counts"]["rows_read"] == 12
    assert prepared["stages"]["stage2"]["counts"]["rows_read"] == len(ROWS) - 5


def test_set_base_model_builds_or_brings_a_model_and_points_the_config_at_it(env):
    project = env["project"]
    config = project / "config" / "fine_tuning_config.yaml"
    before = config.read_text()
    out = call(env, "set_base_model", tiny=True, wait_seconds=0)  # the job, polled to its end
    assert out["kind"] == "tiny" and out["local_path"] == "models/tiny-olmo2"
    assert out["details"]["verified"]["transformers"] is True
    after = config.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert len(before.splitlines()) == len(after.splitlines())
    assert changed == [("  local_path: null", '  local_path: "models/tiny-olmo2"')]  # comments and order kept

    # a model folder elsewhere in the roots is copied into models/, and an existing name is never replaced
    elsewhere = env["root"] / "shelf" / "my-model"
    shutil.copytree(project / "models" / "tiny-olmo2", elsewhere)
    brought = call(env, "set_base_model", source=str(elsewhere))
    assert brought["kind"] == "directory" and brought["local_path"] == "models/my-model"
    assert (project / "models" / "my-model" / "config.json").is_file()
    assert "already exists" in error(env, "set_base_model", source=str(elsewhere))
    assert "not a Hugging Face model folder" in error(env, "set_base_model", source="data")
    assert "outside" in error(env, "set_base_model", source="/usr")
    assert "one of them" in error(env, "set_base_model")
    call(env, "set_base_model", source="models/tiny-olmo2")  # inside the project: pointed at, not copied
    assert 'local_path: "models/tiny-olmo2"' in config.read_text()

    # the tiny model again replaces the one it built; a folder of the user's under its name, or one
    # with a link inside, is never written into
    assert call(env, "set_base_model", tiny=True)["local_path"] == "models/tiny-olmo2"
    assert not list((project / "models").glob(".tmp-*")), "built beside, moved in"
    mine = project / "models" / "tiny-llama"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "llama", "ours": true}\n')
    outside = env["root"] / "outside-config.json"
    outside.write_text('{"keep": true}\n')
    linked = project / "models" / "tiny-mistral"
    shutil.copytree(project / "models" / "tiny-olmo2", linked)
    (linked / "config.json").unlink()
    (linked / "config.json").symlink_to(outside)
    for architecture in ("llama", "mistral"):
        assert "is never replaced" in error(env, "set_base_model", tiny=True, architecture=architecture)
    assert (mine / "config.json").read_text() == '{"model_type": "llama", "ours": true}\n'
    assert outside.read_text() == '{"keep": true}\n'


def test_long_calls_answer_with_a_job_that_survives_a_restart(env):
    project = str(env["project"])
    started = mcp_call(env["server"], "prepare_dataset", {"project_path": project, "wait_seconds": 0})
    first = started.structured_content
    assert not started.is_error and first["job_status"] == "running" and first["stages"] is None
    fresh = build_server(env["settings"])  # a restarted server finds the job from its files
    done = mcp_ok(fresh, "wait_for_job", {"project_path": project, "job_id": first["job_id"], "wait_seconds": 50})
    assert done["status"] == "completed" and done["tool"] == "prepare_dataset"
    assert set(done["result"]["stages"]) == {"stage1", "stage2"}
    assert (env["project"] / ".tmp" / "jobs" / first["job_id"] / "job.json").is_file()

    # a failing job's error arrives through wait_for_job in the project's words
    failing = mcp_call(env["server"], "evaluate_model", {"project_path": project, "run_id": "nope", "stage": 1})
    assert failing.is_error and "unknown run id" in failing.content[0].text
    # a job can be stopped; unknown and malformed ids are refused with what exists
    job = mcp_call(env["server"], "prepare_dataset", {"project_path": project, "wait_seconds": 0}).structured_content
    cancelled = mcp_ok(env["server"], "cancel_job", {"project_path": project, "job_id": job["job_id"]})
    assert cancelled["status"] in ("cancelled", "completed")  # a fast machine may finish first
    text = mcp_error(env["server"], "wait_for_job", {"project_path": project, "job_id": "prepare_dataset-20260101-"
                                                                                        "000000-abcdef"})
    assert "unknown job" in text and first["job_id"] in text
    assert "not a job id" in mcp_error(env["server"], "wait_for_job", {"project_path": project,
                                                                       "job_id": "../../etc"})


def test_commit_project_leaves_a_clean_tree(env):
    project = env["project"]
    (project / "notes.md").write_text("my notes\n")
    out = call(env, "commit_project", message="my data and model")
    assert out["committed"] and "notes.md" in out["files"]
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert status == ""
    log = subprocess.run(["git", "log", "-1", "--format=%s"], cwd=project, capture_output=True, text=True).stdout
    assert log.strip() == "my data and model"
    again = call(env, "commit_project")
    assert again["committed"] is False and again["commit"] == out["commit"]
    # runs, models, processed data and jobs are the project's outputs: never committed
    tracked = subprocess.run(["git", "ls-files"], cwd=project, capture_output=True, text=True).stdout.splitlines()
    assert not [f for f in tracked if f.startswith(("models/", "runs/2", ".tmp/jobs", "data/processed/stage"))]
    # (update_project then merges a newer template tag: test_mcp_raw_client does the whole job that way)


def test_new_tools_hold_the_roots_and_signal_only_their_own_jobs(env):
    import os
    import signal
    import sys

    project, outside = env["project"], env["root"].parent / f"{env['root'].name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (env["root"] / "inbox").mkdir(exist_ok=True)
    link = env["root"] / "inbox" / "innocent.jsonl"
    link.unlink(missing_ok=True)
    link.symlink_to(outside / "secret.jsonl")  # inside the roots by name, outside by target
    before = snapshot(project / "data")
    assert "outside" in error(env, "import_data", files=[str(link)])
    assert snapshot(project / "data") == before
    shelf = env["root"] / "shelf" / "linked-model"
    shutil.copytree(project / "models" / "tiny-olmo2", shelf)
    (shelf / "extra.bin").symlink_to(outside / "secret.jsonl")
    assert "outside" in error(env, "set_base_model", source=str(shelf))
    assert not (project / "models" / "linked-model").exists()
    assert "name" in error(env, "set_base_model", source=str(shelf), name="../escape")

    # a job record that names another process (here: a sleeping child of this test) is never signalled
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        stat = Path(f"/proc/{victim.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        forged = project / ".tmp" / "jobs" / "export_model-20260101-000000-abcdef"
        forged.mkdir(parents=True)
        (forged / "job.json").write_text(json.dumps({
            "job_id": forged.name, "tool": "export_model", "script": "export.py", "pid": victim.pid,
            "started": stat, "started_at": "2026-01-01T00:00:00+00:00", "timeout_s": 60}))
        mcp_call(env["server"], "cancel_job", {"project_path": str(project), "job_id": forged.name})
        assert victim.poll() is None, "a process that is not the job's own script was signalled"
    finally:
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
