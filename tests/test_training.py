"""Real training through generated projects, with both engines, on tiny llama, olmo2 and
mistral models: validation loss goes down, adapters load back in their engine, the
manifest, status and metrics tell the story, and two stages chain with replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import render, script

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx_lm")

ARCHITECTURES = {"olmo": "olmo2", "llama": "llama", "mistral": "mistral"}
# A random tiny model learns slowly; a high learning rate makes 40 steps show it clearly.
FAST = ["--set", "training.stage1.iterations=40", "--set", "training.stage1.learning_rate=5e-3",
        "--set", "training.stage1.warmup_steps=4", "--set", "training.save_steps=20", "--set", "training.eval_steps=20",
        "--set", "training.log_steps=5"]
METRIC_FIELDS = {"stage", "iteration", "total_iterations", "train_loss", "learning_rate", "tokens_per_second",
                 "peak_memory_gb", "elapsed", "eta"}


def make_project(base: Path, model_type: str, **answers) -> Path:
    project = render(base / f"{model_type}-{answers.get('num_stages', 1)}", model_type=model_type, **answers)
    code, out = script(project, "make_tiny_model.py", "--no-verify")
    assert code == 0, out
    code, out = script(project, "prepare_dataset.py")
    assert code == 0, out
    return project


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    base = tmp_path_factory.mktemp("training")
    cache: dict = {}

    def get(model_type: str, stages: int = 1) -> Path:
        if (model_type, stages) not in cache:
            cache[model_type, stages] = make_project(base, model_type, num_stages=stages)
        return cache[model_type, stages]

    return get


def local(model_type: str) -> list[str]:
    return ["--set", f"base_model.local_path=models/tiny-{ARCHITECTURES[model_type]}"]


def train(project: Path, name: str, backend: str, model_type: str, *extra: str) -> dict:
    code, out = script(project, "train.py", "--name", name, "--set", f"training.backend={backend}",
                       *local(model_type), *FAST, *extra)
    assert code == 0, out
    return out


def check_adapter_loads(project: Path, run_dir: Path, stage: int, backend: str, model_type: str) -> None:
    """The adapter loads with its own engine's tools and changes the model's output."""
    base = project / "models" / f"tiny-{ARCHITECTURES[model_type]}"
    adapter = run_dir / f"stage{stage}" / "adapters"
    if backend == "mlx":
        import mlx.core as mx
        import mlx_lm

        assert {"adapters.safetensors", "adapter_config.json"} <= {p.name for p in adapter.iterdir()}
        plain, tokenizer = mlx_lm.load(str(base))
        tuned, _ = mlx_lm.load(str(base), adapter_path=str(adapter))
        ids = mx.array([tokenizer.encode("What is 2 plus 3?")])
        assert mx.abs(plain(ids) - tuned(ids)).max().item() > 1e-4
    else:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in adapter.iterdir()}
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
            tuned_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
            tuned = tuned_model(ids).logits
        assert (plain - tuned).abs().max().item() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "mlx"])
@pytest.mark.parametrize("model_type", ["llama", "olmo", "mistral"])
def test_one_stage_trains_and_the_adapter_loads(projects, backend, model_type):
    project = projects(model_type)
    out = train(project, f"{backend}-one", backend, model_type)
    assert out["status"] == "completed" and out["backend"] == backend
    stage = out["stages"]["stage1"]
    assert stage["val_loss"] < 0.97 * stage["val_loss_before"], stage
    assert stage["tokens_per_second"] > 0 and stage["iterations"] == 40

    run_dir = Path(out["manifest_path"]).parent
    manifest = json.loads((run_dir / "run-manifest.json").read_text())
    assert manifest["schema_version"] == "2.0"
    assert manifest["backend"]["resolved"] == backend and manifest["backend"]["reason"] == "set in the config"
    entry = manifest["stages"]["stage1"]
    assert entry["status"] == "completed" and entry["metrics"]["val_loss"] == stage["val_loss"]
    assert entry["weighting"]["high_quality_rows"] > 0 and entry["adapter_format"] == backend
    assert manifest["lineage"] == [{"stage": 1, "starts_from": "base model"}]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["progress"] == 100.0 and status["pid"] > 0

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if m.get("train_loss") is not None]
    assert [m["iteration"] for m in train_lines] == list(range(5, 41, 5))
    assert all(METRIC_FIELDS <= set(m) for m in train_lines)
    assert [m["iteration"] for m in lines if m.get("val_loss") is not None] == [0, 20, 40]

    metadata = json.loads((run_dir / "stage1" / "training_metadata.json").read_text())
    assert metadata["seed"] == 42 and metadata["backend"] == backend
    assert {"python", "mlx" if backend == "mlx" else "torch"} <= set(metadata["versions"])
    assert metadata["data"]["train"]["sha256"] == manifest["stages"]["stage1"]["data"]["train"]["sha256"]
    assert metadata["hardware"]["cpus"] >= 1 and metadata["trainable_parameters"] > 0
    check_adapter_loads(project, run_dir, 1, backend, model_type)


@pytest.mark.slow
def test_both_backends_draw_the_same_batches_and_start_from_the_same_loss(projects):
    """Same config, same seed: identical tokens seen and identical initial validation loss."""
    project = projects("llama")
    results = {b: train(project, f"same-{b}", b, "llama")["stages"]["stage1"] for b in ("transformers", "mlx")}
    assert results["mlx"]["tokens"] == results["transformers"]["tokens"]
    assert results["mlx"]["val_loss_before"] == pytest.approx(results["transformers"]["val_loss_before"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_two_stages_chain_from_the_stage1_adapter_with_replay(projects, backend):
    project = projects("llama", 2)
    out = train(project, f"{backend}-two", backend, "llama", "--set", "training.stage2.iterations=30",
                "--set", "training.stage2.learning_rate=3e-3", "--set", "training.stage2.replay_ratio=0.25")
    assert out["status"] == "completed"
    first, second = out["stages"]["stage1"], out["stages"]["stage2"]
    assert second["iterations"] == 30 and second["val_loss"] < second["val_loss_before"]
    run_dir = Path(out["manifest_path"]).parent
    manifest = json.loads((run_dir / "run-manifest.json").read_text())
    assert [s["status"] for s in manifest["stages"].values()] == ["completed", "completed"]
    assert manifest["lineage"][1] == {"stage": 2, "starts_from": "stage1/adapters"}
    assert manifest["stages"]["stage2"]["parent_adapter"] == "stage1/adapters"
    assert manifest["stages"]["stage2"]["replay"]["ratio"] == 0.25
    metadata = json.loads((run_dir / "stage2" / "training_metadata.json").read_text())
    assert metadata["rows"]["replay"] == manifest["stages"]["stage1"]["data"]["train"]["rows"]
    assert metadata["parent_adapter"] == "stage1/adapters"
    # stage 2 starts from stage 1's weights, not the base: its data already scores better
    # than the base model would (the first stage was trained on related tasks)
    assert second["val_loss_before"] < first["val_loss_before"]
    check_adapter_loads(project, run_dir, 2, backend, "llama")
    stage_lines = {json.loads(line)["stage"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert stage_lines == {1, 2}
    # final-model/ is the last stage's adapter, byte for byte, with where it comes from
    final = run_dir / "final-model"
    adapter = run_dir / "stage2" / "adapters"
    assert {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()} == {
        p.name: p.read_bytes() for p in final.iterdir() if p.is_file() and p.name != "final-model.json"}
    note = json.loads((final / "final-model.json").read_text())
    assert note["stage"] == 2 and note["source"] == "stage2/adapters" and note["adapter_format"] == backend
    assert manifest["final_model"] == note


@pytest.mark.slow
def test_one_stage_at_a_time(projects):
    project = projects("llama", 2)
    code, configured = script(project, "configure_run.py", "--name", "staged", *local("llama"), *FAST,
                              "--set", "training.backend=transformers", "--set", "training.stage2.iterations=10")
    assert code == 0, configured
    run_id = configured["run_id"]
    code, out = script(project, "train.py", "--run-id", run_id, "--stage", "1")
    assert code == 0 and list(out["stages"]) == ["stage1"] and out["status"] == "not_started"
    code, status = script(project, "status.py", "--run-id", run_id)
    assert status["status"] == "not_started" and status["stage"] == 1
    code, out = script(project, "train.py", "--run-id", run_id, "--stage", "2")
    assert code == 0 and list(out["stages"]) == ["stage2"] and out["status"] == "completed"
    code, again = script(project, "train.py", "--run-id", run_id, "--stage", "2")
    assert code == 1 and "already completed" in again["error"]["message"]


@pytest.mark.slow
def test_bf16_precision_trains_through_the_pipeline_and_mlx_refuses_it(projects):
    project = projects("llama")
    out = train(project, "bf16", "transformers", "llama", "--set", "training.precision=bf16",
                "--set", "training.stage1.iterations=10")
    run_dir = Path(out["manifest_path"]).parent
    metadata = json.loads((run_dir / "stage1" / "training_metadata.json").read_text())
    assert metadata["base_model"]["precision"] == "bf16 autocast"
    assert metadata["base_model"]["dtype"] == "torch.float32"  # the weights stay float32
    assert any((run_dir / "stage1" / "adapters").glob("adapter_model.safetensors"))
    code, refused = script(project, "train.py", "--name", "bf16-mlx", "--set", "training.backend=mlx",
                           *local("llama"), *FAST, "--set", "training.precision=bf16")
    assert code == 1 and "training.precision bf16" in refused["error"]["message"], refused
