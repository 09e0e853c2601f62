"""Updates never lose a user's work: the matrix.

Starting points: the archived v0.2.0 release (the last of the flat trainer/*.py layout) and this
tree (trainer/ in rooms). Targets: this tree, and a next version that deletes a file the user
edited. Template histories: untagged, only the start tagged, start and target tagged. Ways:
copier's own update (the CLI's code) and the MCP server's update_project. A project gets the same
set of edits each time (a moved module, a config value, a user module importing moved names, a
custom metric, a new file, a removed sample, an edited script, an edited README) plus data, a run
and a model of its own; after the update every edit is in the project or reported as a conflict,
and the data, runs and models are byte for byte as they were."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from copier import run_update

from conftest import REPO, answers_of, mcp_ok, render, snapshot
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings
from test_update import git, replace

RELEASE = REPO / "tests" / "releases" / "v0.2.0.tar.gz"
PARTS = ("copier.yml", "template", "includes", "hooks")
MARKER = re.compile(rb"^<<<<<<< before updating$", re.M)


@dataclass
class Edit:
    what: str
    path: str  # where the edit is to be found after the update
    text: Optional[str]  # None: the file must be absent


def commit_tree(repo: Path, source: Path, message: str) -> str:
    """Replace the template's parts in `repo` with those of `source` and commit: the commit id."""
    for part in PARTS:
        if (repo / part).is_dir():
            shutil.rmtree(repo / part)
        elif (repo / part).exists():
            (repo / part).unlink()
        if (source / part).is_dir():
            shutil.copytree(source / part, repo / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source / part, repo / part)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> dict:
    """One template history, untagged: the v0.2.0 release, this tree, and a next version."""
    base = tmp_path_factory.mktemp("history")
    repo, release = base / "template", base / "release"
    repo.mkdir()
    release.mkdir()
    with tarfile.open(RELEASE) as archive:
        archive.extractall(release, filter="data")
    git(repo, "init", "-q", "-b", "main")
    commits = {"v0.2.0": commit_tree(repo, release, "v0.2.0: flat trainer/"),
               "rooms": commit_tree(repo, REPO, "this tree: trainer/ in rooms")}
    (repo / "template" / "scripts" / "emissions_dashboard.py").unlink()  # the next version drops a script
    replace(repo / "template" / "README.md.jinja", "## Layout\n", "## Layout (next)\n")
    contract = repo / "template" / "docs" / "wrapper-contract.md"
    contract.write_text(contract.read_text() + "\nChanged in the next version.\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "next: without scripts/emissions_dashboard.py")
    commits["next"] = git(repo, "rev-parse", "HEAD").strip()
    return {"base": base, "repo": repo, "commits": commits}


def variant(history: dict, tags: dict[str, str], name: str) -> Path:
    """A clone of the history with these tags ({tag: commit name}), on the target's branch tip."""
    clone = history["base"] / name
    if not clone.exists():
        git(history["base"], "clone", "-q", str(history["repo"]), str(clone))
        for tag, commit in tags.items():
            git(clone, "tag", tag, history["commits"][commit])
    return clone


def data_of_the_user(project: Path) -> dict[str, str]:
    """A data file, a run and a model of the user's (runs/ and models/ are ignored by git)."""
    (project / "data" / "raw" / "mine.jsonl").write_text('{"instruction": "Hi?", "output": "Hello."}\n')
    (project / "runs" / "before-update").mkdir(parents=True)
    (project / "runs" / "before-update" / "run-manifest.json").write_text('{"run_id": "before-update"}\n')
    (project / "models" / "tiny").mkdir(parents=True)
    (project / "models" / "tiny" / "config.json").write_text('{"model_type": "llama"}\n')
    return {**snapshot(project / "runs"), **snapshot(project / "models"), "mine": snapshot(project / "data")[
        "raw/mine.jsonl"]}


def common_edits(project: Path) -> list[Edit]:
    replace(project / "config" / "fine_tuning_config.yaml", "  rank: 8\n", "  rank: 4  # EDIT-config\n")
    (project / "notes").mkdir()
    (project / "notes" / "plan.md").write_text("EDIT-new: what we try next\n")
    (project / "data" / "raw" / "sample_dataset.jsonl").unlink()
    readme = project / "README.md"
    readme.write_text(readme.read_text() + "\nEDIT-readme: our team's notes.\n")
    script = project / "scripts" / "emissions_dashboard.py"
    script.write_text(script.read_text() + "\n# EDIT-script: our dashboard tweak\n")
    return [Edit("config value", "config/fine_tuning_config.yaml", "rank: 4  # EDIT-config"),
            Edit("new file", "notes/plan.md", "EDIT-new"),
            Edit("removed sample", "data/raw/sample_dataset.jsonl", None),
            Edit("README", "README.md", "EDIT-readme"),
            Edit("script", "scripts/emissions_dashboard.py", "# EDIT-script")]


def flat_edits(project: Path) -> list[Edit]:
    """Edits of a v0.2.0 project: its modules are moved by the update."""
    evaluation = project / "trainer" / "evaluation.py"
    evaluation.write_text(evaluation.read_text() + "\n\ndef shout_metric(predictions, references):  # EDIT-module\n"
                          "    return float(sum(p.isupper() for p in predictions))\n")
    (project / "trainer" / "team.py").write_text(
        "from trainer import evaluation, guard  # EDIT-team\nfrom trainer.training_data import read_records\n\n"
        "METRIC = evaluation.shout_metric\nREAD = read_records\nGUARD = guard\n")
    replace(project / "config" / "fine_tuning_config.yaml", "  custom_metrics: []",
            "  custom_metrics: ['trainer.evaluation:shout_metric']")
    return [Edit("moved module", "trainer/evaluate/evaluation.py", "def shout_metric(predictions, references):  #"
                 " EDIT-module"),
            Edit("user module", "trainer/team.py", "from trainer.evaluate import evaluation"),
            Edit("custom metric", "config/fine_tuning_config.yaml", "'trainer.evaluate.evaluation:shout_metric'")]


def rooms_edits(project: Path) -> list[Edit]:
    evaluation = project / "trainer" / "evaluate" / "evaluation.py"
    evaluation.write_text(evaluation.read_text() + "\n\ndef shout_metric(predictions, references):  # EDIT-module\n"
                          "    return 0.0\n")
    return [Edit("module", "trainer/evaluate/evaluation.py", "# EDIT-module")]


CASES = [  # (start, target, tags, way)
    *[("v0.2.0", "rooms", tags, way) for tags in ("none", "start", "both") for way in ("cli", "tool")],
    *[("rooms", "next", tags, way) for tags in ("none", "both") for way in ("cli", "tool")],
]


@pytest.mark.slow
@pytest.mark.parametrize(("start", "target", "tags", "way"), CASES, ids=["-".join(case) for case in CASES])
def test_every_edit_is_kept_or_reported(history, tmp_path, start, target, tags, way):
    names = {"none": {}, "start": {"v0.2.0" if start == "v0.2.0" else "v0.3.0": start},
             "both": {"v0.2.0": "v0.2.0", "v0.3.0": "rooms", "v0.4.0": "next"}}[tags]
    names = {tag: commit for tag, commit in names.items() if list(history["commits"]).index(commit)
             <= list(history["commits"]).index(target)}
    template = variant(history, names, f"{target}-{tags}")
    git(template, "checkout", "-q", history["commits"][target])
    start_ref = next((tag for tag, commit in names.items() if commit == start), history["commits"][start])
    project = render(tmp_path / "project", src=template, vcs_ref=start_ref, project_name="kept", model_type="llama")
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated")
    kept = data_of_the_user(project)
    edits = common_edits(project) + (flat_edits(project) if start == "v0.2.0" else rooms_edits(project))
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "our edits")

    if way == "cli":  # what `copier update --trust --defaults` runs
        run_update(str(project), defaults=True, overwrite=True, quiet=True, unsafe=True, skip_answered=True,
                   vcs_ref=None if tags == "both" else "HEAD")
        conflicts = set(git(project, "diff", "--name-only", "--diff-filter=U").split())
    else:
        server = build_server(Settings(template=str(template), output_dir=tmp_path, trusted_templates=[str(template)],
                                       template_ref="HEAD"))
        out = mcp_ok(server, "update_project", {"project_path": str(project)})
        conflicts = set(out["conflicts"])
        assert out["success"] and (out["version_note"] is None) == (tags == "both"), out
        if start == "v0.2.0":
            assert "moved trainer/evaluation.py -> trainer/evaluate/evaluation.py: your change carried" in out["report"]

    assert answers_of(project)["_commit"] != start_ref, "the update reached the target"
    for edit in edits:
        path = project / edit.path
        if edit.text is None:
            assert not path.exists(), f"{edit.what}: {edit.path} came back"
            continue
        assert path.is_file(), f"{edit.what}: {edit.path} is gone"
        data = path.read_bytes()
        assert edit.text.encode() in data, f"{edit.what}: not in {edit.path}"
        if MARKER.search(data):
            assert edit.path in conflicts, f"{edit.what}: {edit.path} has conflict markers but is not reported"
    if target == "next":  # the next version deletes the script the user edited: kept, and reported
        assert "scripts/emissions_dashboard.py" in conflicts
        assert "## Layout (next)" in (project / "README.md").read_text()
    assert not list(project.rglob("*.rej"))
    now = {**snapshot(project / "runs"), **snapshot(project / "models"),
           "mine": snapshot(project / "data")["raw/mine.jsonl"]}
    assert now == kept, "the user's data, runs and models are as they were"
    if start == "v0.2.0":  # the user's module and custom metric load with the new layout
        code = ("import trainer.team as t; from trainer.config import load_config; "
                "from trainer.evaluate.evaluation import custom_metric; "
                "[name] = load_config().evaluation.custom_metrics; "
                "print(t.METRIC(['A', 'b'], ['x', 'y']), custom_metric(name)(['A'], ['x']))")
        proc = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True)
        assert proc.stdout.split() == ["1.0", "1.0"], proc.stderr[-2000:]


