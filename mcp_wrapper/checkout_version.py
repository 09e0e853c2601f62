"""The package's version, read from its git checkout when it is built (hatch's `code` source).

- A release: the tag at HEAD, vX.Y.Z -> X.Y.Z (X.Y.Z+gHASH.dirty with uncommitted changes).
- Past a release: X.Y.Z.postN+gHASH, N commits after the last release, which is the newest vX.Y.Z
  tag, or in a clone without tags the newest release CHANGELOG.md names with its commit
  ("## [0.2.0] - ... tag `v0.2.0` at commit 3cde6e0"). This is how copier numbers a commit after a
  tag too, so both say which release the code follows.
- An sdist (no git): the version its PKG-INFO was built with.

Standard library only: hatch runs it before anything is installed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE_TAG = re.compile(r"v(\d+\.\d+\.\d+)")
CHANGELOG_RELEASE = re.compile(r"^## \[(\d+\.\d+\.\d+)\][^\n]*?\bat commit ([0-9a-f]{7,40})", re.M)


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def last_release() -> tuple[str, str] | None:
    """(X.Y.Z, commit) of the newest release reachable from HEAD: by tag, else by the CHANGELOG."""
    described = _git("describe", "--tags", "--abbrev=0", "--match", "v[0-9]*.[0-9]*.[0-9]*")
    if described and RELEASE_TAG.fullmatch(described):
        return RELEASE_TAG.fullmatch(described)[1], described
    changelog = ROOT / "CHANGELOG.md"
    for version, commit in CHANGELOG_RELEASE.findall(changelog.read_text() if changelog.is_file() else ""):
        if _git("merge-base", "--is-ancestor", commit, "HEAD") is not None:
            return version, commit
    return None


def checkout_version() -> str:
    top = _git("rev-parse", "--show-toplevel")
    head = _git("rev-parse", "--short=9", "HEAD") if top and Path(top).resolve() == ROOT else None
    if head is None:  # not a checkout of its own (an unpacked sdist, perhaps inside another repository)
        pkg_info = ROOT / "PKG-INFO"
        found = re.search(r"^Version: (\S+)", pkg_info.read_text(), re.M) if pkg_info.is_file() else None
        return found[1] if found else "0.0.0"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    release = last_release()
    if release is None:
        return f"0.0.0.post{_git('rev-list', '--count', 'HEAD')}+g{head}" + (".dirty" if dirty else "")
    version, ref = release
    distance = int(_git("rev-list", "--count", f"{ref}..HEAD") or 0)
    if distance == 0:  # uncommitted changes: the commit they sit on stays readable (release_ref needs it)
        return version + (f"+g{head}.dirty" if dirty else "")
    return f"{version}.post{distance}+g{head}" + (".dirty" if dirty else "")


__version__ = checkout_version()
