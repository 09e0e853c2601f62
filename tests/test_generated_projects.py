"""An answer matrix rendered with pytest-copie: the exact file set, no template leftovers,
Python that compiles and passes ruff, a config that loads into the project's own pydantic
model and matches the answers, dependencies that follow the features, sample data that
prepares, and the project's own (fast) tests passing."""

from __future__ import annotations

import json
import py_compile
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from conftest import script

SOURCES = {
    ".copier-answers.yml", ".env.example", ".gitignore", ".tmp/.gitignore",
    "README.md", "pyproject.toml", "requirements.txt",
    "config/fine_tuning_config.yaml",
    "trainer/__init__.py", "trainer/cli.py", "trainer/config.py", "trainer/config_file.py",
    "trainer/config_overrides.py", "trainer/errors.py", "trainer/files.py", "trainer/guard.py",
    *(f"trainer/{room}/{module}.py" for room, modules in {
        "data": ("__init__", "data_import", "dataset_preparator", "readers", "records", "training_data", "weighting"),
        "models": ("__init__", "adapters", "base_model", "checks", "gguf_support", "merge", "model_config",
                   "tiny_model"),
        "runs": ("__init__", "training_run_manager"),
        "observe": ("__init__", "callbacks", "emissions", "monitor_api", "tracking"),
        "engines": ("__init__", "backends", "base_trainer", "checkpoints", "distributed", "fast_paths", "mlx_trainer",
                    "pipeline", "preference", "recorder", "transformers_trainer"),
        "evaluate": ("__init__", "evaluation", "generation", "harness"),
        "export": ("__init__", "export", "export_target", "gguf_check", "gguf_export", "gguf_quantize", "go_template",
                   "hub", "model_card", "ollama"),
    }.items() for module in modules),
    "docs/wrapper-contract.md",
    "scripts/configure_run.py", "scripts/emissions_dashboard.py", "scripts/emissions_report.py",
    "scripts/evaluate.py", "scripts/export.py", "scripts/generate.py", "scripts/import_data.py",
    "scripts/make_tiny_model.py", "scripts/set_base_model.py",
    "scripts/monitor_training.py",
    "scripts/prepare_dataset.py", "scripts/status.py", "scripts/train.py",
    "tests/conftest.py", "tests/test_cli.py", "tests/test_config.py", "tests/test_dataset.py",
    "tests/test_dora.py", "tests/test_evaluation.py", "tests/test_fast_paths.py", "tests/test_full_fine_tune.py",
    "tests/test_layout.py", "tests/test_ollama.py", "tests/test_precision.py",
    "tests/test_emissions.py", "tests/test_export.py",
    "tests/test_tiny_model.py", "tests/test_trainer.py",
    "data/processed/.gitkeep", "data/quality_reports/.gitkeep", "runs/.gitkeep", "logs/.gitkeep",
    "emissions/.gitkeep",
}
ACCELERATE = {"config/accelerate/single_gpu.yaml", "config/accelerate/multi_gpu.yaml", "config/accelerate/fsdp.yaml"}
MLX_HOSTS = {"config/mlx_hosts.example.json"}
SAMPLE = {"jsonl": "data/raw/sample_dataset.jsonl", "csv": "data/raw/sample_dataset.csv",
          "parquet": "data/raw/sample_dataset.jsonl"}

MATRIX = [
    pytest.param({"model_type": "olmo", "dataset_format": "jsonl", "num_stages": 1}, id="olmo-jsonl-1stage-defaults"),
    pytest.param({"model_type": "llama", "dataset_format": "csv", "num_stages": 2, "enable_mlflow": True,
                  "enable_wandb": True, "enable_huggingface_upload": True, "system_field": "system",
                  "stage2_method": "dpo", "lora_use_dora": True},
                 id="llama-csv-2stage-dpo-dora-all-integrations"),
    pytest.param({"model_type": "mistral", "dataset_format": "parquet", "num_stages": 2, "backend": "transformers",
                  "enable_mlx_optimization": False, "enable_carbontracking": False,
                  "enable_quality_weighting": False, "enable_evaluation": False,
                  "export_formats": ["safetensors", "mlx"], "stage1_method": "orpo", "stage1_beta": 0.2,
                  "fine_tune": "full"},
                 id="mistral-parquet-2stage-orpo-full-minimal"),
    pytest.param({"model_type": "custom", "model_id": "Qwen/Qwen2.5-0.5B-Instruct", "dataset_format": "jsonl",
                  "num_stages": 1, "backend": "mlx", "quantization": "q4", "input_field": "", "quality_field": "",
                  "metadata_field": "", "carbon_offline_mode": False},
                 id="custom-jsonl-mlx-q4-no-optional-fields"),
    pytest.param({"model_type": "olmo", "dataset_format": "csv", "num_stages": 1, "instruction_field": "prompt",
                  "output_field": "response", "quality_field": "Güte", "metadata_field": "métadonnées",
                  "project_description": 'Says "hi" \\ it\'s fine', "lora_target_modules": ["q_proj", "mlp.down_proj"]},
                 id="olmo-csv-renamed-fields-odd-description"),
]


