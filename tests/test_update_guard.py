"""update_project when things go wrong: a migration that crashes half way, a template source that
lacks the project's version (then the right one), a template with uncommitted changes. Each failed
update leaves the project exactly as it was (files, ignored ones too, git's index and history),
and nothing is recorded before an update succeeds."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, answers_of, mcp_error, mcp_ok, render, snapshot
from mcp_wrapper import update
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings
from test_update import IGNORE, git, replace, template  # noqa: F401  (template is a fixture)


def hook(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_server_reads_the_report_the_hooks_write():
    assert update.REPORT == hook("update_report").NAME and update.KEPT == hook("update_guard").KEPT


def test_lines_the_user_added_are_missing_only_when_gone():
    guard = hook("update_guard")
    base, mine = b"a\nb\n\nc\n", b"a\nb\nmine\nc\nmine\n"
    assert guard.missing_lines(mine, base, b"a\nB\nmine\nc\nnew\nmine\n") == []
    assert guard.missing_lines(mine, base, b"a\nb\nmine\nc\n") == [b"mine"], "one of two added copies is gone"
    assert guard.missing_lines(mine, base, b"a\nb\nc\n") == [b"mine"]
    assert guard.missing_lines(b"a\n  \n", b"a\n", b"a\n") == [], "blank lines are not edits"


def test_a_binary_file_is_put_back_as_a_conflict_not_merged(tmp_path):
    guard = hook("update_guard")
    git(tmp_path, "init", "-q", "-b", "main")
    (tmp_path / "weights.bin").write_bytes(b"\0the update's")
    git(tmp_path, "add", "-A")
    assert guard.merge_back(tmp_path, "weights.bin", "100644", b"\0mine", b"\0release", b"\0the update's") == 1
    assert (tmp_path / "weights.bin").read_bytes() == b"\0mine"
    assert [line.split()[2] for line in git(tmp_path, "ls-files", "-u").splitlines()] == ["1", "2", "3"]


def state(project: Path) -> dict:
    """Everything an update could touch: every file (ignored ones too), the index and the history."""
    files = {name: digest for name, digest in snapshot(project).items() if not name.startswith(".git/")}
    return {"files": files, "index": git(project, "ls-files", "-s"), "log": git(project, "log", "--format=%H"),
            "status": git(project, "status", "--porcelain", "--ignored")}


def generated(tmp_path: Path, template: Path) -> Path:  # noqa: F811
    project = render(tmp_path / "project", src=template, vcs_ref=None, project_name="kept")
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated")
    replace(project / "config" / "fine_tuning_config.yaml", "  dropout: 0.05\n", "  dropout: 0.1  # mine\n")
    (project / "runs" / "old").mkdir(parents=True)
    (project / "runs" / "old" / "status.json").write_text('{"status": "completed"}\n')
    git(project, "commit", "-qam", "my edit")
    return project


@pytest.mark.slow
def test_a_migration_that_crashes_half_way_leaves_the_project_as_it_was(tmp_path, template):  # noqa: F811
    project = generated(tmp_path, template)
    replace(template / "template" / "README.md.jinja", "## Layout\n", "## Layout (v0.2.0)\n")
    (template / "template" / "docs" / "added-in-v0.2.0.md").write_text("new\n")
    replace(template / "copier.yml", "_migrations:\n", "_migrations:\n  - command: [\"{{ _copier_python }}\", \"-c\", "
            "\"import sys; sys.exit('the migration broke')\"]\n    when: \"{{ _stage == 'after' }}\"\n")
    git(template, "add", "-A")
    git(template, "commit", "-q", "-m", "v0.2.0 with a broken migration")
    git(template, "tag", "v0.2.0")
    before = state(project)
    server = build_server(Settings(template=str(template), output_dir=tmp_path, trusted_templates=[str(template)]))
    text = mcp_error(server, "update_project", {"project_path": str(project)})
    assert "copier update failed" in text and "the project is as it was" in text, text
    assert state(project) == before
    assert not (project / "docs" / "added-in-v0.2.0.md").exists()


@pytest.mark.slow
def test_a_wrong_source_changes_nothing_and_the_right_one_then_works(tmp_path, template):  # noqa: F811
    project = generated(tmp_path, template)
    bundled = tmp_path / "bundled"  # a copy without git history, as a wheel carries the template
    shutil.copytree(template, bundled, ignore=IGNORE)
    answers = project / ".copier-answers.yml"
    answers.write_text(answers.read_text().replace(f"_src_path: {template}", f"_src_path: {bundled}"))
    git(project, "commit", "-qam", "made from the bundled copy")
    wrong = tmp_path / "wrong"  # the template's files in a repository without the project's tag
    shutil.copytree(template, wrong, ignore=IGNORE)
    git(wrong, "init", "-q", "-b", "main")
    git(wrong, "add", "-A")
    git(wrong, "commit", "-q", "-m", "another history")
    replace(template / "template" / "README.md.jinja", "## Layout\n", "## Layout (v0.2.0)\n")
    git(template, "commit", "-qam", "v0.2.0")
    git(template, "tag", "v0.2.0")
    before = state(project)

    def server(source: Path):
        return build_server(Settings(template=str(bundled), output_dir=tmp_path, template_git=str(source),
                                     trusted_templates=[str(bundled)]))

    text = mcp_error(server(wrong), "update_project", {"project_path": str(project)})
    assert "the project is as it was" in text, text
    assert state(project) == before, "nothing recorded, nothing committed"
    out = mcp_ok(server(template), "update_project", {"project_path": str(project)})
    assert (out["previous_version"], out["new_version"]) == ("v0.1.0", "v0.2.0")
    assert answers_of(project)["_src_path"] == str(template)
    assert "## Layout (v0.2.0)" in (project / "README.md").read_text()
    assert "  dropout: 0.1  # mine\n" in (project / "config" / "fine_tuning_config.yaml").read_text()
    assert git(project, "log", "--format=%H") == before["log"], "the update commits nothing: the user reviews it"
    assert ".copier-answers.yml" in out["changed_files"]


@pytest.mark.slow
def test_a_dirty_template_records_a_version_a_later_update_finds(tmp_path, template):  # noqa: F811
    replace(template / "template" / "README.md.jinja", "## Layout\n", "## Layout (draft)\n")  # not committed
    server = build_server(Settings(template=str(template), output_dir=tmp_path, trusted_templates=[str(template)],
                                   template_ref="HEAD"))
    out = mcp_ok(server, "generate_fine_tuning_project", {"project_name": "drafty"})
    project = tmp_path / "drafty"
    assert "## Layout (draft)" in (project / "README.md").read_text()
    assert "uncommitted changes" in out["version_note"] and out["template_version"] == "v0.1.0", out
    recorded = yaml.safe_load((project / ".copier-answers.yml").read_text())["_commit"]
    assert git(template, "rev-parse", "--verify", f"{recorded}^{{commit}}").strip(), "the template has it"
    assert git(project, "status", "--porcelain") == "", "generated and committed with the version it records"

    git(template, "commit", "-qam", "v0.2.0: the draft, committed")
    git(template, "tag", "v0.2.0")
    out = mcp_ok(server, "update_project", {"project_path": str(project)})
    assert (out["previous_version"], out["new_version"], out["version_note"]) == ("v0.1.0", "v0.2.0", None), out
    assert "## Layout (draft)" in (project / "README.md").read_text() and out["conflicts"] == []


@pytest.mark.slow
def test_no_update_while_training_runs(tmp_path, template):  # noqa: F811
    """A rollback must never meet files a job is writing, and an update must not rewrite the code a
    run is executing: while a run holds its lock, update_project refuses and changes nothing."""
    import fcntl
    import os

    project = generated(tmp_path, template)
    replace(template / "template" / "README.md.jinja", "## Layout\n", "## Layout (v0.2.0)\n")
    git(template, "commit", "-qam", "v0.2.0")
    git(template, "tag", "v0.2.0")
    (project / "runs" / "training").mkdir(parents=True)
    lock = os.open(project / "runs" / "training" / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as a live trainer holds it
    before = state(project)
    server = build_server(Settings(template=str(template), output_dir=tmp_path, trusted_templates=[str(template)]))
    try:
        text = mcp_error(server, "update_project", {"project_path": str(project)})
    finally:
        os.close(lock)
    assert "training run training" in text and "wait for it" in text, text
    assert state(project) == before
    assert mcp_ok(server, "update_project", {"project_path": str(project)})["new_version"] == "v0.2.0"
