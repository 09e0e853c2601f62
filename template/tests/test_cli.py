"""The --json output contract when several processes share one stdout (a launcher's ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# each writer prints its JSON lines through cli.emit, unbuffered like a launcher's workers may be
WRITER = """
import sys
sys.path.insert(0, sys.argv[1])
from trainer import cli
for i in range(300):
    cli.emit({"rank": int(sys.argv[2]), "i": i, "pad": "x" * 1500})
"""


def test_lines_of_concurrent_processes_never_interleave():
    """With PYTHONUNBUFFERED, print() writes a line and its newline separately, and 4 writers
    sharing a pipe mixed their lines (reproduced: 6 of 1,200 lines broken); emit never does."""
    read, write = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(ROOT), str(rank)], stdout=write, env=env)
               for rank in range(4)]
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        lines = pipe.read().decode().splitlines()
    assert [w.wait() for w in writers] == [0, 0, 0, 0]
    parsed = [json.loads(line) for line in lines]  # raises on a mixed line
    assert sorted((p["rank"], p["i"]) for p in parsed) == [(r, i) for r in range(4) for i in range(300)]


def test_emit_goes_after_earlier_prints_and_works_on_captured_stdout(capsys):
    from trainer import cli

    print("progress")
    cli.emit({"status": "completed"})
    out = capsys.readouterr().out.splitlines()
    assert out == ["progress", '{"status": "completed"}']


def test_the_contract_page_covers_every_script_and_status():
    """docs/wrapper-contract.md is the one page tools rely on: every script with --json is in it,
    and so are every run status and run file the code writes."""
    from trainer.runs.training_run_manager import STATUSES

    page = (ROOT / "docs" / "wrapper-contract.md").read_text(encoding="utf-8")
    scripts = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))
    missing = [name for name in scripts if f"`{name}`" not in page]
    assert missing == [] and len(scripts) >= 12
    assert all(status in page for status in STATUSES)
    for name in ("run-manifest.json", "status.json", "metrics.jsonl", ".lock", "final-model", ".olmo-export.json"):
        assert f"`{name}" in page, name
