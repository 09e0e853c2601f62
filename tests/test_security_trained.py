"""Attacks that need a trained run: export_model with overwrite aimed at the user's data,
the project, its parents, the allowed root and other projects; links that lead the export
out; and generate_text fed text that argv or stdin could misread, or that is too long.
Every refusal leaves every file byte-identical and nothing outside the root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import mcp_ok, unwrap
from security_helpers import fingerprint, layout, linked_out, refused

pytest.importorskip("torch")
pytest.importorskip("peft")

QUICK = {"training": {"num_stages": 1, "stage1": {"iterations": 2, "warmup_steps": 0}, "save_steps": 2,
                      "eval_steps": 2}}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = layout(tmp_path_factory.mktemp("security-trained"))
    server, root = env["server"], env["root"]
    for name in ("p", "other"):
        mcp_ok(server, "generate_fine_tuning_project", {
            "project_name": name, "base_model": {"local_path": "models/tiny-olmo2"},
            "training": {"backend": "transformers"}})
    project = root / "p"
    subprocess.run([sys.executable, "scripts/make_tiny_model.py", "--no-verify", "--json"], cwd=project, check=True,
                   capture_output=True)
    args = {"project_path": str(project)}
    mcp_ok(server, "prepare_dataset", args)
    run_id = mcp_ok(server, "configure_training_run", {**args, "run_name": "t", "override_params": QUICK})["run_id"]
    assert mcp_ok(server, "start_training", {**args, "run_id": run_id, "async_mode": False})["status"] == "completed"
    first = mcp_ok(server, "export_model", {**args, "run_id": run_id, "stage": 1, "export_format": "adapters"})
    return {**env, "project": project, "run_id": run_id, "export": Path(first["export_path"])}


def export(env, **extra) -> dict:
    return {"project_path": str(env["project"]), "run_id": env["run_id"], "stage": 1, "export_format": "adapters",
            **extra}



@pytest.mark.slow
@pytest.mark.parametrize("target", [".", "data", "data/raw", "data/processed/new-export", "config", "runs",
                                    "models", "models/tiny-olmo2", "trainer", "scripts", "tests", ".git", "emissions",
                                    "logs", "..", "{root}", "../other", "../other/data"])
def test_overwrite_never_replaces_what_is_not_an_earlier_export(env, target):
    target = target.format(root=env["root"])
    refused(env, "export_model", export(env, export_path=target, overwrite=True), "refused")


@pytest.mark.slow
def test_overwrite_refuses_a_users_folder_and_a_forged_marker(env):
    mine = env["project"] / "exports" / "mine"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("my own work")
    forged = env["project"] / "exports" / "forged"
    forged.mkdir()
    (forged / ".olmo-export.json").write_text(json.dumps({"project_root": str(env["project"])}))
    try:
        refused(env, "export_model", export(env, export_path="exports/mine", overwrite=True), "earlier export")
        refused(env, "export_model", export(env, export_path="exports/mine"), "already exists")
        refused(env, "export_model", export(env, export_path="exports/forged", overwrite=True), "earlier export")
    finally:
        for folder in (mine, forged):
            for child in folder.iterdir():
                child.unlink()
            folder.rmdir()


@pytest.mark.slow
def test_an_earlier_export_is_replaced_and_carries_its_marker(env):
    folder = env["export"]
    assert (folder / ".olmo-export.json").is_file()
    again = mcp_ok(env["server"], "export_model", export(env, export_path=str(folder), overwrite=True))
    assert again["export_path"] == str(folder) and ".olmo-export.json" not in again["files"]
    assert not list(folder.parent.glob(".tmp-*"))
    elsewhere = mcp_ok(env["server"], "export_model", export(env, export_path=str(env["root"] / "shared-export")))
    assert Path(elsewhere["export_path"]).parent == env["root"] and not list(env["root"].glob(".tmp-*"))


@pytest.mark.slow
def test_overwrite_never_deletes_what_was_put_into_an_earlier_export(env):
    """An earlier export that has since received a project, a user's file or a link is not
    replaced: only the files the export wrote may go."""
    folder = env["export"]
    placed = [folder / "notes.txt", folder / "p2" / "config" / "fine_tuning_config.yaml"]
    try:
        for path in placed:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("the user's")
            refused(env, "export_model", export(env, export_path=str(folder), overwrite=True),
                    "the export did not write", path.relative_to(folder).parts[0])
            path.unlink()
        (folder / "link").symlink_to(env["outside"])
        refused(env, "export_model", export(env, export_path=str(folder), overwrite=True), "link (not a regular")
    finally:
        (folder / "link").unlink(missing_ok=True)
        for path in placed:
            path.unlink(missing_ok=True)
        for empty in (folder / "p2" / "config", folder / "p2"):
            if empty.is_dir():
                empty.rmdir()


@pytest.mark.slow
def test_an_exports_folder_that_leads_outside_is_refused(env):
    with linked_out(env["project"] / "exports", env["outside"]) as copy:
        before = fingerprint(copy)
        refused(env, "export_model", export(env, export_format="huggingface"), "export.output_dir", "outside")
        assert fingerprint(copy) == before


@pytest.mark.slow
def test_generate_text_takes_any_text_as_text(env):
    args = {"project_path": str(env["project"]), "run_id": env["run_id"], "max_tokens": 3}
    dash = mcp_ok(env["server"], "generate_text", {**args, "prompt": "-"})
    assert dash["prompt"] == "-", "'-' is the prompt, not 'read stdin'"
    unwrap(dash["response"])
    options = mcp_ok(env["server"], "generate_text", {**args, "prompt": "--json --help", "system": "-x\x00y"})
    assert options["prompt"] == "--json --help"
    text = refused(env, "generate_text", {**args, "prompt": "word " * 4000}, "tokens", "at most 2048")
    assert "max_seq_length" in text
    refused(env, "generate_text", {**args, "prompt": "hi", "system": "s" * 20001}, "system")
