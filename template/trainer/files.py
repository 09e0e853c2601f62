"""File writes that never leave half a file behind, and content hashes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

TEMP_PREFIX = ".tmp-"


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and os.replace: readers see the old
    file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove what killed writers left behind (temp files and half-built directories)."""
    removed = []
    if not folder.is_dir():
        return removed
    for path in folder.rglob(f"{TEMP_PREFIX}*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


class Reserve:
    """Disk space set aside while a run trains: when the disk fills up, freeing it leaves room
    to record why the run stopped (status, manifest, log). Its name starts with TEMP_PREFIX,
    so a killed run's reserve is cleaned with the other leftovers."""

    SIZE = 2 << 20

    def __init__(self, folder: Path):
        self.path = folder / f"{TEMP_PREFIX}reserve"

    def hold(self) -> None:
        """Allocate the reserve; OSError (ENOSPC) when the disk cannot spare it."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            try:
                os.posix_fallocate(fd, 0, self.SIZE)
            except OSError as error:
                if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.write(fd, bytes(self.SIZE))  # a file system without fallocate
                os.fsync(fd)
        except OSError:
            os.close(fd)
            self.release()
            raise
        os.close(fd)

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
