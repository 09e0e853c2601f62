"""The config file loads, validates, expands paths and takes environment overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from trainer.config import ConfigError, FineTuningConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(project: Path, change) -> Path:
    path = project / "config" / "fine_tuning_config.yaml"
    data = yaml.safe_load(path.read_text())
    change(data)
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_config_loads(config):
    assert config.project.name
    assert config.training.stage1.iterations >= 1
    assert config.lora.scale == pytest.approx(config.lora.alpha / config.lora.rank)
    assert abs(config.dataset.train_split + config.dataset.validation_split + config.dataset.test_split - 1) < 1e-6
    assert (config.training.stage2 is not None) == (config.training.num_stages == 2)


def test_relative_paths_resolve_against_the_project(config, project):
    assert config.root == project.resolve()
    assert config.resolve(config.dataset.processed_dir) == project.resolve() / "data" / "processed"


def test_nested_environment_overrides_keep_types(project):
    env = {
        "OLMO_TRAINING__STAGE1__ITERATIONS": "321",
        "OLMO_TRAINING__STAGE1__LEARNING_RATE": "3e-4",
        "OLMO_TRAINING__GRADIENT_CHECKPOINTING": "false",
        "OLMO_LORA__TARGET_MODULES": "[q_proj, v_proj]",
        "OLMO_TEMPLATES_DIR": "/not/a/config/key",  # no '__': belongs to other tools
    }
    config = load_config(project / "config" / "fine_tuning_config.yaml", environ=env)
    assert config.training.stage1.iterations == 321
    assert config.training.stage1.learning_rate == pytest.approx(3e-4)
    assert config.training.gradient_checkpointing is False
    assert config.lora.target_modules == ["q_proj", "v_proj"]


def test_overrides_from_code_win_over_environment(project):
    config = load_config(project / "config" / "fine_tuning_config.yaml",
                         environ={"OLMO_LORA__RANK": "4"}, overrides={"lora.rank": 32})
    assert config.lora.rank == 32


def test_unknown_environment_key_names_the_variable_and_allowed_keys(project):
    with pytest.raises(ConfigError) as caught:
        load_config(project / "config" / "fine_tuning_config.yaml", environ={"OLMO_LORA__RANKK": "4"})
    message = str(caught.value)
    assert "OLMO_LORA__RANKK" in message and "lora.rankk" in message
    assert "rank" in message and "alpha" in message


def test_bad_value_from_environment_names_key_and_source(project):
    with pytest.raises(ConfigError) as caught:
        load_config(project / "config" / "fine_tuning_config.yaml", environ={"OLMO_TRAINING__BACKEND": "jax"})
    message = str(caught.value)
    assert "training.backend" in message and "OLMO_TRAINING__BACKEND" in message
    assert "'mlx'" in message and "'transformers'" in message and "'jax'" in message


def test_invalid_choice_in_file_lists_allowed_values(project):
    path = write(project, lambda d: d["base_model"].update(quantization="q3"))
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ={})
    message = str(caught.value)
    assert "base_model.quantization" in message and "'q4'" in message and "'q3'" in message
    assert str(path) in message


def test_unknown_key_in_file_is_rejected(project):
    path = write(project, lambda d: d["lora"].update(rnak=4))
    with pytest.raises(ConfigError, match=r"lora\.rnak: unknown key.*allowed here: alpha, dropout"):
        load_config(path, environ={})


def test_splits_must_sum_to_one(project):
    path = write(project, lambda d: d["dataset"].update(train_split=0.9))
    with pytest.raises(ConfigError, match="must sum to 1"):
        load_config(path, environ={})


def test_two_stages_need_a_stage2_section(project):
    def change(d):
        d["training"]["num_stages"] = 2
        d["training"].pop("stage2", None)
    with pytest.raises(ConfigError, match="stage2 section is missing"):
        load_config(write(project, change), environ={})


def test_warmup_longer_than_training_is_rejected(project):
    path = write(project, lambda d: d["training"]["stage1"].update(warmup_steps=10_000))
    with pytest.raises(ConfigError, match=r"training\.stage1.*warmup_steps"):
        load_config(path, environ={})


def test_home_is_expanded_in_local_path(project):
    config = load_config(project / "config" / "fine_tuning_config.yaml",
                         environ={"OLMO_BASE_MODEL__LOCAL_PATH": "~/models/base"})
    assert config.base_model.local_path == Path.home() / "models" / "base"
    assert config.model_source() == str(Path.home() / "models" / "base")


def test_malformed_yaml_names_the_line(project):
    path = project / "config" / "fine_tuning_config.yaml"
    path.write_text("project:\n  name: x\n lora: [\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path, environ={})


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", environ={})


def _leaf_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    keys = set()
    for name, field in model.model_fields.items():
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        section = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        keys |= _leaf_keys(section, prefix + (name,)) if section else {prefix + (name,)}
    return keys


def test_env_example_documents_every_key():
    text = (ROOT / ".env.example").read_text()
    documented = {tuple(m.lower().split("__")) for m in re.findall(r"OLMO_([A-Z0-9_]+?)=", text)}
    missing = {".".join(k) for k in _leaf_keys(FineTuningConfig)} - {".".join(k) for k in documented}
    assert not missing, f".env.example lacks {sorted(missing)}"


def test_set_value_changes_one_line_and_refuses_what_would_not_load(project):
    from trainer.config_file import set_value
    from trainer.errors import ProjectError

    path = project / "config" / "fine_tuning_config.yaml"
    path.write_text(path.read_text().replace("fine_tune: full", "fine_tune: lora"))  # a quantized base needs LoRA
    before = path.read_text()
    set_value(path, "base_model.local_path", "models/mine")
    set_value(path, "base_model.quantization", "q4")  # a trailing comment stays
    after = path.read_text()
    changed = [(a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b]
    assert [b for _, b in changed] == ['  local_path: "models/mine"', '  quantization: "q4"  # none | q4 | q8']
    assert load_config(path, environ={}).base_model.local_path == Path("models/mine")
    with pytest.raises(ConfigError, match="quantization"):
        set_value(path, "base_model.quantization", "q3")
    with pytest.raises(ProjectError, match="not written"):
        set_value(path, "base_model.nothing", 1)
    assert path.read_text() == after and not list(path.parent.glob(".check-*"))
