"""A disk that fills up completely while a run trains (issue 13, item 12), on a real full file
system: a small tmpfs mounted over the run's folder (root only; skipped elsewhere, and CI runs
as root). The run must end "failed" with the cause in its status and manifest, monitor must say
so through MCP, the disk's last bytes must not be lost to the reserve, and once space is freed
the run resumes to completion. A disk too full to start on is refused before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import mcp_ok, script
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings

pytest.importorskip("torch")
pytest.importorskip("peft")

SETTINGS = ["--set", "base_model.local_path=models/tiny-llama", "--set", "training.backend=transformers",
            "--set", "training.num_stages=1", "--set", "training.stage1.iterations=200",
            "--set", "training.save_steps=5", "--set", "training.log_steps=5", "--set", "training.eval_steps=100"]


def mount_tmpfs(folder: Path, size: str) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, check=False).returncode == 0


def free_bytes(folder: Path) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def fill(folder: Path, leave: int) -> Path:
    """A file that takes all the free space of `folder`'s disk but `leave` bytes."""
    filler = folder / "filler.bin"
    with filler.open("wb") as handle:
        handle.write(bytes(max(0, free_bytes(folder) - leave)))
    return filler


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from conftest import render

    project = render(tmp_path_factory.mktemp("full") / "p", model_type="llama")
    assert script(project, "make_tiny_model.py", "--no-verify")[0] == 0
    assert script(project, "prepare_dataset.py")[0] == 0
    return project


@pytest.fixture
def full_run(project, request):
    """A configured run whose folder is a 16 MiB tmpfs (its files copied onto it)."""
    code, out = script(project, "configure_run.py", "--name", request.node.name[:40].replace("_", "-"), *SETTINGS)
    assert code == 0, out
    run_dir = project / "runs" / out["run_id"]
    saved = run_dir.with_name(run_dir.name + ".saved")
    shutil.copytree(run_dir, saved)
    if not mount_tmpfs(run_dir, "16m"):
        shutil.rmtree(saved)
        pytest.skip("mounting a tmpfs needs root")
    try:
        shutil.copytree(saved, run_dir, dirs_exist_ok=True)
        yield out["run_id"], run_dir
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], check=False)
        shutil.rmtree(saved, ignore_errors=True)


@pytest.mark.slow
def test_a_disk_that_fills_up_during_training_fails_the_run_with_its_cause(project, full_run):
    run_id, run_dir = full_run
    filler = fill(run_dir, leave=(2 << 20) + (150 << 10))  # the reserve, and a little to train in
    code, out = script(project, "train.py", "--run-id", run_id)
    assert code == 1 and "No space left on device" in out["error"]["message"], out
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "No space left on device" in status["error"]
    manifest = json.loads((run_dir / "run-manifest.json").read_text())
    assert manifest["stages"]["stage1"]["status"] == "failed"
    assert not list(run_dir.glob(".tmp-reserve")), "the reserve is given back"

    server = build_server(Settings(output_dir=project.parent, allowed_roots=[project.parent]))
    seen = mcp_ok(server, "monitor_training_progress", {"project_path": str(project), "run_id": run_id})
    assert seen["status"] == "failed" and "No space left on device" in seen["error"]

    filler.unlink()
    code, out = script(project, "train.py", "--run-id", run_id, "--resume")
    assert code == 0, out
    assert out["stages"]["stage1"]["resumed_from"] > 0 and out["stages"]["stage1"]["iterations"] == 200
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_disk_too_full_for_the_reserve_refuses_to_start(project, full_run):
    run_id, run_dir = full_run
    fill(run_dir, leave=1 << 20)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name not in (".lock",
                                                                                                  "filler.bin")}
    code, out = script(project, "train.py", "--run-id", run_id)
    assert code == 1 and "cannot spare 2 MiB" in out["error"]["message"] and "free some space" in out["error"][
        "message"], out
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name not in (".lock",
                                                                                                 "filler.bin")}
    assert after == before, "a refused start writes nothing"


def test_a_status_file_that_cannot_be_read_is_rewritten_by_the_next_write(project):
    """monitor's advice for an unreadable status.json ('start_training with resume=true rewrites
    it') holds: the trainer's status writes start afresh from garbage."""
    code, out = script(project, "configure_run.py", "--name", "garbage-status", *SETTINGS)
    assert code == 0, out
    path = project / "runs" / out["run_id"] / "status.json"
    write = ("import sys; sys.path.insert(0, '.'); from trainer.config import load_config; "
             "from trainer.runs.training_run_manager import RunManager; "
             "RunManager(load_config('config/fine_tuning_config.yaml')).write_status(sys.argv[1], status='running')")
    for garbage in (b"\x00\xff{", b"[]", b'"running"'):
        path.write_bytes(garbage)
        subprocess.run([sys.executable, "-c", write, out["run_id"]], cwd=project, check=True)
        status = json.loads(path.read_text())
        assert status["status"] == "running" and status["run_id"] == out["run_id"]
