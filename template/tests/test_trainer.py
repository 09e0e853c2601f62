"""The training machinery without an engine: learning-rate schedule, the weighted sampler
(weights, replay, distinct rows per batch), checkpoints that are complete or ignored,
and runs on disk (configure, manifest, lock, status of a dead process)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trainer.data.dataset_preparator import prepare
from trainer.data.training_data import Sampler, TokenizedSet, collate, quality_weights
from trainer.data.weighting import summary
from trainer.engines.base_trainer import Backend, checkpoint_dirs, learning_rate, save_checkpoint
from trainer.files import TEMP_PREFIX
from trainer.runs.training_run_manager import RunError, RunLocked, RunManager, lock_held


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    assert learning_rate(1, 1e-3, 10, 100, "cosine") == pytest.approx(1e-4)
    assert learning_rate(10, 1e-3, 10, 100, "cosine") == pytest.approx(1e-3)
    assert learning_rate(100, 1e-3, 10, 100, "cosine") == pytest.approx(1e-4)
    assert learning_rate(55, 1e-3, 10, 100, "cosine") == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(100, 1e-3, 10, 100, "constant") == pytest.approx(1e-3)
    assert learning_rate(1, 1e-3, 0, 100, "constant") == pytest.approx(1e-3)


def weights_for(n_high: int, n_low: int, multiplier: float) -> np.ndarray:
    return quality_weights([0.9] * n_high + [0.2] * n_low, multiplier, 0.8, True)


@pytest.mark.parametrize("multiplier", [2.5, 1.0, 4.0])
def test_high_quality_rows_are_drawn_multiplier_times_as_often(multiplier):
    n_high, n_low, batch, draws = 60, 180, 4, 20_000
    sampler = Sampler([(weights_for(n_high, n_low, multiplier), 1.0)], batch, seed=7, stage=1)
    counts = np.zeros(n_high + n_low)
    for iteration in range(1, draws + 1):
        rows = sampler.batch(iteration)
        assert len(set(rows.tolist())) == batch, "a row repeated within a batch"
        counts[rows] += 1
    ratio = counts[:n_high].mean() / counts[n_high:].mean()
    # Draws per row are close to Poisson; the ratio of the two group means has a relative
    # standard error of about sqrt(1/total_high + 1/total_low). Allow 4 of them, plus 1% for
    # the small bias of drawing a batch without replacement.
    sigma = math.sqrt(1 / counts[:n_high].sum() + 1 / counts[n_high:].sum())
    assert abs(ratio / multiplier - 1) < 4 * sigma + 0.01, (ratio, multiplier)


def test_sampling_is_stateless_and_seeded():
    weights = weights_for(10, 30, 2.5)
    a, b = Sampler([(weights, 1.0)], 4, seed=1, stage=1), Sampler([(weights, 1.0)], 4, seed=1, stage=1)
    assert [a.batch(i).tolist() for i in (5, 1, 3)] == [b.batch(i).tolist() for i in (5, 1, 3)]
    assert a.batch(1).tolist() != Sampler([(weights, 1.0)], 4, seed=2, stage=1).batch(1).tolist()
    assert a.batch(1, micro=1).tolist() != a.batch(1, micro=0).tolist()


def test_replay_share_matches_the_ratio():
    stage2, stage1 = weights_for(5, 45, 2.5), weights_for(20, 80, 2.5)
    sampler = Sampler([(stage2, 0.85), (stage1, 0.15)], 4, seed=3, stage=2)
    drawn = np.concatenate([sampler.batch(i) for i in range(1, 10_001)])
    share = (drawn >= len(stage2)).mean()
    assert abs(share - 0.15) < 0.01


def test_length_grouping_cuts_one_weighted_draw_by_length():
    """Batches of a group come from one weighted draw of group x batch rows, sorted by length:
    rows of similar length share a batch (less padding), each row once, statelessly."""
    rng = np.random.default_rng(0)
    n, batch, group = 400, 8, 5
    lengths = rng.integers(10, 500, size=n)
    weights = weights_for(100, 300, 2.5)
    sampler = Sampler([(weights, 1.0)], batch, seed=4, stage=1, lengths=lengths, group=group)
    again = Sampler([(weights, 1.0)], batch, seed=4, stage=1, lengths=lengths, group=group)
    block = [sampler.batch(i) for i in range(1, group + 1)]
    assert [b.tolist() for b in block] == [again.batch(i).tolist() for i in (1, 2, 3, 4, 5)]
    rows = np.concatenate(block)
    assert len(set(rows.tolist())) == group * batch, "each row of the draw goes into exactly one batch"
    spans = sorted((lengths[b].min(), lengths[b].max()) for b in block)
    assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:], strict=False))
    plain = Sampler([(weights, 1.0)], batch, seed=4, stage=1)
    waste = lambda s: np.mean([lengths[s.batch(i)].max() * batch - lengths[s.batch(i)].sum()  # noqa: E731
                               for i in range(1, 201)])
    assert waste(sampler) < 0.5 * waste(plain), "grouping must cut padding"
    counts = np.zeros(n)
    for iteration in range(1, 5001):
        counts[sampler.batch(iteration)] += 1
    assert 2.0 < counts[:100].mean() / counts[100:].mean() < 3.0, "the quality weighting still holds"
    assert Sampler([(np.ones(10), 1.0)], 4, 0, 1, np.arange(10), group=8).group == 2  # as many as fit


def test_batch_never_exceeds_the_rows_available():
    sampler = Sampler([(np.ones(3), 1.0)], 8, seed=0, stage=1)
    assert sorted(sampler.batch(1).tolist()) == [0, 1, 2]


def test_concatenating_sets_copies_no_rows_and_collate_pads():
    a = TokenizedSet([[1, 2, 3], [4, 5]], [1, 1], [0.9, None])
    b = TokenizedSet([[6, 7, 8, 9]], [2], [0.1])
    both = a + b
    assert all(x is y for x, y in zip(both.tokens, a.tokens + b.tokens, strict=True))
    batch = collate(both, [1, 2], pad_id=0, multiple=8)
    assert batch.ids.shape == (2, 8) and batch.ids[0].tolist() == [4, 5, 0, 0, 0, 0, 0, 0]
    assert batch.select[:3].tolist() == [0, 8 - 1 + 1, 8 - 1 + 2] and batch.labels[:3].tolist() == [5, 8, 9]
    assert batch.owners[:3].tolist() == [0, 1, 1] and batch.tokens == 6 and batch.positions is None
    assert batch.targets == 1 + 2


def test_weighting_summary():
    result = summary([0.9, 0.85, 0.1, None], 2.5, 0.8, True)
    assert (result["high_quality_rows"], result["other_rows"]) == (2, 2)
    assert result["sampling_share_high_quality"] == pytest.approx(5 / 7, abs=1e-4)
    assert summary([0.9], 2.5, 0.8, False)["high_quality_rows"] == 0


class FileBackend(Backend):
    """Writes recognisable files where an engine writes its adapter and optimizer state."""

    name = "files"

    def load(self, source, quantization, cache_dir):
        return {}

    def add_adapters(self, lora, gradient_checkpointing, init_from):
        return 0

    def setup_optimizer(self, training):
        pass

    def step(self, batch, learning_rate, accumulation, update, denominator=None):
        return 0.0

    def loss_sums(self, batches):
        return 0.0, 1

    def generate(self, prompts, max_tokens, temperature, top_p):
        return ["" for _ in prompts]

    def eval_mode(self):
        pass

    def save_adapter(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapters.safetensors").write_bytes(b"weights" * 100)

    def save_state(self, folder: Path) -> None:
        (folder / "optimizer.bin").write_bytes(b"moments" * 100)

    def load_state(self, folder: Path) -> None:
        pass

    def peak_memory_gb(self):
        return 0.0

    def versions(self):
        return {}


def test_incomplete_checkpoints_are_ignored(tmp_path):
    backend = FileBackend()
    for iteration in (10, 20, 30):
        save_checkpoint(backend, tmp_path, iteration, {"stage": 1})
    assert [i for i, _ in checkpoint_dirs(tmp_path)] == [20, 30], "only the last two are kept"
    # a writer killed mid-way leaves a temp directory, never a checkpoint
    (tmp_path / f"{TEMP_PREFIX}iter-0000040-123" / "adapter").mkdir(parents=True)
    # a checkpoint whose file was cut short (or lacks its index) does not count
    broken = tmp_path / "iter-0000050"
    shutil.copytree(tmp_path / "iter-0000030", broken)
    index = json.loads((broken / "checkpoint.json").read_text())
    (broken / "checkpoint.json").write_text(json.dumps({**index, "iteration": 50}))
    (broken / "optimizer.bin").write_bytes(b"moments")
    assert [i for i, _ in checkpoint_dirs(tmp_path)] == [20, 30]


@pytest.fixture
def prepared(config):
    prepare(config)
    if config.training.num_stages == 2:
        prepare(config, stage=2)
    return config


def test_configure_creates_the_run_layout(prepared):
    result = RunManager(prepared).configure("first", overrides={"training.stage1.iterations": 12})
    run_dir = Path(result["run_directory"])
    assert result["run_id"].startswith("first-") and run_dir.parent == prepared.resolve("runs")
    stages = range(1, prepared.training.num_stages + 1)
    full = prepared.training.fine_tune == "full"
    output = "model" if full else "adapters"  # a full fine-tune saves whole models
    for stage in stages:
        for sub in (output, "checkpoints", "training-data", "evaluation"):
            assert (run_dir / f"stage{stage}" / sub).is_dir()
        assert not (run_dir / f"stage{stage}" / ("adapters" if full else "model")).exists()
    assert not (run_dir / "final-model").exists()  # it holds the final adapter once the run completes
    manifest = json.loads((run_dir / "run-manifest.json").read_text())
    assert manifest["schema_version"] == "2.0"
    assert manifest["config"]["training"]["stage1"]["iterations"] == 12
    data = manifest["stages"]["stage1"]["data"]
    assert set(data) == {"train", "valid", "test"}
    assert data["train"]["sha256"] == hashlib.sha256(
        (run_dir / data["train"]["path"]).read_bytes()).hexdigest()
    if prepared.training.num_stages == 2:
        entry = manifest["stages"]["stage2"]
        assert (entry["parent_model"] if full else entry["parent_adapter"]) == f"stage1/{output}"
        assert manifest["stages"]["stage2"]["replay"]["ratio"] == prepared.training.stage2.replay_ratio
    status = RunManager(prepared).status(result["run_id"])
    assert status["status"] == "not_started" and status["process_alive"] is False


def test_configure_errors_name_what_is_wrong(prepared, tmp_path):
    manager = RunManager(prepared)
    with pytest.raises(RunError, match="stage 1 train data file not found: .*nope.jsonl"):
        manager.configure("x", {1: {"train": tmp_path / "nope.jsonl"}})
    with pytest.raises(RunError, match="run name"):
        manager.configure("bad name!")
    with pytest.raises(RunError, match="unknown run id 'missing'"):
        manager.status("missing")
    assert not list(prepared.resolve("runs").glob("x-*")), "a failed configure leaves no run behind"


HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from trainer.config import load_config
from trainer.runs.training_run_manager import RunManager
manager = RunManager(load_config({config!r}, environ=dict()))
with manager.lock({run_id!r}):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_second_start_is_refused_and_a_dead_holder_is_noticed(prepared):
    manager = RunManager(prepared)
    run_id = manager.configure("locking")["run_id"]
    root = str(Path(__file__).resolve().parents[1])
    code = HOLD.format(root=root, config=str(prepared.root / "config" / "fine_tuning_config.yaml"), run_id=run_id)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        manager.write_status(run_id, status="running", pid=holder.pid)
        assert lock_held(manager.run_dir(run_id) / ".lock")
        with pytest.raises(RunLocked, match=f"run {run_id} is already running .*pid {holder.pid}"):
            with manager.lock(run_id):
                pass
        assert manager.status(run_id)["status"] == "running"
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    status = manager.status(run_id)
    assert status["status"] == "failed" and status["process_alive"] is False
    assert "ended without finishing" in status["error"] and "--resume" in status["error"]
    with manager.lock(run_id) as found:  # the dead holder's lock is taken over
        assert f"pid {holder.pid}" in found["previous_holder"]


def test_list_runs(prepared):
    manager = RunManager(prepared)
    ids = [manager.configure(name)["run_id"] for name in ("a", "b")]
    listed = manager.list_runs()
    assert [r["run_id"] for r in listed] == sorted(ids)
    assert {r["status"] for r in listed} == {"not_started"}
    assert os.path.basename(ids[0]).startswith("a-")


@pytest.mark.parametrize(("platform_name", "machine", "mlx", "torch", "cuda", "quantization", "expected"), [
    ("darwin", "arm64", True, True, False, "none", ("mlx", "auto: Apple silicon")),
    ("linux", "x86_64", True, True, True, "none", ("transformers", "auto: CUDA is available")),
    ("linux", "x86_64", True, True, False, "q4", ("mlx", "auto: a quantized base needs mlx without CUDA")),
    ("linux", "x86_64", True, True, False, "none", ("transformers", "auto: installed (no CUDA, not Apple silicon)")),
    ("linux", "x86_64", True, False, False, "none", ("mlx", "auto: installed")),
])
def test_auto_backend_choice(monkeypatch, config, platform_name, machine, mlx, torch, cuda, quantization, expected):
    from trainer.engines import backends

    monkeypatch.setattr(backends.sys, "platform", platform_name)
    monkeypatch.setattr(backends.platform, "machine", lambda: machine)
    monkeypatch.setattr(backends, "installed", lambda m: {"mlx_lm": mlx, "torch": torch, "peft": torch}[m])
    monkeypatch.setattr(backends, "cuda_available", lambda: cuda)
    config.training.backend = "auto"
    config.base_model.quantization = quantization
    assert backends.resolve_backend(config) == expected


def test_a_requested_backend_must_be_installed(monkeypatch, config):
    from trainer.engines import backends
    from trainer.engines.base_trainer import TrainingError

    monkeypatch.setattr(backends, "installed", lambda m: False)
    config.training.backend = "mlx"
    with pytest.raises(TrainingError, match=r"backend is mlx, but it is not installed: pip install -e '\.\[mlx\]'"):
        backends.resolve_backend(config)


def test_only_the_answer_counts_in_the_loss_by_default():
    pytest.importorskip("transformers")
    from trainer.data.training_data import tokenize
    from trainer.models.tiny_model import train_tokenizer

    tokenizer = train_tokenizer(["What is 2 plus 3? 2 plus 3 is 5."], 300)
    record = {"messages": [{"role": "user", "content": "What is 2 plus 3?"},
                           {"role": "assistant", "content": "2 plus 3 is 5."}]}
    masked = tokenize([record], tokenizer, 512, mask_prompt=True)
    full = tokenize([record], tokenizer, 512, mask_prompt=False)
    ids, start = masked.tokens[0], masked.starts[0]
    assert tokenizer.decode(ids[start:]) == "2 plus 3 is 5.<|im_end|>\n"
    assert tokenizer.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    assert full.tokens[0] == ids and full.starts[0] == 1
    # a prompt that fills max_seq_length leaves nothing to learn: the row is dropped, not kept empty
    assert tokenize([record], tokenizer, start, mask_prompt=True).dropped == 1


def test_the_status_eta_covers_every_remaining_stage(prepared):
    """At 60% of stage 1 of a two-stage run the ETA counts stage 2 too, at stage 1's pace."""
    from trainer.engines.recorder import RunRecorder

    manager = RunManager(prepared)
    run_id = manager.configure("eta")["run_id"]
    recorder = RunRecorder(manager, run_id, offset=0, total=100 + 50)  # stage 1: 100 iterations, stage 2: 50
    recorder.on_train_loss_report({"stage": 1, "iteration": 60, "total_iterations": 100, "train_loss": 1.0,
                                   "eta": 40.0})
    status = json.loads((manager.run_dir(run_id) / "status.json").read_text())
    assert status["eta_seconds"] == 40.0 + 50 * 1.0 and status["progress"] == 40.0
    last = json.loads((manager.run_dir(run_id) / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eta"] == 40.0, "metrics.jsonl keeps the stage's own ETA"
    stage2 = RunRecorder(manager, run_id, offset=100, total=150)
    stage2.on_train_loss_report({"stage": 2, "iteration": 10, "total_iterations": 50, "train_loss": 1.0, "eta": 20.0})
    assert json.loads((manager.run_dir(run_id) / "status.json").read_text())["eta_seconds"] == 20.0
