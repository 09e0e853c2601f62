"""Release vX.Y.Z: every step, in order, each checked; nothing is tagged before the checks pass.

    python scripts/release.py 0.3.0 [--dist dist]

1. The checkout is clean and CHANGELOG.md has a `## [X.Y.Z]` section, newer than the last release.
2. An update from the previous release works: a project generated from its archive
   (tests/releases/vA.B.C.tar.gz, the newest below X.Y.Z), edited in a trainer module and its
   config, committed, is updated by copier (the template's migrations and update guard included)
   to this tree; the edits are in the result or reported as conflicts, and the guard ran.
3. HEAD is tagged vX.Y.Z (annotated), and the wheel is built into --dist; its version must be
   X.Y.Z and it must carry the template.
4. After the tag, one commit: the release archived as tests/releases/vX.Y.Z.tar.gz (the next
   release's step 2 starts from it) and its CHANGELOG heading naming the release's commit (a
   clone without tags versions itself from it: mcp_wrapper/checkout_version.py).

Then push main and the tag: the release workflow builds, tests and publishes from the tag.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHIVES = ROOT / "tests" / "releases"
PARTS = ("copier.yml", "template", "includes", "hooks")
VERSION = re.compile(r"\d+\.\d+\.\d+")


IDENTITY = {"GIT_AUTHOR_NAME": "release", "GIT_AUTHOR_EMAIL": "release@localhost", "GIT_COMMITTER_NAME": "release",
            "GIT_COMMITTER_EMAIL": "release@localhost"}


def run(*argv: str, cwd: Path = ROOT) -> str:
    """A command that must succeed (git commits in the scratch repositories need an identity)."""
    env = {**IDENTITY, **os.environ} if cwd != ROOT else None
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"release: `{' '.join(argv)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def previous_archive(version: str) -> Path:
    found = sorted((key(m[1]), path) for path in ARCHIVES.glob("v*.tar.gz")
                   if (m := re.fullmatch(r"v(\d+\.\d+\.\d+)\.tar\.gz", path.name)) and key(m[1]) < key(version))
    if not found:
        raise SystemExit(f"release: no archive of a release before {version} in {ARCHIVES}")
    return found[-1][1]


def check_update(archive: Path, version: str) -> list[str]:
    """Step 2, in a scratch folder: the previous release -> this tree, by copier update."""
    from copier import run_copy, run_update

    previous = archive.name.removesuffix(".tar.gz")
    with tempfile.TemporaryDirectory(prefix="release-check.") as scratch:
        repo, project = Path(scratch) / "template", Path(scratch) / "project"
        repo.mkdir()
        with tarfile.open(archive) as tar:
            tar.extractall(repo, filter="data")
        run("git", "init", "-q", "-b", "main", cwd=repo)
        run("git", "add", "-A", cwd=repo)
        run("git", "commit", "-q", "-m", previous, cwd=repo)
        run("git", "tag", previous, cwd=repo)
        for part in PARTS:
            (shutil.rmtree if (repo / part).is_dir() else Path.unlink)(repo / part)
            (shutil.copytree if (ROOT / part).is_dir() else shutil.copy2)(ROOT / part, repo / part)
        run("git", "add", "-A", cwd=repo)
        run("git", "commit", "-q", "-m", f"v{version}", cwd=repo)
        run("git", "tag", f"v{version}", cwd=repo)
        run_copy(str(repo), str(project), data={"project_name": "release-check"}, vcs_ref=previous, defaults=True,
                 quiet=True, unsafe=True)
        config = project / "config" / "fine_tuning_config.yaml"
        config.write_text(config.read_text().replace("  rank: 8\n", "  rank: 4  # release check\n"))
        module = next(path for path in (project / "trainer").rglob("evaluation.py"))
        module.write_text(module.read_text() + "\n\ndef release_check():  # release check\n    return True\n")
        run("git", "init", "-q", "-b", "main", cwd=project)
        run("git", "add", "-A", cwd=project)
        run("git", "commit", "-q", "-m", "edited", cwd=project)
        report_file = Path(run("git", "rev-parse", "--absolute-git-dir", cwd=project).strip()) / \
            "olmo-update-report.json"
        run_update(str(project), defaults=True, overwrite=True, quiet=True, unsafe=True, skip_answered=True,
                   vcs_ref=f"v{version}")
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        if "guard" not in report or "error" in report["guard"]:
            raise SystemExit(f"release: the update guard did not check the update: {report}")
        unmerged = set(run("git", "diff", "--name-only", "--diff-filter=U", cwd=project).split())
        carried = [path for path in project.rglob("*.py") if "def release_check():  # release check" in
                   path.read_text()]
        if "  rank: 4  # release check\n" not in config.read_text() or not carried:
            raise SystemExit("release: an edit of the check's project did not survive the update")
        marked = [p.relative_to(project).as_posix() for p in carried if "<<<<<<<" in p.read_text()]
        if set(marked) - unmerged:
            raise SystemExit(f"release: conflict markers in files not reported as conflicts: {marked}")
        return [f"{previous} -> v{version}: edits kept", *(f"conflict: {name}" for name in sorted(unmerged))]


def build_wheel(version: str, dist: Path) -> Path:
    run(sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT))
    wheel = dist / f"olmo_fine_tuning_mcp-{version}-py3-none-any.whl"
    if not wheel.is_file():
        raise SystemExit(f"release: the wheel is not {wheel.name}: {sorted(p.name for p in dist.iterdir())}")
    if "mcp_wrapper/bundled_template/copier.yml" not in zipfile.ZipFile(wheel).namelist():
        raise SystemExit(f"release: {wheel.name} does not carry the template")
    return wheel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("version", help="X.Y.Z (the tag is vX.Y.Z)")
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="where the wheel goes")
    args = parser.parse_args(argv)
    version = args.version.removeprefix("v")
    if not VERSION.fullmatch(version):
        raise SystemExit(f"release: {args.version!r} is not X.Y.Z")
    if run("git", "status", "--porcelain"):
        raise SystemExit("release: the checkout has uncommitted changes")
    if run("git", "tag", "--list", f"v{version}"):
        raise SystemExit(f"release: v{version} is tagged already")
    if not re.search(rf"^## \[{re.escape(version)}\]", (ROOT / "CHANGELOG.md").read_text(), re.M):
        raise SystemExit(f"release: CHANGELOG.md has no `## [{version}]` section")
    for line in check_update(previous_archive(version), version):
        print(f"release: update check: {line}")
    head = run("git", "rev-parse", "--short=9", "HEAD").strip()
    run("git", "tag", "-a", f"v{version}", "-m", f"olmo-fine-tuning-mcp {version}")
    try:
        wheel = build_wheel(version, args.dist)
    except SystemExit:
        run("git", "tag", "-d", f"v{version}")  # nothing is tagged that did not pass
        raise
    # After the tag: the archive the next release's check starts from, and the CHANGELOG heading
    # naming the release's commit (a clone without tags versions itself from it)
    run("git", "archive", "--format=tar.gz", "-o", str(ARCHIVES / f"v{version}.tar.gz"), f"v{version}", *PARTS)
    changelog = ROOT / "CHANGELOG.md"
    changelog.write_text(re.sub(rf"^## \[{re.escape(version)}\][^\n]*", f"## [{version}] - {date.today()} (tag "
                                f"`v{version}` at commit {head})", changelog.read_text(), count=1, flags=re.M))
    run("git", "add", str(ARCHIVES / f"v{version}.tar.gz"), str(changelog))
    run("git", "commit", "-q", "-m", f"Release v{version}: its archive for the next release's update check, and "
        "its commit in CHANGELOG.md")
    print(f"release: v{version} tagged; {wheel}; now: git push origin main v{version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
