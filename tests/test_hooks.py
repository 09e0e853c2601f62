"""hooks/rename_config_key.py: renames one key, keeps comments, is idempotent, and never
writes a rewrite that changes anything else."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


# ---------------------------------------------------------------- move_trainer_modules.py (v0.3.0)

spec = importlib.util.spec_from_file_location("move_trainer_modules", REPO / "hooks" / "move_trainer_modules.py")
move = importlib.util.module_from_spec(spec)
spec.loader.exec_module(move)


@pytest.mark.parametrize(("old", "new"), [
    ("from trainer import evaluation, guard\n", "from trainer import guard\nfrom trainer.evaluate import evaluation\n"),
    ("from trainer import export_engines\n", "from trainer.models import merge as export_engines\n"),
    ("from trainer import evaluation as ev\n", "from trainer.evaluate import evaluation as ev\n"),
    ("from trainer import (\n    pipeline,  # the stages\n    cli,\n)\n",
     "from trainer import cli\nfrom trainer.engines import pipeline\n"),
    ("    from trainer import cli, tiny_model  # noqa: E402\n",
     "    from trainer import cli  # noqa: E402\n    from trainer.models import tiny_model  # noqa: E402\n"),
    ("from trainer import export\n", "from trainer.export import export\n"),
    ("from trainer.export import export_run\n", "from trainer.export.export import export_run\n"),
    ("from trainer.training_data import read_records\n", "from trainer.data.training_data import read_records\n"),
    ("import trainer.pipeline as p\nx = trainer.export.export_run\n",
     "import trainer.engines.pipeline as p\nx = trainer.export.export.export_run\n"),
    ("metric: trainer.evaluation:normalise\n", "metric: trainer.evaluate.evaluation:normalise\n"),
    ("see trainer/gguf_check.py\r\n", "see trainer/export/gguf_check.py\r\n"),
])
def test_old_module_names_become_the_new_ones_once(old, new):
    assert move.rewrite(old) == new
    assert move.rewrite(new) == new, "rewriting twice is rewriting once"
    assert move.leftovers(new) == []


def test_the_new_layout_and_other_names_are_left_alone():
    for text in ("from trainer.export import gguf_check, hub\n", "from trainer.export.export import export_run\n",
                 "from trainer import cli, guard\n", "trainer.train()\nmy_trainer.pipeline = 1\n",
                 "from trainer.config import load_config\n", "x = 1; from trainer import pipeline\n"):
        assert move.rewrite(text) == text
    assert move.leftovers("x = 1; from trainer import pipeline\n") == ["pipeline"], "reported, not guessed"


def test_the_template_is_already_in_the_new_names():
    """Every text file the template renders is a fixed point: the migration may run over files
    the template owns without touching them."""
    files = [p for p in (REPO / "template").rglob("*") if p.is_file() and "__pycache__" not in p.parts
             and p.suffix in (".py", ".jinja", ".md", ".yaml", ".yml", ".toml", ".json")]
    assert len(files) > 50
    changed = [str(p.relative_to(REPO)) for p in files if move.rewrite(p.read_text()) != p.read_text()]
    assert changed == []


def test_every_old_module_maps_to_a_new_one():
    import tarfile

    with tarfile.open(REPO / "tests" / "releases" / "v0.2.0.tar.gz") as archive:
        old = {Path(n).stem for n in archive.getnames()
               if n.startswith("template/trainer/") and n.endswith(".py") and n.count("/") == 2}
    kept = {Path(p).stem for p in (REPO / "template" / "trainer").glob("*.py")}
    assert old - kept == set(move.MOVES), "each module that left trainer/ has its new home in the migration"
    assert all((REPO / "template" / move.path_of(new)).is_file() for new in move.MOVES.values())
