"""The package as users get it: a wheel built from a tagged clone (python -m build) carries
the whole template and takes its version from the tag; installed into a fresh venv (not
editable, no checkout on the path), its `olmo-fine-tuning-mcp` command serves a full
generate -> prepare -> configure -> train -> evaluate -> ask -> export cycle over stdio. A
project made from the bundled copy records its release, explains what copier update needs,
and updates to the next tag once the template's git source is configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import anyio
import pytest
import yaml
from mcp import Client, StdioServerParameters

from conftest import REPO

pytest.importorskip("build")
pytest.importorskip("torch")

GIT = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@localhost"}


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=folder, check=True, capture_output=True, text=True,
                          env={**os.environ, **GIT}).stdout


def sh(*argv: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=1200, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("package")
    source = base / "source"
    sh("git", "clone", "-q", str(REPO), str(source))
    changelog = source / "CHANGELOG.md"
    changelog.write_text(changelog.read_text().replace("## [Unreleased]\n", "## [Unreleased]\n\n## [1.0.0]\n", 1))
    git(source, "commit", "-qam", "CHANGELOG: 1.0.0")
    # the release steps as a maintainer runs them: the update check from the last archived release,
    # the archive, the tag and the wheel
    released = sh(sys.executable, str(source / "scripts" / "release.py"), "1.0.0", "--dist", str(base / "dist"),
                  cwd=source, env={**os.environ, **GIT})
    assert "update check: v0.2.0 -> v1.0.0: edits kept" in released.stdout, released.stdout
    assert git(source, "tag", "--points-at", "HEAD~1") == "v1.0.0\n", "the release is tagged, then archived"
    assert (source / "tests/releases/v1.0.0.tar.gz").is_file()
    assert "## [1.0.0] - " in (source / "CHANGELOG.md").read_text()
    wheel = next((base / "dist").glob("*.whl"))
    venv = base / "venv"
    sh(sys.executable, "-m", "venv", str(venv))
    sh(str(venv / "bin" / "pip"), "install", "-q", str(wheel))
    return {"base": base, "source": source, "wheel": wheel, "venv": venv}


@pytest.mark.slow
def test_the_wheel_carries_the_template_and_the_tag(installed):
    assert installed["wheel"].name.startswith("olmo_fine_tuning_mcp-1.0.0-")
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    bundled = "mcp_wrapper/bundled_template/"
    tracked = git(installed["source"], "ls-files", "-z", "copier.yml", "template", "includes", "hooks").split("\0")
    tracked = [name for name in tracked if name]
    assert {bundled + name for name in tracked} <= names, "every template file is in the wheel"
    assert not any(name.startswith(("tests/", "bench/", "template/")) for name in names)
    venv = installed["venv"]
    version = sh(str(venv / "bin" / "olmo-fine-tuning-mcp"), "--version").stdout
    assert version.strip() == "olmo-fine-tuning-mcp 1.0.0"
    where = sh(str(venv / "bin" / "python"), "-c", "from mcp_wrapper.settings import BUNDLED_TEMPLATE as t; print(t)",
               cwd=installed["base"]).stdout.strip()
    assert where.startswith(str(venv)) and where.endswith("mcp_wrapper/bundled_template")


@pytest.mark.slow
def test_the_installed_server_runs_a_full_cycle_and_updates_need_git(installed, tmp_path):
    venv, source = installed["venv"], installed["source"]
    server = venv / "bin" / "olmo-fine-tuning-mcp"
    env = {**os.environ, "OLMO_PROJECT_PYTHON": sys.executable}  # the engines live in the test environment
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "custom_model_example.py"), "--server", str(server),
                           "--output-dir", str(tmp_path / "projects"), "--iterations", "10", "--json"],
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    project = Path(summary["project_path"])
    assert summary["template_version"] == "v1.0.0"
    assert Path(summary["export_path"], "peft", "adapter_model.safetensors").is_file()
    recorded = yaml.safe_load((project / ".copier-answers.yml").read_text())
    assert recorded["_commit"] == "v1.0.0" and "bundled_template" in recorded["_src_path"]
    assert json.loads(next((project / "runs").glob("example-*/run-manifest.json")).read_text())["template"]

    git(project, "add", "-A")
    git(project, "commit", "-qm", "after the example")
    # the next template release: a changed README, tagged v1.1.0 in the template's git repository
    readme = source / "template" / "README.md.jinja"
    readme.write_text(readme.read_text() + "\nReleased in v1.1.0.\n")
    git(source, "commit", "-qam", "v1.1.0")
    git(source, "tag", "v1.1.0")

    def update(environment: dict) -> tuple[bool, str, dict]:
        params = StdioServerParameters(command=str(server), args=["--output-dir", str(tmp_path / "projects")],
                                       env=environment)

        async def go():
            async with Client(params, read_timeout_seconds=600) as client:
                return await client.call_tool("update_project", {"project_path": str(project)})

        result = anyio.run(go)
        return result.is_error, result.content[0].text, result.structured_content

    failed, message, _ = update(env)
    assert failed and "OLMO_TEMPLATE_GIT" in message and "without git history" in message
    failed, message, result = update({**env, "OLMO_TEMPLATE_GIT": str(source)})
    assert not failed, message
    assert result["previous_version"] == "v1.0.0" and result["new_version"] == "v1.1.0"
    assert "README.md" in result["changed_files"] and not result["conflicts"]
    assert "Released in v1.1.0." in (project / "README.md").read_text()
    assert yaml.safe_load((project / ".copier-answers.yml").read_text())["_src_path"] == str(source)


def test_an_untagged_checkout_says_which_release_it_follows(tmp_path):
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(REPO), str(clone))
    code = "import sys; sys.path.insert(0, 'mcp_wrapper'); import checkout_version as v; print(v.checkout_version())"
    head = git(clone, "rev-parse", "--short=9", "HEAD").strip()
    since = git(clone, "rev-list", "--count", "3cde6e0..HEAD").strip()  # CHANGELOG: v0.2.0 at commit 3cde6e0
    assert sh(sys.executable, "-c", code, cwd=clone).stdout.strip() == f"0.2.0.post{since}+g{head}"
    git(clone, "tag", "v0.9.0", "HEAD~1")
    assert sh(sys.executable, "-c", code, cwd=clone).stdout.strip() == f"0.9.0.post1+g{head}"
    git(clone, "tag", "v1.0.0")
    assert sh(sys.executable, "-c", code, cwd=clone).stdout.strip() == "1.0.0"
