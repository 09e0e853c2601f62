"""hooks/rename_config_key.py: renames one key, keeps comments, is idempotent, and never
writes a rewrite that changes anything else."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from conftest import REPO

spec = importlib.util.spec_from_file_location("rename_config_key", REPO / "hooks" / "rename_config_key.py")
hook = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hook)

CONFIG = """\
# top comment
training:
  seed: 42  # keep me
  stage1:
    save_steps: 5   # not the one: deeper section
  save_steps: 50  # checkpoint often
  eval_steps: 25
lora:
  save_steps: 7
"""


def test_renames_only_the_key_at_the_path_and_keeps_comments():
    out = hook.rename_in_yaml(CONFIG, ["training", "save_steps"], ["training", "checkpoint_steps"])
    assert "  checkpoint_steps: 50  # checkpoint often\n" in out
    assert "    save_steps: 5   # not the one: deeper section\n" in out
    assert "  save_steps: 7\n" in out and "# top comment" in out and "# keep me" in out
    data = yaml.safe_load(out)
    assert data["training"]["checkpoint_steps"] == 50 and "save_steps" not in data["training"]


def test_project_migration_is_idempotent_and_covers_env(tmp_path):
    (tmp_path / "config" / "experiments").mkdir(parents=True)
    (tmp_path / "config" / "fine_tuning_config.yaml").write_text(CONFIG)
    (tmp_path / "config" / "experiments" / "long.yaml").write_text("training:\n  save_steps: 10\n")
    (tmp_path / ".env").write_text("OLMO_TRAINING__SAVE_STEPS=20\nexport OLMO_LORA__RANK=4\n")
    args = ["training.save_steps", "training.checkpoint_steps", "--project", str(tmp_path)]
    assert hook.main(args) == 0
    assert yaml.safe_load((tmp_path / "config" / "experiments" / "long.yaml").read_text()) == {
        "training": {"checkpoint_steps": 10}}
    assert (tmp_path / ".env").read_text() == "OLMO_TRAINING__CHECKPOINT_STEPS=20\nexport OLMO_LORA__RANK=4\n"
    first = (tmp_path / "config" / "fine_tuning_config.yaml").read_text()
    assert hook.main(args) == 0
    assert (tmp_path / "config" / "fine_tuning_config.yaml").read_text() == first


def test_refuses_moves_between_sections(tmp_path, capsys):
    assert hook.main(["training.save_steps", "lora.save_steps", "--project", str(tmp_path)]) == 2
    assert "moves between sections" in capsys.readouterr().err


def test_refuses_when_both_names_exist(tmp_path):
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "c.yaml"
    path.write_text("training:\n  save_steps: 1\n  checkpoint_steps: 2\n")
    assert hook.main(["training.save_steps", "training.checkpoint_steps", "--project", str(tmp_path)]) == 1
    assert path.read_text() == "training:\n  save_steps: 1\n  checkpoint_steps: 2\n"


def test_leaves_conflicted_files_alone(tmp_path):
    (tmp_path / "config").mkdir()
    text = "training:\n<<<<<<< before updating\n  save_steps: 80\n=======\n  checkpoint_steps: 50\n>>>>>>> after\n"
    (tmp_path / "config" / "c.yaml").write_text(text)
    assert hook.main(["training.save_steps", "training.checkpoint_steps", "--project", str(tmp_path)]) == 0
    assert (tmp_path / "config" / "c.yaml").read_text() == text


@pytest.mark.parametrize("text", ["training:\n  save_steps: |\n    save_steps: 1\n"])
def test_a_rewrite_that_would_change_other_data_is_refused(tmp_path, text):
    # the block scalar's content line looks like a nested key; the parse check catches it
    out = hook.rename_in_yaml(text, ["training", "save_steps", "save_steps"], ["training", "save_steps", "x"])
    assert out != text
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "c.yaml").write_text(text)
    assert hook.main(["training.save_steps.save_steps", "training.save_steps.x", "--project", str(tmp_path)]) == 1
    assert (tmp_path / "config" / "c.yaml").read_text() == text
