"""Full fine-tuning (training.fine_tune full) end to end through a generated project, on both
engines: every weight trains, each stage saves a whole Hugging Face model that both engines load,
the two engines take the same steps (one AdamW update rule), stage 2 (DPO against the stage-1
model, with replay) trains the stage-1 model, a kill -9 resumes exactly, and evaluation,
generation and export work on what a full stage saved."""

from __future__ import annotations

import json
import math

import pytest
from test_training_failures import LOCAL, configure, kill_9_after

from conftest import render, script

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("mlx_lm")

SETTINGS = ["--set", "training.stage1.iterations=10", "--set", "training.stage1.learning_rate=1e-3",
            "--set", "training.stage1.warmup_steps=0",
            "--set", "training.stage2.iterations=60", "--set", "training.stage2.learning_rate=3e-4",
            "--set", "training.stage2.replay_ratio=0.25",
            "--set", "training.save_steps=5", "--set", "training.log_steps=10", "--set", "training.eval_steps=30"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = render(tmp_path_factory.mktemp("full") / "p", model_type="llama", num_stages=2, fine_tune="full",
                     stage2_method="dpo")
    assert script(project, "make_tiny_model.py", "--no-verify")[0] == 0
    code, out = script(project, "prepare_dataset.py")
    assert code == 0, out
    return project


@pytest.fixture(scope="module")
def runs(project):
    """One uninterrupted run per engine."""
    found = {}
    for backend in ("transformers", "mlx"):
        code, out = script(project, "train.py", "--name", f"full-{backend}", *LOCAL, *SETTINGS,
                           "--set", f"training.backend={backend}")
        assert code == 0, out
        found[backend] = out
    return found


def logits(folder, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(torch.tensor([ids])).logits[0]


@pytest.mark.slow
def test_every_weight_trains_and_both_engines_take_the_same_steps(project, runs):
    from transformers import AutoModelForCausalLM

    base = project / "models" / "tiny-llama"
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    ids = list(range(5, 40))
    for out in runs.values():
        run_dir = project / "runs" / out["run_id"]
        manifest = json.loads((run_dir / "run-manifest.json").read_text())
        for number in (1, 2):
            entry = manifest["stages"][f"stage{number}"]
            assert entry["fine_tune"] == "full" and entry["adapter_path"] is None
            assert entry["trainable_parameters"] == total, "every weight trains, the tied one once"
            model = run_dir / entry["model_path"]
            assert (model / "config.json").is_file() and (model / "tokenizer.json").is_file()
            assert not (run_dir / f"stage{number}" / "adapters").exists()
        metadata = json.loads((run_dir / "stage2" / "training_metadata.json").read_text())
        assert metadata["fine_tune"] == "full" and metadata["lora"] is None
        assert metadata["parent_model"] == "stage1/model" and metadata["base_model"]["source"].endswith(
            "stage1/model"), "stage 2 trains the stage-1 model"
        assert manifest["final_model"]["fine_tune"] == "full"
        assert (run_dir / "final-model" / "config.json").is_file()
        second = out["stages"]["stage2"]
        assert second["val_loss_before"] == pytest.approx(math.log(2), abs=1e-6), "DPO starts at its reference"
        assert second["val_loss"] < math.log(2)
        # the weights moved: the trained model's logits are not the base's
        assert (logits(run_dir / "stage2" / "model", ids) - logits(base, ids)).abs().max() > 1e-3

    # the same update rule (AdamW, bias-corrected) and the same rows: the same losses on both engines
    for key in ("stage1", "stage2"):
        ours, theirs = runs["mlx"]["stages"][key], runs["transformers"]["stages"][key]
        for metric in ("train_loss", "val_loss"):
            assert ours[metric] == pytest.approx(theirs[metric], rel=1e-4), (key, metric)
    # and what mlx saved is a Hugging Face model transformers loads, with the same logits
    trained = {b: logits(project / "runs" / out["run_id"] / "stage2" / "model", ids) for b, out in runs.items()}
    assert (trained["mlx"] - trained["transformers"]).abs().max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["transformers", "mlx"])
def test_a_full_stage_resumes_after_kill_9_exactly(project, runs, backend):
    settings = [*SETTINGS, "--set", f"training.backend={backend}"]
    run_id = configure(project, f"killed-{backend}", *settings)
    done = kill_9_after(project, run_id, 10, stage=2)
    assert done and max(done) < 60, "the kill came after the end; nothing was tested"
    checkpoint = project / "runs" / run_id / "stage2" / "checkpoints" / f"iter-{max(done):07d}"
    assert (checkpoint / "model" / "config.json").is_file(), "a full checkpoint holds the whole model"
    code, out = script(project, "train.py", "--run-id", run_id, "--resume")
    assert code == 0, out
    resumed, reference = out["stages"]["stage2"], runs[backend]["stages"]["stage2"]
    assert resumed["resumed_from"] == max(done)
    assert resumed["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_evaluation_generation_and_export_of_a_full_stage(project, runs):
    run_id = runs["mlx"]["run_id"]  # trained by mlx, used by transformers too
    model = project / "runs" / run_id / "stage2" / "model"
    code, out = script(project, "evaluate.py", "--run-id", run_id, "--stage", "2", "--max-samples", "3")
    assert code == 0, out
    assert out["metrics"]["perplexity"] != pytest.approx(out["base"]["perplexity"]), "the stage's model, not the base"
    assert "forgetting" in out, "the stage-1 model is loaded for the forgetting check"
    code, out = script(project, "generate.py", "--run-id", run_id, "--backend", "transformers", "--prompt", "hi",
                       "--max-tokens", "4")
    assert code == 0, out
    assert out["model"]["model"] == str(model) and out["model"]["base_model"].endswith("tiny-llama")

    code, out = script(project, "export.py", "--run-id", run_id, "--stage", "2", "--format", "adapters")
    assert code != 0 and "no adapter" in out["error"]["message"]
    assert not (project / "exports" / f"{run_id}-stage2-adapters").exists()
    ids = list(range(5, 40))
    code, out = script(project, "export.py", "--run-id", run_id, "--stage", "2", "--format", "safetensors")
    assert code == 0, out
    assert out["merged"] is True
    assert (logits(out["export_path"], ids) - logits(model, ids)).abs().max() < 1e-5
    card = (project / "exports" / f"{run_id}-stage2-safetensors" / "README.md").read_text()
    assert "Full fine-tuning of" in card and "full-fine-tune" in card and "LoRA: rank" not in card
    code, out = script(project, "export.py", "--run-id", run_id, "--stage", "2", "--format", "gguf",
                       "--quantization", "f16")
    assert code == 0, out
    check = out["details"]["llama_cpp_check"]
    assert check["checked"] and check["same_first_token"], check


def test_full_fine_tuning_refuses_a_quantized_base_and_dora(project):
    for setting in ("base_model.quantization=q4", "lora.use_dora=true"):
        code, out = script(project, "configure_run.py", "--name", "refused", *LOCAL, "--set", setting)
        assert code != 0
        assert "training.fine_tune full" in out["error"]["message"], out
    assert not list((project / "runs").glob("refused-*"))
