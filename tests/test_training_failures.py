"""Training when things go wrong: kill -9 and resume, a half-written checkpoint, SIGTERM,
a second start of a running run, and bad requests, each with a clear error and the run's
files left intact."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import render, script, snapshot

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx_lm")

LOCAL = ["--set", "base_model.local_path=models/tiny-llama"]
LONG = ["--set", "training.stage1.iterations=300", "--set", "training.stage1.learning_rate=3e-3",
        "--set", "training.save_steps=10", "--set", "training.log_steps=10", "--set", "training.eval_steps=100"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = render(tmp_path_factory.mktemp("failures") / "p", model_type="llama", num_stages=2)
    assert script(project, "make_tiny_model.py", "--no-verify")[0] == 0
    assert script(project, "prepare_dataset.py")[0] == 0
    return project


def run_files(project: Path, run_id: str) -> dict[str, str]:
    """The run's files but the lock, whose holder line every lock attempt rewrites."""
    return {k: v for k, v in snapshot(project / "runs" / run_id).items() if k != ".lock"}


def configure(project: Path, name: str, *extra: str) -> str:
    code, out = script(project, "configure_run.py", "--name", name, *LOCAL, *extra)
    assert code == 0, out
    return out["run_id"]


def start(project: Path, run_id: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "scripts/train.py", "--run-id", run_id, "--json", *extra], cwd=project,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)


def complete_checkpoints(project: Path, run_id: str, stage: int = 1) -> list[int]:
    folder = project / "runs" / run_id / f"stage{stage}" / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("iter-*") if (p / "checkpoint.json").is_file())