@pytest.fixture(params=MATRIX)
def generated(request, copie):
    answers = request.param
    result = copie.copy(extra_answers=answers)
    assert result.exception is None, result.exception
    return result.project_dir, {**result.answers}


def files_of(project: Path) -> set[str]:
    return {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_exact_file_set(generated):
    project, answers = generated
    stage2 = {SAMPLE[answers["dataset_format"]].replace("raw/sample_dataset", "raw/stage2/sample_domain")}
    uses_mlx = answers["backend"] == "mlx" or (answers["backend"] == "auto" and answers["enable_mlx_optimization"])
    launchers = (ACCELERATE if answers["backend"] != "mlx" else set()) | (MLX_HOSTS if uses_mlx else set())
    samples = {SAMPLE[answers["dataset_format"]]} | (stage2 if answers["num_stages"] == 2 else set())
    # the samples again in tests/samples/: the project's tests use them, whatever data/raw/ then holds
    assert files_of(project) == SOURCES | launchers | samples | {
        name.replace("data/raw/", "tests/samples/") for name in samples}
    assert (project / "data" / "raw" / "stage2").is_dir() == (answers["num_stages"] == 2)


def test_no_template_leftovers(generated):
    project, _ = generated
    for path in project.rglob("*"):
        if not path.is_file():
            continue
        if path.name in ("go_template.py", "ollama.py", "test_ollama.py", "harness.py"):  # templates on purpose
            continue
        text = path.read_text(encoding="utf-8")
        if path.name == "tiny_model.py":  # the tokenizer's chat template is Jinja on purpose
            text = re.sub(r"CHAT_TEMPLATE = \(.*?\n\)", "", text, flags=re.DOTALL)
        for marker in ("{{", "{%", "{#"):
            assert marker not in text, f"{path.relative_to(project)} contains {marker}"
    assert not list(project.rglob("*.jinja"))


def test_python_compiles_and_passes_ruff(generated):
    project, _ = generated
    for path in project.rglob("*.py"):
        py_compile.compile(str(path), doraise=True)
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(project)],
                          capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def load_in_project(project: Path) -> dict:
    """The project's config as its own trainer.config loads it (in a fresh interpreter)."""
    code = "import json; from trainer.config import load_config; print(json.dumps(load_config().to_yaml_dict()))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True,
                          check=False, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_config_loads_and_matches_the_answers(generated):
    project, a = generated
    c = load_in_project(project)
    assert c["project"] == {"name": a["project_name"], "description": a["project_description"],
                            "version": a["project_version"]}
    assert c["base_model"]["type"] == a["model_type"] and c["base_model"]["model_id"] == a["model_id"]
    assert c["base_model"]["quantization"] == a["quantization"]
    t = c["training"]
    assert (t["num_stages"], t["backend"], t["seed"]) == (a["num_stages"], a["backend"], a["seed"])
    assert t["stage1"] == {"iterations": a["stage1_iterations"], "learning_rate": a["stage1_learning_rate"],
                           "batch_size": a["stage1_batch_size"], "warmup_steps": a["stage1_warmup_steps"],
                           "method": a["stage1_method"], "beta": a.get("stage1_beta", 0.1)}
    assert (t["stage2"] is not None) == (a["num_stages"] == 2)
    if t["stage2"]:
        assert t["stage2"]["replay_ratio"] == a["replay_ratio"]
        assert (t["stage2"]["method"], t["stage2"]["beta"]) == (a["stage2_method"], a.get("stage2_beta", 0.1))
    assert t["quality_weighting"] == a["enable_quality_weighting"]
    assert t["fine_tune"] == a["fine_tune"]
    if a["fine_tune"] == "lora":  # full fine-tuning asks no LoRA question
        assert c["lora"] == {"rank": a["lora_rank"], "alpha": a["lora_alpha"], "dropout": a["lora_dropout"],
                             "target_modules": a["lora_target_modules"], "num_layers": a["lora_num_layers"],
                             "use_dora": a["lora_use_dora"]}
    else:
        assert "lora_rank" not in a and c["lora"]["use_dora"] is False
    d = c["dataset"]
    for name in ("instruction_field", "input_field", "system_field", "output_field", "quality_field", "metadata_field"):
        assert d[name] == (a[name] or None), name
    assert (d["format"], d["train_split"], d["test_split"]) == (a["dataset_format"], a["train_split"], a["test_split"])
    assert c["mlx"]["enabled"] == a["enable_mlx_optimization"]
    assert c["carbon_tracking"]["enabled"] == a["enable_carbontracking"]
    offline = a.get("carbon_offline_mode", True)  # hidden (default) when tracking is off
    assert c["carbon_tracking"]["offline_mode"] == offline
    assert (c["carbon_tracking"]["emissions_endpoint"] is None) == offline
    assert c["mlflow"]["enabled"] == a["enable_mlflow"] and c["wandb"]["enabled"] == a["enable_wandb"]
    assert c["huggingface"]["enabled"] == a["enable_huggingface_upload"]
    assert c["evaluation"]["enabled"] == a["enable_evaluation"]
    assert c["export"]["formats"] == a["export_formats"]


