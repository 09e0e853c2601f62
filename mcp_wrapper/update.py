"""update_project: copier update, checked before it is called a success, and undone when it fails.

The template's migrations do the work inside copier (hooks/: the layout move, the update guard
that finds every edit of the user's in the result or records it as a conflict) and leave their
report in the project's git folder; this module reads that report into the tool's result. When
the version updated to is older than the guard, the server runs its own copy of the guard. A
failed update, or one the guard could not check, is rolled back: the project's files, index
and history are as they were, and nothing was recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import yaml
from copier import run_update
from mcp.server.mcpserver.exceptions import ToolError

from mcp_wrapper.files import FileProblem, lock_held, read_object, untrusted
from mcp_wrapper.git import changed_files, git, neutral_environment, own_repository, unmerged_files
from mcp_wrapper.jobs import _alive
from mcp_wrapper.models import UpdateResult
from mcp_wrapper.release import record_source
from mcp_wrapper.settings import BUNDLED_TEMPLATE, is_git_source

REPORT = "olmo-update-report.json"  # hooks/update_report.py NAME; tests/test_update_guard.py keeps them equal
KEPT = "olmo-update-kept"  # hooks/update_guard.py KEPT, likewise
GUARD = BUNDLED_TEMPLATE / "hooks" / "update_guard.py"
GUARD_TIMEOUT = 600
RELEASE_TAG = re.compile(r"v\d+(\.\d+)*|\d+\.\d+(\.\d+)*")  # not a commit id of digits only
# Folders of the project's own artefacts: a rollback never deletes an ignored file there (a job may
# write one while the update runs); the update itself writes only the template's files there.
ARTEFACTS = {"runs", "models", "exports", "emissions", "logs", "mlruns", "wandb", "data", "upload_staging", ".tmp",
             ".venv"}


class UpdateRefused(Exception):
    """The update ran but its result is not one to keep."""


def version_note(source: str, commit: Optional[str], project: Path) -> Optional[str]:
    """What the recorded version means for later updates, when it is not a release tag; a commit
    that only a temporary copy of a dirty template had is replaced by the template's HEAD."""
    if not commit or RELEASE_TAG.fullmatch(commit):
        return None
    path = Path(source).expanduser()
    if path.is_dir() and is_git_source(source):
        found = subprocess.run(["git", "-C", str(path), "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if found.returncode != 0:
            head = subprocess.run(["git", "-C", str(path), "describe", "--tags", "--always"], capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, check=True).stdout.strip()
            answers = yaml.safe_load((project / ".copier-answers.yml").read_text()) or {}
            record_source(project, str(answers.get("_src_path") or source), head)
            return (f"the template {source} had uncommitted changes: copier rendered them from a temporary commit "
                    f"({commit}) that the template repository does not have, so the project records {head}, its "
                    "last commit. A later update merges from that commit: the uncommitted changes the project got "
                    "count as edits of the project's own. Commit and tag the template to avoid this.")
    return (f"the project records {commit}, an untagged commit of {source}: a later update finds it while that "
            "repository keeps the commit; the template's migrations run by what the project holds, not by version "
            "numbers, so updating between untagged commits is safe")


def report_lines(report: dict[str, Any]) -> list[str]:
    """The migrations' report, a line each: what moved, what was carried, what needs the user."""
    lines = []
    for old, entry in sorted(report.get("layout", {}).get("moves", {}).items()):
        done = "your change carried" if entry["state"] == "carried" else "conflict to resolve"
        lines.append(f"moved {old} -> {entry['to']}: {done}")
    lines += [f"needs you: {line}" for line in report.get("layout", {}).get("needs_you", [])]
    lines += [f"rewritten by a migration: {name}" for name in report.get("rewritten", [])]
    for kind, entries in report.get("guard", {}).items():
        if kind != "error":
            lines += [f"{kind.replace('_', ' ')}: {line}" for line in entries]
    return lines


class UpdateTools:
    def update(self, project_value: str, template_version: Optional[str],
               client_roots: Optional[list[Path]]) -> UpdateResult:
        project = self.path(project_value, "project_path", client_roots)
        answers_file = project / ".copier-answers.yml"
        if not answers_file.is_file():
            raise ToolError(f"{project} has no .copier-answers.yml, so it was not generated by a template")
        if not (project / ".git").exists():
            raise ToolError(f"{project} is not a git repository; copier update needs one (commit_project makes it "
                            "one and commits the current state)")
        own_repository(project)
        self._refuse_while_busy(project)
        dirty = git(project, "status", "--porcelain").rstrip("\n")  # each line keeps its 2-letter status
        if dirty.strip():
            shown = "\n".join(dirty.splitlines()[:20])  # file names are the user's (or a dataset's) text
            raise ToolError(f"{project} has uncommitted changes; commit them first with commit_project (copier update "
                            f"merges into a clean git tree):\n" + untrusted(shown))
        before = yaml.safe_load(answers_file.read_text()) or {}
        source = str(before.get("_src_path") or self.settings.template)
        record = None if is_git_source(source) else self._git_source(project, source, before)
        source = record or source
        head = git(project, "rev-parse", "HEAD").strip()
        present, folders = self._listing(project), self._folders(project)
        report_file = Path(git(project, "rev-parse", "--absolute-git-dir").strip()) / REPORT
        report_file.unlink(missing_ok=True)
        try:
            if record:  # copier reads the source from the answers of a clean tree: a commit, undone below
                record_source(project, record, before["_commit"])
                git(project, "commit", "-q", "-m", "Record the template's git source for copier update",
                    ".copier-answers.yml")
            with contextlib.redirect_stdout(sys.stderr), neutral_environment(project):
                run_update(str(project), defaults=True, overwrite=True, quiet=True, skip_answered=True,
                           unsafe=self.settings.trusted(source), vcs_ref=template_version or self.settings.template_ref)
            report = self._checked(project, report_file, source, str(before.get("_commit")))
            if record:  # HEAD as it was: the recorded source is part of the update's change to review
                git(project, "update-ref", "HEAD", head)
        except Exception as error:
            self._roll_back(project, head, present, folders, report_file)
            hint = (" (the template runs migrations; add its source to OLMO_TRUSTED_TEMPLATES to allow them)"
                    if "unsafe" in str(error).lower() else "")
            what = "the update was refused" if isinstance(error, UpdateRefused) else "copier update failed"
            raise ToolError(f"{what}: {type(error).__name__}: {error}{hint}. Nothing was changed or recorded: the "
                            f"project is as it was (commit {head[:12]}, clean)") from None
        finally:
            report_file.unlink(missing_ok=True)
            shutil.rmtree(report_file.with_name(KEPT), ignore_errors=True)
        after = yaml.safe_load(answers_file.read_text()) or {}
        changed = changed_files(project)
        conflicts = sorted(set(unmerged_files(project))
                           | {name.removesuffix(".rej") for name in changed if name.endswith(".rej")}
                           | {name for name in changed if (project / name).is_file()
                              and "<<<<<<< before updating" in (project / name).read_text(errors="replace")})
        note = version_note(source, after.get("_commit"), project)
        after = yaml.safe_load(answers_file.read_text()) or {}
        same = before.get("_commit") == after.get("_commit")
        return UpdateResult(
            success=True, project_path=str(project), previous_version=before.get("_commit"),
            new_version=after.get("_commit"), changed_files=changed, conflicts=conflicts,
            report=report_lines(report), version_note=note,
            message=("already at the newest template version" if same and not changed else
                     f"updated from {before.get('_commit')} to {after.get('_commit')}; review and commit the changes"
                     + ("; resolve the conflicts first (git status lists them)" if conflicts else "")),
        )

    def _checked(self, project: Path, report_file: Path, source: str, old_commit: str) -> dict[str, Any]:
        """The migrations' report, once the update guard has checked the result (the server's own
        copy of it runs when the version updated to has none)."""
        report = json.loads(report_file.read_text()) if report_file.is_file() else {}
        if "guard" not in report:
            proc = subprocess.run([sys.executable, str(GUARD), "--template", source, "--from", old_commit, "--project",
                                   str(project)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=GUARD_TIMEOUT, check=False)
            report = json.loads(report_file.read_text()) if report_file.is_file() else {}
            if proc.returncode != 0 and "error" not in report.get("guard", {}):
                raise UpdateRefused("the update guard failed:\n" + untrusted(proc.stderr.strip()[-1000:]))
        if "error" in report.get("guard", {"error": "it did not run"}):
            raise UpdateRefused("the update guard could not check that your edits survived: "
                                + untrusted(str(report.get("guard", {}).get("error", "it did not run"))))
        return report

    @staticmethod
    def _refuse_while_busy(project: Path) -> None:
        """An update rewrites the code a running training or job runs, and its rollback must not
        meet files a job is writing: refuse while one runs."""
        runs = project / "runs"
        busy = [f"training run {d.name}" for d in (sorted(runs.iterdir()) if runs.is_dir() and not runs.is_symlink()
                                                   else []) if d.is_dir() and not d.is_symlink() and lock_held(d)]
        jobs = project / ".tmp" / "jobs"
        for folder in sorted(jobs.iterdir()) if jobs.is_dir() and not jobs.is_symlink() else []:
            with contextlib.suppress(FileProblem, KeyError, TypeError, ValueError):
                record = read_object(folder / "job.json")
                if not (folder / "exit.json").exists() and _alive(int(record["pid"]), record.get("started")):
                    busy.append(f"job {folder.name}")
        if busy:
            raise ToolError(f"{project} has work running ({', '.join(busy)}); an update rewrites the code it runs: "
                            "wait for it to end (or cancel it), then update")

    @staticmethod
    def _listing(project: Path) -> dict[str, bool]:
        """Untracked files as git lists them (-uall: each file, ignored ones too): {name: ignored}."""
        out = git(project, "status", "--porcelain", "-z", "--untracked-files=all", "--ignored")
        return {entry[3:]: entry[:2] == "!!" for entry in out.split("\0") if entry[:2] in ("??", "!!")}

    @staticmethod
    def _folders(project: Path) -> set[Path]:
        """The project's folders outside git's and the artefacts' (the update may add folders there)."""
        found = set()
        for folder, dirs, _ in os.walk(project):
            here = Path(folder)
            dirs[:] = [d for d in dirs if d != ".git" and not (here == project and d in ARTEFACTS)]
            found.add(here)
        return found

    def _roll_back(self, project: Path, head: str, present: dict[str, bool], folders: set[Path],
                   report_file: Path) -> None:
        """The project as it was: the files the update added removed (never an ignored file in an
        artefact folder: a job's), the folders it made, and tracked files, index and HEAD reset."""
        for name, ignored in sorted(self._listing(project).items()):
            path = project / name
            if name in present or (ignored and name.split("/", 1)[0] in ARTEFACTS):
                continue
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
        git(project, "reset", "-q", "--hard", head)
        kept = report_file.with_name(KEPT)  # the user's ignored files at template paths (hooks/update_guard.py)
        for copy in sorted(p for p in kept.rglob("*") if p.is_file()) if kept.is_dir() else []:
            target = project / copy.relative_to(kept)
            if target.is_symlink():
                target.unlink()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(copy, target)
        shutil.rmtree(kept, ignore_errors=True)
        for folder in sorted(self._folders(project) - folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a folder the update made

    def _git_source(self, project: Path, source: str, answers: dict[str, Any]) -> str:
        """The template's git source (OLMO_TEMPLATE_GIT) for a project made from a copy without git
        history; recorded in its answers only by an update that succeeds."""
        if not self.settings.template_git:
            raise ToolError(
                f"{project} was generated from a copy of the template without git history ({source}), and copier "
                "update needs the template's versions: set OLMO_TEMPLATE_GIT (or --template-git) to the template's "
                "git URL or a local clone, then update again")
        if not answers.get("_commit"):
            raise ToolError(f"{project}/.copier-answers.yml does not record which template version made the project "
                            "(no _commit), so there is nothing to update from; regenerate it from the git template")
        return self.settings.template_git
