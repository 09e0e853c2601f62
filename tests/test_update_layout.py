"""`copier update` of a project generated from the last release (v0.2.0, flat trainer/*.py) to
this template (trainer/ in rooms), with a user's edits in its config and in two trainer modules,
its own module, and a run trained with the old code. The update moves the code, keeps the config
edit, carries one module edit and surfaces the other as a conflict (its code moved to another
module; the MCP server's update_project reports it), rewrites the user's imports, and the old run
is still monitored, evaluated and exported.

The release is tests/releases/v0.2.0.tar.gz (`git archive v0.2.0 copier.yml template includes
hooks`), so the test does not depend on the tag being in the clone that runs it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO, answers_of, mcp_ok, render, script
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings
from test_update import git, replace

RELEASE = REPO / "tests" / "releases" / "v0.2.0.tar.gz"
PARTS = ("copier.yml", "template", "includes", "hooks")
FAST = ["--set", "training.backend=transformers", "--set", "base_model.local_path=models/tiny-llama",
        "--set", "training.stage1.iterations=6", "--set", "training.save_steps=3", "--set", "training.eval_steps=3",
        "--set", "training.log_steps=3", "--set", "training.stage1.warmup_steps=1"]


@pytest.fixture
def releases(tmp_path) -> Path:
    """A template repository with two tags: v0.2.0 (the archived release) and v0.3.0 (this tree)."""
    src = tmp_path / "template-repo"
    src.mkdir()
    with tarfile.open(RELEASE) as archive:
        archive.extractall(src, filter="data")
    git(src, "init", "-q", "-b", "main")
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "v0.2.0")
    git(src, "tag", "v0.2.0")
    for part in PARTS:
        (shutil.rmtree if (src / part).is_dir() else Path.unlink)(src / part)
        copy = shutil.copytree if (REPO / part).is_dir() else shutil.copy2
        copy(REPO / part, src / part, **({"ignore": shutil.ignore_patterns("__pycache__", "*.pyc")}
                                         if (REPO / part).is_dir() else {}))
    git(src, "add", "-A")
    git(src, "commit", "-q", "-m", "v0.3.0: trainer/ in rooms")
    git(src, "tag", "v0.3.0")
    return src


@pytest.mark.slow
def test_a_project_of_the_last_release_moves_into_the_rooms(tmp_path, releases):
    project = render(tmp_path / "legacy", src=releases, vcs_ref="v0.2.0", project_name="legacy", model_type="llama",
                     num_stages=1)
    assert answers_of(project)["_commit"] == "v0.2.0" and (project / "trainer" / "pipeline.py").is_file()
    git(project, "init", "-q", "-b", "main")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "generated from v0.2.0")

    # a completed run, trained by the old code
    for name, *args in (("make_tiny_model.py", "--no-verify"), ("prepare_dataset.py",)):
        code, out = script(project, name, *args)
        assert code == 0, out
    code, out = script(project, "train.py", "--name", "before", *FAST)
    assert code == 0 and out["status"] == "completed", out
    run_id = out["run_id"]

    # the user's edits: a config value, two trainer modules, a module of their own
    config = project / "config" / "fine_tuning_config.yaml"
    replace(config, "  rank: 8\n", "  rank: 4  # small adapters for our small data\n")
    evaluation = project / "trainer" / "evaluation.py"
    evaluation.write_text(evaluation.read_text() + '\n\ndef shout(text: str) -> str:  # our team\'s helper\n'
                          '    return text.upper()\n')
    replace(project / "trainer" / "dataset_preparator.py", "                if not line.strip():\n",
            "                if not line.strip() or line.startswith(\"//\"):  # our comment lines\n")
    replace(project / "trainer" / "hub.py", "    return repo_id\n",
            "    return repo_id.strip()  # our ids come padded\n")
    (project / "trainer" / "team.py").write_text(
        "from trainer import evaluation, export, guard\nfrom trainer.training_data import read_records\n\n"
        "LOUD = evaluation.shout\nREAD = read_records\nGUARD = guard\nEXPORT = export.export_run\n")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "our edits")

    # through the MCP server, as an agent would: it reports the conflict the migration left
    server = build_server(Settings(template=str(releases), output_dir=tmp_path, trusted_templates=[str(releases)]))
    out = mcp_ok(server, "update_project", {"project_path": str(project)})
    assert (out["previous_version"], out["new_version"]) == ("v0.2.0", "v0.3.0")
    assert out["conflicts"] == ["trainer/data/dataset_preparator.py"], out
    assert {"trainer/evaluate/evaluation.py", "trainer/pipeline.py"} <= set(out["changed_files"]), "files, not folders"
    assert answers_of(project)["_commit"] == "v0.3.0"
    trainer = project / "trainer"
    # the old modules are gone, the rooms are in place, and git keeps them (the old .gitignore's
    # `models/` would have hidden trainer/models/; the update anchors it)
    assert not [p.name for p in trainer.glob("*.py") if p.name in {"pipeline.py", "evaluation.py",
                                                                  "dataset_preparator.py", "training_data.py"}]
    for room in ("data", "models", "runs", "observe", "engines", "evaluate", "export"):
        assert (trainer / room / "__init__.py").is_file()
    ignored = subprocess.run(["git", "check-ignore", "trainer/models/base_model.py", "trainer/runs/__init__.py"],
                             cwd=project, capture_output=True, text=True).stdout
    assert ignored == ""
    assert (project / "docs" / "wrapper-contract.md").is_file()
    # the config edit is kept, merged cleanly
    assert "  rank: 4  # small adapters for our small data\n" in config.read_text()
    assert "<<<<<<<" not in config.read_text()
    # the evaluation edit is carried into its new home, whose imports are the new ones
    moved = (trainer / "evaluate" / "evaluation.py").read_text()
    assert "def shout(text: str) -> str:  # our team's helper" in moved and "<<<<<<<" not in moved
    assert "from trainer.runs.training_run_manager import" in moved
    hub = (trainer / "export" / "hub.py").read_text()  # the export room's own imports stay intact
    assert "return repo_id.strip()  # our ids come padded" in hub and "from trainer.export.export_target import" in hub
    # the dataset edit was in read_rows, which moved to trainer/data/readers.py: a conflict, marked
    # as copier marks its own, so the user (and the MCP server's update_project) sees it
    prepared = (trainer / "data" / "dataset_preparator.py").read_text()
    assert "<<<<<<< before updating" in prepared and ">>>>>>> after updating" in prepared
    assert 'line.startswith("//"):  # our comment lines' in prepared
    assert git(project, "ls-files", "-u", "trainer/data/dataset_preparator.py"), "unmerged in git, as copier marks"
    assert not list(project.rglob("*.rej"))
    # the user's own module now imports the new names
    team = (trainer / "team.py").read_text()
    assert "from trainer.evaluate import evaluation" in team and "from trainer import guard" in team
    assert "from trainer.export import export" in team
    assert "from trainer.data.training_data import read_records" in team

    # the user resolves the conflict: the change goes where read_rows lives now
    prepared = re.sub(r"<<<<<<< before updating\n.*?>>>>>>> after updating\n", "", prepared, flags=re.S)
    (trainer / "data" / "dataset_preparator.py").write_text(prepared)
    replace(trainer / "data" / "readers.py", "                if not line.strip():\n",
            "                if not line.strip() or line.startswith(\"//\"):  # our comment lines\n")
    check = subprocess.run([sys.executable, "-c", "import trainer.team as t; print(t.LOUD('ok'), t.EXPORT.__name__)"],
                           cwd=project,
                           capture_output=True, text=True)
    assert check.stdout.strip() == "OK export_run", check.stderr

    # the run trained before the update: monitored, evaluated, exported by the new code
    code, status = script(project, "status.py", "--run-id", run_id)
    assert code == 0 and status["status"] == "completed", status
    served = subprocess.run([sys.executable, "-c", (
        "import json; from fastapi.testclient import TestClient; from trainer.config import load_config; "
        "from trainer.observe.monitor_api import create_app; c = TestClient(create_app(load_config())); "
        f"print(json.dumps([c.get('/runs/{run_id}/status').json(), c.get('/runs/{run_id}/metrics').json()]))")],
        cwd=project, capture_output=True, text=True)
    api_status, metrics = json.loads(served.stdout.strip().splitlines()[-1])
    assert api_status["status"] == "completed" and metrics["records"][-1]["iteration"] == 6, served.stderr
    code, evaluated = script(project, "evaluate.py", "--run-id", run_id, "--stage", "1", "--no-base",
                             "--max-samples", "4")
    assert code == 0 and evaluated["metrics"]["perplexity"] > 0, evaluated
    code, exported = script(project, "export.py", "--run-id", run_id, "--stage", "1", "--format", "adapters")
    assert code == 0 and (Path(exported["export_path"]) / "peft" / "adapter_config.json").is_file(), exported
    # and the project's own tests pass on the new layout (the fast ones)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider",
                            "tests/test_layout.py", "tests/test_config.py", "tests/test_dataset.py"], cwd=project,
                           capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-3000:]