def wait_for(condition, timeout: float = 180.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def kill_9_after(project: Path, run_id: str, iteration: int, stage: int = 1) -> list[int]:
    """Train the run in a child, kill -9 it once stage `stage` has a checkpoint at `iteration` or
    later; returns the stage's complete checkpoints."""
    proc = start(project, run_id)
    wait_for(lambda: [i for i in complete_checkpoints(project, run_id, stage) if i >= iteration],
             what=f"a stage-{stage} checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return complete_checkpoints(project, run_id, stage)


def final(proc: subprocess.Popen) -> tuple[int, dict]:
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_kill_9_then_resume_matches_an_uninterrupted_run(project, backend):
    settings = [*LONG, "--set", f"training.backend={backend}", "--set", "training.num_stages=1"]
    reference = script(project, "train.py", "--name", f"ref-{backend}", *LOCAL, *settings)[1]["stages"]["stage1"]

    run_id = configure(project, f"killed-{backend}", *settings)
    done = kill_9_after(project, run_id, 30)
    assert done and max(done) < 300, "the kill came after the end; nothing was tested"
    code, status = script(project, "status.py", "--run-id", run_id)
    assert status["status"] == "failed" and status["process_alive"] is False and "--resume" in status["error"]

    # a checkpoint write that was killed half-way: a temp directory, and a newer
    # checkpoint directory whose optimizer file was cut short
    folder = project / "runs" / run_id / "stage1" / "checkpoints"
    last = max(done)
    half = folder / f".tmp-iter-{last + 10:07d}-99999"
    shutil.copytree(folder / f"iter-{last:07d}", half)
    truncated = folder / f"iter-{last + 10:07d}"
    shutil.copytree(folder / f"iter-{last:07d}", truncated)
    index = json.loads((truncated / "checkpoint.json").read_text())
    (truncated / "checkpoint.json").write_text(json.dumps({**index, "iteration": last + 10}))
    optimizer = next(p for p in truncated.iterdir() if p.name.startswith("optimizer"))
    optimizer.write_bytes(optimizer.read_bytes()[:100])

    code, out = script(project, "train.py", "--run-id", run_id, "--resume")
    assert code == 0, out
    resumed = out["stages"]["stage1"]
    assert resumed["resumed_from"] == last, "the half-written checkpoints must be ignored"
    assert resumed["iterations"] == 300
    assert not half.exists() and not truncated.exists()
    # The resumed run restores adapter weights, optimizer moments, step and RNG state, and
    # the batches of an iteration depend only on (seed, stage, iteration): it repeats the
    # uninterrupted run's arithmetic, so the losses agree to float32 rounding. 1e-4 leaves
    # room for the order of floating-point reductions, nothing more.
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-4)
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-4)
    manifest = json.loads((project / "runs" / run_id / "run-manifest.json").read_text())
    assert manifest["stages"]["stage1"]["status"] == "completed"
    assert json.loads((project / "runs" / run_id / "status.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_second_start_is_refused_and_sigterm_cancels_with_a_checkpoint(project):
    run_id = configure(project, "busy", *LONG, "--set", "training.stage1.iterations=5000",
                       "--set", "training.backend=transformers", "--set", "training.num_stages=1")
    run_dir = project / "runs" / run_id
    proc = start(project, run_id)
    try:
        wait_for(lambda: complete_checkpoints(project, run_id), what="the first checkpoint")
        kept = {k: v for k, v in snapshot(run_dir).items()
                if k.startswith(("stage1/training-data", "config.yaml"))}
        code, out = script(project, "train.py", "--run-id", run_id)
        assert code == 1 and out["error"]["type"] == "run_locked"
        assert f"run {run_id} is already running" in out["error"]["message"]
        assert f"pid {proc.pid}" in out["error"]["message"]
        code, status = script(project, "status.py", "--run-id", run_id)
        assert status["status"] == "running" and status["process_alive"] is True and status["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        code, result = final(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1 and result["error"]["type"] == "cancelled"
    stopped_at = result["error"]["iteration"]
    assert stopped_at in complete_checkpoints(project, run_id), "SIGTERM must leave a checkpoint"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "cancelled" and "--resume" in status["error"]
    assert json.loads((run_dir / "run-manifest.json").read_text())["stages"]["stage1"]["status"] == "cancelled"
    assert {k: v for k, v in snapshot(run_dir).items() if k in kept} == kept


@pytest.mark.slow
def test_non_finite_loss_stops_at_once(project, tmp_path):
    from safetensors.numpy import load_file, save_file

    broken = project / "models" / "tiny-nan"
    shutil.copytree(project / "models" / "tiny-llama", broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = next(k for k in weights if k.endswith("norm.weight"))
    weights[name] = weights[name] * float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    for backend in ("transformers", "mlx"):
        run_id = configure(project, f"nan-{backend}", "--set", "base_model.local_path=models/tiny-nan",
                           "--set", f"training.backend={backend}", "--set", "training.num_stages=1")
        code, out = script(project, "train.py", "--run-id", run_id)
        assert code == 1 and out["error"]["type"] == "non_finite_loss", out
        assert out["error"]["iteration"] == 1 and "iteration 1" in out["error"]["message"]
        run_dir = project / "runs" / run_id
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "failed" and "nan" in status["error"].lower()
        manifest = json.loads((run_dir / "run-manifest.json").read_text())
        assert manifest["stages"]["stage1"]["status"] == "failed"
        assert not list((run_dir / "stage1" / "checkpoints").iterdir())


@pytest.mark.slow
def test_bad_requests_are_refused_and_change_nothing(project):
    code, out = script(project, "configure_run.py", "--name", "nodata", *LOCAL, "--train", "data/missing.jsonl")
    assert code == 1 and out["error"]["type"] == "run_error"
    assert "stage 1 train data file not found" in out["error"]["message"] and "missing.jsonl" in out["error"]["message"]
    assert not list((project / "runs").glob("nodata-*"))

    code, out = script(project, "train.py", "--run-id", "no-such-run")
    assert code == 1 and "unknown run id 'no-such-run'" in out["error"]["message"]
    code, out = script(project, "status.py", "--run-id", "no-such-run")
    assert code == 1 and "unknown run id" in out["error"]["message"]

    run_id = configure(project, "stage2-first")
    before = run_files(project, run_id)
    code, out = script(project, "train.py", "--run-id", run_id, "--stage", "2")
    assert code == 1 and "stage 1 has not completed" in out["error"]["message"]
    assert run_files(project, run_id) == before

    run_id = configure(project, "q4-cpu", "--set", "base_model.quantization=q4",
                       "--set", "training.backend=transformers")
    before = run_files(project, run_id)
    code, out = script(project, "train.py", "--run-id", run_id)
    assert code == 1 and out["error"]["supported_by"] == ["mlx"]
    assert "needs CUDA" in out["error"]["message"] and "training.backend: mlx" in out["error"]["message"]
    assert run_files(project, run_id) == before

    code, out = script(project, "train.py", "--name", "x", "--set", "training.stage1.learning_rate=7")
    assert code == 1 and out["error"]["type"] == "config_error"
    assert any("training.stage1.learning_rate" in p for p in out["error"]["problems"])


@pytest.mark.slow
def test_quantized_base_with_mlx_is_made_once_and_reused(project):
    args = ["--set", "base_model.quantization=q8", "--set", "training.stage1.iterations=5",
            "--set", "training.stage1.warmup_steps=0", "--set", "training.num_stages=1"]
    first = script(project, "train.py", "--name", "q8-a", *LOCAL, *args)
    assert first[0] == 0 and first[1]["backend"] == "mlx", first
    manifest = json.loads(Path(first[1]["manifest_path"]).read_text())
    assert manifest["backend"]["reason"] == "auto: a quantized base needs mlx without CUDA"
    copies = list((project / "models" / "quantized").iterdir())
    assert len(copies) == 1 and "-q8-" in copies[0].name
    made = os.stat(copies[0] / "config.json").st_mtime_ns
    assert script(project, "train.py", "--name", "q8-b", *LOCAL, *args)[0] == 0
    assert list((project / "models" / "quantized").iterdir()) == copies
    assert os.stat(copies[0] / "config.json").st_mtime_ns == made
    metadata = json.loads((Path(first[1]["manifest_path"]).parent / "stage1" / "training_metadata.json").read_text())
    assert metadata["base_model"]["quantized_copy"] == str(copies[0])
