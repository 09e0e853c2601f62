"""`copier update` for real: a project generated from v0.1.0 of a temporary clone of this
template, committed and edited by its user, is updated to a v0.2.0 that renames a config
key with a migration from hooks/. The change arrives, the user's edits survive, and the
migration renames the key in the files the user owns."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from copier import run_update

from conftest import REPO, answers_of, render

IGNORE = shutil.ignore_patterns(".git", ".venv*", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
                                "*.egg-info", "build", "dist")


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def replace(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert text.count(old) == count, f"{path}: expected {count} x {old!r}"
    path.write_text(text.replace(old, new))


@pytest.fixture
def template(tmp_path) -> Path:
    """A git clone of this template with its current state tagged v0.1.0."""
    src = tmp_path / "template"
    shutil.copytree(REPO, src, ignore=IGNORE)
    git(src, "init", "-q", "-b", "main")
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "template v0.1.0")
    git(src, "tag", "v0.1.0")
    return src


def release_v020(src: Path) -> None:
    """v0.2.0: training.save_steps becomes training.checkpoint_steps, with a migration."""
    replace(src / "template" / "config" / "fine_tuning_config.yaml.jinja",
            "  save_steps: {{ save_steps }}", "  checkpoint_steps: {{ save_steps }}")
    for code in (src / "template" / "trainer").rglob("*.py"):  # the code reads the new name
        code.write_text(code.read_text().replace("save_steps", "checkpoint_steps"))
    replace(src / "template" / ".env.example.jinja",
            "# OLMO_TRAINING__SAVE_STEPS=", "# OLMO_TRAINING__CHECKPOINT_STEPS=")
    replace(src / "template" / "README.md.jinja", "## Layout\n", "## Layout (v0.2.0)\n")
    replace(src / "copier.yml", "_migrations:\n", """_migrations:
  - version: v0.2.0
    command:
      - "{{ _copier_python }}"
      - "{{ _copier_conf.src_path }}/hooks/rename_config_key.py"
      - training.save_steps
      - training.checkpoint_steps
    when: "{{ _stage == 'after' }}\"
""")
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "template v0.2.0: rename training.save_steps")
    git(src, "tag", "v0.2.0")


@pytest.mark.slow
def test_update_brings_changes_keeps_edits_and_runs_the_migration(tmp_path, template):
    project = render(tmp_path / "project", src=template, vcs_ref=None, project_name="updatable")
    assert answers_of(project)["_commit"] == "v0.1.0"
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated")

    # the user's own edits: a config value, a user-owned experiment config and an env override
    config_file = project / "config" / "fine_tuning_config.yaml"
    replace(config_file, "  rank: 8\n", "  rank: 16  # bigger adapters for our data\n")
    (project / "config" / "experiments").mkdir()
    (project / "config" / "experiments" / "long.yaml").write_text("training:\n  save_steps: 10  # often\n")
    (project / ".env").write_text("OLMO_TRAINING__SAVE_STEPS=20\n")
    (project / "data" / "raw" / "mine.jsonl").write_text('{"instruction": "Hi?", "output": "Hello."}\n')
    sample_before = (project / "data" / "raw" / "sample_dataset.jsonl").read_text() + '{"instruction": "x"}\n'
    (project / "data" / "raw" / "sample_dataset.jsonl").write_text(sample_before)
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "my edits")

    release_v020(template)
    run_update(str(project), defaults=True, overwrite=True, quiet=True, unsafe=True, vcs_ref="v0.2.0")

    assert answers_of(project)["_commit"] == "v0.2.0"
    text = config_file.read_text()
    assert re.search(r"^  checkpoint_steps: 50 ", text, re.MULTILINE) and "save_steps" not in text, \
        "the template change arrived"
    assert "  rank: 16  # bigger adapters for our data\n" in text, "the user's edit survived"
    assert "## Layout (v0.2.0)" in (project / "README.md").read_text()
    assert "OLMO_TRAINING__CHECKPOINT_STEPS=" in (project / ".env.example").read_text()
    # the migration renamed the key where the template cannot reach
    assert yaml.safe_load((project / "config" / "experiments" / "long.yaml").read_text()) == {
        "training": {"checkpoint_steps": 10}}
    assert "# often" in (project / "config" / "experiments" / "long.yaml").read_text()
    assert (project / ".env").read_text() == "OLMO_TRAINING__CHECKPOINT_STEPS=20\n"
    # the user's data is theirs
    assert (project / "data" / "raw" / "sample_dataset.jsonl").read_text() == sample_before
    assert (project / "data" / "raw" / "mine.jsonl").is_file()
    assert not list(project.rglob("*.rej")) and "<<<<<<<" not in text

    # the updated project works: the new key loads, the env override applies, its tests pass
    code = ("from trainer.config import load_config; "
            "print(load_config(environ={'OLMO_TRAINING__CHECKPOINT_STEPS': '20'}).training.checkpoint_steps)")
    out = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "20"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                           "tests/test_config.py"], cwd=project, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:]


@pytest.mark.slow
def test_update_refuses_a_dirty_project(tmp_path, template):
    project = render(tmp_path / "project", src=template, vcs_ref=None)
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated")
    (project / "README.md").write_text("uncommitted\n")
    release_v020(template)
    with pytest.raises(Exception, match="(?i)dirty"):
        run_update(str(project), defaults=True, overwrite=True, quiet=True, unsafe=True, vcs_ref="v0.2.0")
    assert (project / "README.md").read_text() == "uncommitted\n"
