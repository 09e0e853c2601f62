"""Attack cases against the MCP server: path escapes ('..', absolute paths, a sibling that
shares the allowed root's prefix, a symlink pointing out), hostile names, and the
client's roots narrowing the server's. Everything is refused and nothing is created
outside the allowed roots."""

from __future__ import annotations

import anyio
import pytest
from mcp import Client, types

from conftest import mcp_error, mcp_ok, snapshot
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "projects"
    sibling = tmp_path / "projects-evil"  # shares the root's string prefix
    outside = tmp_path / "outside"
    for folder in (root, sibling, outside):
        folder.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    return {"tmp": tmp_path, "root": root, "sibling": sibling, "outside": outside,
            "server": build_server(Settings(output_dir=root, allowed_roots=[root]))}


@pytest.mark.parametrize("output_dir", ["..", "../outside", "{outside}", "{sibling}", "{root}/link",
                                        "{root}/../outside", "~", "/etc"])
def test_paths_outside_the_roots_are_refused(layout, output_dir):
    value = output_dir.format(**{k: str(v) for k, v in layout.items() if k != "server"})
    before = snapshot(layout["tmp"])
    text = mcp_error(layout["server"], "generate_fine_tuning_project", {"project_name": "p", "output_dir": value})
    assert "outside the allowed roots" in text
    assert snapshot(layout["tmp"]) == before, "nothing may be created anywhere"
    assert not any(layout["outside"].iterdir()) and not any(layout["sibling"].iterdir())


@pytest.mark.parametrize("name", ["a;touch pwned", "$(touch pwned)", "--help", "-rf", "../escape", "a/b", ".hidden",
                                  "name with space", "`id`", "x" * 81, ""])
def test_hostile_project_names_are_refused(layout, name):
    text = mcp_error(layout["server"], "generate_fine_tuning_project", {"project_name": name})
    assert "is not allowed" in text
    assert list(layout["root"].iterdir()) == [layout["root"] / "link"]
    assert not list(layout["tmp"].rglob("pwned"))


def test_run_ids_and_data_paths_cannot_escape(layout):
    server, root, outside = layout["server"], layout["root"], layout["outside"]
    project = mcp_ok(server, "generate_fine_tuning_project", {"project_name": "p"})["project_path"]
    for run_id in ("../../outside", "/etc/passwd", "--resume", "a;b"):
        assert "is not allowed" in mcp_error(server, "monitor_training_progress",
                                             {"project_path": project, "run_id": run_id})
    (outside / "train.jsonl").write_text('{"messages": []}\n')
    # relative paths are the project's: ../../outside leaves root/p and then the root
    for path in (str(outside / "train.jsonl"), f"{root}/link/train.jsonl", "../../outside/train.jsonl"):
        text = mcp_error(server, "configure_training_run", {"project_path": project, "run_name": "r",
                                                            "training_data": {"train_dataset": path}})
        assert "outside the allowed roots" in text
        text = mcp_error(server, "prepare_dataset", {"project_path": project, "input_files": [path]})
        assert "outside the allowed roots" in text
    for tool in ("list_runs", "update_project"):
        assert "outside the allowed roots" in mcp_error(server, tool, {"project_path": str(layout["sibling"])})
    assert not list((root / "p" / "runs").glob("r-*"))


@pytest.mark.parametrize("plant", ["link", "gitfile", "objects", "worktree"])
def test_git_never_writes_outside_through_a_planted_repository(layout, plant):
    """commit_project and update_project on a project whose .git leads outside the roots (a link, a
    gitfile, a linked objects folder, core.worktree): refused, and nothing outside changes."""
    import subprocess

    server, root, outside = layout["server"], layout["root"], layout["outside"]
    project = root / "p"
    mcp_ok(server, "generate_fine_tuning_project", {"project_name": "p", "git_init": plant != "gitfile"})
    elsewhere = outside / "repo"
    subprocess.run(["git", "init", "-q", str(elsewhere)], check=True)
    if plant == "link":
        import shutil

        shutil.rmtree(project / ".git")
        (project / ".git").symlink_to(elsewhere / ".git", target_is_directory=True)
    elif plant == "gitfile":
        (project / ".git").write_text(f"gitdir: {elsewhere / '.git'}\n")
    elif plant == "objects":
        import shutil

        shutil.rmtree(project / ".git" / "objects")
        (project / ".git" / "objects").symlink_to(elsewhere / ".git" / "objects", target_is_directory=True)
    else:
        subprocess.run(["git", "config", "core.worktree", str(elsewhere)], cwd=project, check=True)
    before = snapshot(outside)
    for tool in ("commit_project", "update_project"):
        text = mcp_error(server, tool, {"project_path": str(project)})
        assert "only in a repository of the project's own" in text, text
    assert snapshot(outside) == before, "nothing outside the roots was written"


