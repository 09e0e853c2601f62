"""Reading what a project's scripts write (the contract in the template's README):
status.json, run-manifest.json, metrics.jsonl, logs, and the run's lock."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

TEXT_CAP = 4000  # characters of untrusted text (logs, data) returned in one field


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def tail_lines(path: Path, count: int, block: int = 8192) -> list[str]:
    """The last `count` complete lines of a file, reading backwards from its end: the cost
    does not grow with the file (a metrics file may have a million lines)."""
    if not path.is_file():
        return []
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        end = handle.tell()
        data = b""
        position = end
        while position > 0 and data.count(b"\n") <= count:
            step = min(block, position)
            position -= step
            handle.seek(position)
            data = handle.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines()
    if position > 0:
        lines = lines[1:]  # the first one may be cut
    return lines[-count:]


def last_metrics(path: Path, lines: int = 200) -> dict[str, Any]:
    """The newest value of each metric among the last reports (train and validation
    reports alternate, so both are found in the tail)."""
    found: dict[str, Any] = {}
    for line in reversed(tail_lines(path, lines)):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written right now
        for key, value in record.items():
            if value is not None and key not in found:
                found[key] = value
    return found


def lock_held(run_dir: Path) -> bool:
    """A live trainer holds an exclusive flock on runs/<id>/.lock; the kernel drops it when
    the process dies, so this tells a running run from a dead one, even after a restart."""
    path = run_dir / ".lock"
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def untrusted(text: str, cap: int = TEXT_CAP) -> str:
    """Text from logs, data or a model, delimited and capped: content, never instructions."""
    if len(text) > cap:
        text = "[... cut ...]\n" + text[-cap:]
    return f"<<<untrusted-text\n{text}\nuntrusted-text>>>"
