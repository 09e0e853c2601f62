"""update_project end to end: a project generated through the tool from v0.1.0 of a
temporary template clone, edited and committed by its user, updated to v0.2.0 (which
renames a config key with a migration) through the tool."""

from __future__ import annotations

import pytest

from conftest import mcp_error, mcp_ok
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings
from test_update import git, release_v020, replace, template  # noqa: F401  (template is a fixture)


@pytest.mark.slow
def test_update_through_the_tool(tmp_path, template):  # noqa: F811
    root = tmp_path / "projects"
    server = build_server(Settings(template=str(template), output_dir=root, trusted_templates=[str(template)]))
    out = mcp_ok(server, "generate_fine_tuning_project", {"project_name": "kept", "lora": {"rank": 4}})
    assert out["template_version"] == "v0.1.0"
    project = root / "kept"
    assert "nothing to commit" in git(project, "status")
    replace(project / "config" / "fine_tuning_config.yaml", "  dropout: 0.05\n", "  dropout: 0.1  # mine\n")
    (project / ".env").write_text("OLMO_TRAINING__SAVE_STEPS=20\n")
    git(project, "commit", "-qam", "my edit")

    current = mcp_ok(server, "update_project", {"project_path": str(project)})
    assert current["new_version"] == "v0.1.0" and current["changed_files"] == []
    assert current["message"] == "already at the newest template version"

    release_v020(template)
    out = mcp_ok(server, "update_project", {"project_path": str(project)})
    assert (out["previous_version"], out["new_version"]) == ("v0.1.0", "v0.2.0")
    assert "config/fine_tuning_config.yaml" in out["changed_files"] and out["conflicts"] == []
    text = (project / "config" / "fine_tuning_config.yaml").read_text()
    assert "checkpoint_steps: 50" in text and "  dropout: 0.1  # mine\n" in text and "rank: 4" in text
    assert (project / ".env").read_text() == "OLMO_TRAINING__CHECKPOINT_STEPS=20\n", "the migration ran"


@pytest.mark.slow
def test_an_untrusted_template_cannot_run_migrations(tmp_path, template):  # noqa: F811
    root = tmp_path / "projects"
    server = build_server(Settings(template=str(template), output_dir=root))
    mcp_ok(server, "generate_fine_tuning_project", {"project_name": "careful"})
    release_v020(template)
    text = mcp_error(server, "update_project", {"project_path": str(root / "careful")})
    assert "OLMO_TRUSTED_TEMPLATES" in text
    assert "save_steps" in (root / "careful" / "config" / "fine_tuning_config.yaml").read_text()