@pytest.mark.slow
def test_a_project_in_a_subfolder_keeps_its_own_modules_and_ignored_files(history, tmp_path):
    """A project inside a larger repository (a monorepo), updated by copier: the file the next
    version deletes is kept and unmerged at its real path; a module of the user's own named like a
    flat-layout one (trainer/tracking.py) and its import are not "moved"; a template file the user
    made their own and told git to ignore is not overwritten."""
    template = variant(history, {}, "next-none")
    git(template, "checkout", "-q", history["commits"]["next"])
    outer = tmp_path / "monorepo"
    project = render(outer / "services" / "tuning", src=template, vcs_ref=history["commits"]["rooms"],
                     project_name="nested")
    git(outer, "init", "-q", "-b", "main")
    (outer / "README.md").write_text("the monorepo\n")
    script = project / "scripts" / "emissions_dashboard.py"
    script.write_text(script.read_text() + "\n# EDIT-script\n")
    (project / "trainer" / "tracking.py").write_text("OURS = True  # our own tracking helpers\n")
    (project / "scripts" / "mine.py").write_text("from trainer import tracking  # ours\n\nprint(tracking.OURS)\n")
    contract = project / "docs" / "wrapper-contract.md"
    contract.write_text("our private notes on the contract\n")
    with (project / ".gitignore").open("a") as ignore:
        ignore.write("/docs/wrapper-contract.md\n")
    git(outer, "add", "-A")  # the contract stays out: ignored
    assert not git(outer, "ls-files", "services/tuning/docs/wrapper-contract.md")
    git(outer, "commit", "-q", "-m", "a project in a monorepo")

    run_update(str(project), defaults=True, overwrite=True, quiet=True, unsafe=True, skip_answered=True, vcs_ref="HEAD")

    unmerged = set(git(outer, "diff", "--name-only", "--diff-filter=U").split())
    assert unmerged == {"services/tuning/scripts/emissions_dashboard.py"}, unmerged
    assert "# EDIT-script" in script.read_text()
    assert (project / "scripts" / "mine.py").read_text().startswith("from trainer import tracking  # ours\n")
    assert (project / "trainer" / "tracking.py").read_text() == "OURS = True  # our own tracking helpers\n"
    assert contract.read_text() == "our private notes on the contract\n"
    assert "## Layout (next)" in (project / "README.md").read_text()
    assert (outer / "README.md").read_text() == "the monorepo\n"
