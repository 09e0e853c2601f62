"""Reading what a project's scripts write (the contract in the template's README):
status.json, run-manifest.json, metrics.jsonl, logs, and the run's lock.

Every read is bounded: a JSON file is read up to a size limit and a tail from at most
TAIL_BYTES before the end, so a monitor call costs the same whatever the files hold (a
20 MB last line, a gigabyte status file). Text from logs, data, models and scripts comes
back inside markers with a random tag made for that response, so it cannot close its
block and speak as the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Optional

TEXT_CAP = 4000  # characters of untrusted text (logs, data) returned in one field
JSON_LIMIT = 1 << 20  # bytes of a status or manifest file (a real one is a few KB)
TAIL_BYTES = 256 << 10  # bytes read from the end of a log or metrics file


class FileProblem(ValueError):
    """A run file that cannot be read as what it should be; the message names the file."""


def open_regular(path: Path):
    """A regular file opened for reading; a FIFO or device (which could block or never end) is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path.name} is not a regular file")
    return os.fdopen(fd, "rb")


def read_bounded(path: Path, limit: int) -> bytes:
    with open_regular(path) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise FileProblem(f"{path.name} is larger than {limit >> 20} MB, which no run writes")
    return data


def read_json(path: Path, limit: int = JSON_LIMIT) -> Any:
    try:
        return json.loads(read_bounded(path, limit).decode("utf-8"))
    except FileNotFoundError:
        raise FileProblem(f"{path.name} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FileProblem(f"{path.name} is not valid JSON ({error})") from None
    except OSError as error:
        raise FileProblem(f"{path.name} cannot be read ({error.strerror or error})") from None


def read_object(path: Path, limit: int = JSON_LIMIT) -> dict[str, Any]:
    data = read_json(path, limit)
    if not isinstance(data, dict):
        raise FileProblem(f"{path.name} holds a JSON {type(data).__name__}, not an object")
    return data


def tail_lines(path: Path, count: int, max_bytes: int = TAIL_BYTES) -> list[str]:
    """The last `count` complete lines within the last `max_bytes` of a file: the cost does
    not grow with the file or with its lines (a line longer than that is left out)."""
    try:
        with open_regular(path) as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            start = max(0, end - max_bytes)
            handle.seek(start)
            data = handle.read(end - start)
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # the first one is cut
    return lines[-count:]


def last_result(lines: list[str]) -> Optional[dict[str, Any]]:
    """A script's --json result: the last line that is a JSON object (lines being written, or
    not JSON, are passed over)."""
    for line in reversed(lines):
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(line)
                if isinstance(value, dict):
                    return value
    return None


def finite_or_name(value: Any) -> Any:
    """Non-finite numbers as 'nan', 'inf' or '-inf' (JSON has no such numbers, and null would hide them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def last_metrics(path: Path, lines: int = 200) -> dict[str, Any]:
    """The newest value of each metric among the last reports (train and validation
    reports alternate, so both are found in the tail); lines that are not JSON objects
    (a line being written, a corrupt one) are passed over."""
    found: dict[str, Any] = {}
    for line in reversed(tail_lines(path, lines)):
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if not isinstance(record, dict):
            continue
        for key, value in record.items():
            if value is not None and key not in found:
                found[key] = finite_or_name(value)
    return found


def lock_held(run_dir: Path) -> bool:
    """A live trainer holds an exclusive flock on runs/<id>/.lock; the kernel drops it when
    the process dies, so this tells a running run from a dead one, even after a restart."""
    path = run_dir / ".lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
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
    """Text from logs, data, scripts or a model, capped and delimited: content, never
    instructions. The markers carry a tag drawn for this text alone, which the text
    cannot know in advance, so it cannot close the block early."""
    if len(text) > cap:
        text = "[... cut ...]\n" + text[-cap:]
    tag = secrets.token_hex(8)
    while tag in text:  # astronomically unlikely; never let the text hold its own end marker
        tag = secrets.token_hex(8)
    return f"<<<untrusted-text {tag}\n{text}\nuntrusted-text {tag}>>>"