def test_dependencies_follow_the_answers(generated):
    project, a = generated
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    extras = meta["optional-dependencies"]
    use_mlx = a["backend"] == "mlx" or (a["backend"] == "auto" and a["enable_mlx_optimization"])
    assert ("mlx" in extras) == use_mlx
    assert ("transformers" in extras) == (a["backend"] != "mlx")
    assert ("carbon" in extras) == a["enable_carbontracking"]
    assert ("evaluation" in extras) == a["enable_evaluation"]
    assert ("harness" in extras) == (a["enable_evaluation"] and a["backend"] != "mlx")  # lm-eval runs transformers
    assert ("mlflow" in extras) == a["enable_mlflow"] and ("wandb" in extras) == a["enable_wandb"]
    assert ("hf" in extras) == a["enable_huggingface_upload"]
    assert ("gguf" in extras) == ("llamacpp" in extras) == ("gguf" in a["export_formats"])
    assert any(d.startswith("streamlit") for d in extras["dashboard"])  # every project offers the dashboard
    assert any(d.startswith("pyarrow") for d in meta["dependencies"]) == (a["dataset_format"] == "parquet")
    if use_mlx:
        assert 'mlx[cpu]>=0.26; sys_platform == "linux"' in extras["mlx"]
    listed = [line for line in (project / "requirements.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    expected = meta["dependencies"] + [d for name, deps in extras.items() if name not in {"all", "dev"} for d in deps]
    assert sorted(listed) == sorted(expected)


def test_sample_data_prepares(generated):
    project, a = generated
    code, result = script(project, "prepare_dataset.py")
    assert code == 0, result
    accepted = result["counts"]["accepted"] + (result["stage2"]["counts"]["accepted"] if "stage2" in result else 0)
    assert result["counts"]["rejected"] == 0 and accepted == 280
    assert ("stage2" in result) == (a["num_stages"] == 2)
    if a["num_stages"] == 2:  # stage 2 is the 'domain': geography and counting
        report = json.loads((project / result["stage2"]["report"]).read_text())
        assert set(report["categories"]) <= {"geography", "counting"} or not a["metadata_field"]
    processed = project / "data" / "processed"
    train = [json.loads(line) for line in (processed / "train.jsonl").read_text().splitlines()]
    everything = [json.loads(line) for path in processed.rglob("*.jsonl") for line in path.read_text().splitlines()]
    roles = {m["role"] for record in everything for m in record["messages"]}
    assert roles == ({"system", "user", "assistant"} if a["system_field"] else {"user", "assistant"})
    assert all("quality" in r for r in train) == bool(a["quality_field"])
    # the sample's inputs reach the prompt, from their own column or folded into the instruction
    prompts = {m["content"] for s in ("train", "valid", "test")
               for line in (project / "data" / "processed" / f"{s}.jsonl").read_text().splitlines()
               for m in json.loads(line)["messages"] if m["role"] == "user"}
    assert "Write the word in capital letters.\n\nriver" in prompts
    raw = (project / SAMPLE[a["dataset_format"]]).read_text()
    assert (f'"{a["input_field"]}"' in raw) == bool(a["input_field"])


def test_project_tests_pass(generated):
    project, _ = generated
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"],
                          cwd=project, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed", proc.stdout)


@pytest.mark.slow
def test_project_slow_tests_pass(copie):
    """The project's own slow tests (the engines' equivalence checks on a tiny model) pass."""
    result = copie.copy(extra_answers={})  # the defaults
    assert result.exception is None, result.exception
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider"],
                          cwd=result.project_dir, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert re.search(r"[5-9] passed|\d\d+ passed", proc.stdout), proc.stdout[-500:]