def test_git_runs_nothing_the_project_configures(layout):
    """A project whose git configuration names commands (a signing program, a clean filter named by
    .gitattributes, an fsmonitor, an external diff, a hook): commit_project and update_project (copier's
    own git calls and the migrations' included) run none of them."""
    import subprocess

    server, root, outside = layout["server"], layout["root"], layout["outside"]
    project = root / "p"
    mcp_ok(server, "generate_fine_tuning_project", {"project_name": "p"})
    marker = outside / "ran"
    command = f"touch {marker}; cat"
    for key, value in (("commit.gpgsign", "true"), ("gpg.program", command), ("filter.x.clean", command),
                       ("filter.x.process", command), ("core.fsmonitor", command), ("diff.external", command),
                       ("core.hooksPath", str(outside))):
        subprocess.run(["git", "config", key, value], cwd=project, check=True)
    (outside / "post-index-change").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (outside / "post-index-change").chmod(0o755)
    (project / ".gitattributes").write_text("* filter=x\n")
    (project / "notes.md").write_text("ours\n")
    assert mcp_ok(server, "commit_project", {"project_path": str(project)})["committed"]
    out = mcp_ok(server, "update_project", {"project_path": str(project)})
    assert out["success"] and out["conflicts"] == [], out
    assert not marker.exists(), "git ran a command the project configured"


@pytest.mark.parametrize("linked", ["stdout", "stderr", "exit.json"])
def test_job_files_are_never_read_or_written_through_a_link(layout, linked):
    """A job folder whose stdout (a forged result), stderr (a secret) or exit record links outside:
    wait_for_job and cancel_job refuse it and reveal nothing of the target."""
    import json

    server, root, outside = layout["server"], layout["root"], layout["outside"]
    project = root / "p"
    mcp_ok(server, "generate_fine_tuning_project", {"project_name": "p"})
    job_id = "evaluate_model-20261203-101620-3fa9c2"
    folder = project / ".tmp" / "jobs" / job_id
    folder.mkdir(parents=True)
    record = {"job_id": job_id, "tool": "evaluate_model", "script": "evaluate.py", "pid": 999999, "started": "1",
              "started_at": "2026-12-03T10:16:20+00:00"}
    (folder / "job.json").write_text(json.dumps(record))
    for name, text in (("stdout", '{"success": true, "metrics": {"forged": 1}}\n'), ("stderr", "SECRET-LINE\n"),
                       ("exit.json", '{"returncode": 0, "ended": "exited"}')):
        target = outside / name
        target.write_text(text)
        if name == linked:
            (folder / name).symlink_to(target)
        else:
            (folder / name).write_text(text)
    before = snapshot(outside)
    for tool in ("wait_for_job", "cancel_job"):
        text = mcp_error(server, tool, {"project_path": str(project), "job_id": job_id})
        assert f"{linked} is a link" in text and "SECRET" not in text and "forged" not in text, text
    assert snapshot(outside) == before


def test_client_roots_narrow_the_servers(layout):
    root = layout["root"]
    (root / "mine").mkdir()
    (root / "theirs").mkdir()

    async def roots(context):
        return types.ListRootsResult(roots=[types.Root(uri=f"file://{root / 'mine'}", name="mine")])

    client = {"list_roots_callback": roots, "mode": "legacy"}  # roots are a handshake-era capability
    text = mcp_error(layout["server"], "generate_fine_tuning_project",
                     {"project_name": "p", "output_dir": str(root / "theirs")}, **client)
    assert "outside the client's roots" in text
    out = mcp_ok(layout["server"], "generate_fine_tuning_project",
                 {"project_name": "p", "output_dir": str(root / "mine")}, **client)
    assert out["project_path"] == str(root / "mine" / "p")


def test_resources_refuse_traversal(layout):
    from mcp import MCPError

    server = layout["server"]
    mcp_ok(server, "generate_fine_tuning_project", {"project_name": "p"})

    async def read(uri: str) -> str:
        async with Client(server) as client:
            try:
                await client.read_resource(uri)
            except MCPError as error:
                return str(error)
        return "read"

    assert "Unknown resource" in anyio.run(read, "runs://p/..%2F..%2Foutside/manifest")
    assert "unknown run id 'nope'" in anyio.run(read, "runs://p/nope/manifest")
    assert "Unknown resource" in anyio.run(read, "runs://..%2Foutside/r/manifest")
    assert "is not allowed" in anyio.run(read, "runs://a;b/r/manifest")
