"""Property tests (hypothesis) of the validators every tool argument passes through: names
match in full or are refused, and a path is accepted only when it resolves inside the
roots, whatever '..', '.', '~', links, separators, control characters or lengths it holds."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp.server.mcpserver.exceptions import ToolError

from mcp_wrapper.paths import NAME_MAX, PATH_MAX, check_name, resolve

NAME_CHARS = string.ascii_letters + string.digits + "._-"
SAFE = settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


@SAFE
@given(st.text(max_size=120))
def test_a_name_is_accepted_only_when_it_is_safe(value):
    try:
        check_name(value, "project_name")
    except ToolError as error:
        assert "project_name" in str(error)
        return
    assert 1 <= len(value) <= 80 and value[0].isascii() and value[0].isalnum()
    assert set(value) <= set(NAME_CHARS) and ".." not in value
    assert "\n" not in value and "/" not in value and not value.startswith("-")


@SAFE
@given(st.text(alphabet=NAME_CHARS, min_size=1, max_size=80))
def test_every_safe_name_is_accepted(value):
    if value[0].isalnum() and ".." not in value:
        assert check_name(value, "run_id") == value


@pytest.fixture
def layout(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (tmp_path / "root-evil").mkdir()
    (tmp_path / "outside").mkdir()
    (root / "out").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "in").symlink_to(root / "a", target_is_directory=True)
    return tmp_path, root


PARTS = st.sampled_from(["a", "b", "..", ".", "out", "in", "root", "root-evil", "outside", "~", "", "x" * 300,
                         "new", "a\nb", "\x00", "-rf"])


@SAFE
@given(parts=st.lists(PARTS, max_size=8), absolute=st.booleans())
def test_a_path_is_accepted_only_inside_the_root(layout, parts, absolute):
    tmp, root = layout
    value = ("/" if absolute else "") + "/".join(parts)
    if absolute:
        value = str(tmp) + value
    try:
        path = resolve(value, [root], None, root / "a", "export_path")
    except ToolError as error:
        assert "export_path" in str(error)
        return
    assert path == path.resolve() and (path == root or path.is_relative_to(root))
    assert "\x00" not in value and len(os.fsencode(value)) <= PATH_MAX
    assert all(len(os.fsencode(part)) <= NAME_MAX for part in value.split("/"))
    assert not Path(value).expanduser().is_absolute() or value.startswith(str(tmp))
