"""What each tool does. No training logic lives here: projects are made and updated with
copier, and everything else runs the project's own scripts (argv lists, never a shell)
or reads the files they write."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import yaml
from copier import run_copy, run_update
from mcp.server.mcpserver.exceptions import ToolError

from mcp_wrapper import answers as questionnaire
from mcp_wrapper.files import last_metrics, lock_held, read_json, tail_lines, untrusted
from mcp_wrapper.models import (
    CancelResult,
    ConfigureResult,
    EmissionsReport,
    EvaluateResult,
    ExportResult,
    GenerateResult,
    GenerateTextResult,
    Metrics,
    MonitorResult,
    PrepareResult,
    ProjectStructure,
    RunList,
    RunSummary,
    StartResult,
    UpdateResult,
)
from mcp_wrapper.paths import check_name, resolve
from mcp_wrapper.release import record_source, release_ref
from mcp_wrapper.settings import Settings, is_git_source

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "olmo-fine-tuning-mcp", "GIT_AUTHOR_EMAIL": "olmo-fine-tuning-mcp@localhost",
                "GIT_COMMITTER_NAME": "olmo-fine-tuning-mcp", "GIT_COMMITTER_EMAIL": "olmo-fine-tuning-mcp@localhost"}
QUESTION_ERROR = re.compile(r"(?:Validation error for question|Invalid choice for) '(\w+)'[: ]*(.*)", re.DOTALL)
EXPORT_TIMEOUT = 4 * 3600  # merging and converting a 70B model takes a while
SCRIPT_TIMEOUT = 3600


def _git(project: Path, *args: str, check: bool = True) -> str:
    env = {**GIT_IDENTITY, **os.environ}
    proc = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=env, check=False)
    if check and proc.returncode != 0:
        raise ToolError(f"git {args[0]} failed in {project}: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Tools:
    def __init__(self, settings: Settings):
        self.settings = settings

    # ------------------------------------------------------------- paths

    def path(self, value: str | Path, what: str, client_roots: Optional[list[Path]]) -> Path:
        return resolve(value, self.settings.allowed_roots, client_roots, self.settings.output_dir, what)

    def in_project(self, project: Path, value: str, what: str, client_roots: Optional[list[Path]]) -> Path:
        """A path argument relative to the project (or absolute), inside the allowed roots."""
        path = Path(value).expanduser()
        return self.path(path if path.is_absolute() else project / path, what, client_roots)

    def project(self, value: str, client_roots: Optional[list[Path]]) -> Path:
        project = self.path(value, "project_path", client_roots)
        if not (project / "config" / "fine_tuning_config.yaml").is_file() or not (project / "scripts").is_dir():
            raise ToolError(f"{project} is not a fine-tuning project (no config/fine_tuning_config.yaml); "
                            "create one with generate_fine_tuning_project")
        return project

    def run_dir(self, project: Path, run_id: str) -> Path:
        check_name(run_id, "run_id")
        run_dir = project / "runs" / run_id
        if not (run_dir / "run-manifest.json").is_file():
            known = sorted(p.name for p in (project / "runs").glob("*") if (p / "run-manifest.json").is_file())
            raise ToolError(f"unknown run id '{run_id}' in {project}; known runs: {', '.join(known[-10:]) or 'none'}")
        return run_dir

    # ------------------------------------------------------------- the project's scripts

    def script(self, project: Path, name: str, *args: str, timeout: float = SCRIPT_TIMEOUT) -> dict[str, Any]:
        """Run scripts/<name> --json and return its result; its error becomes a ToolError."""
        argv = [self.settings.project_python(project), str(project / "scripts" / name), "--json", *args]
        try:
            proc = subprocess.run(argv, cwd=project, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise ToolError(f"scripts/{name} did not finish within {timeout:.0f} s") from None
        lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
        try:
            result = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            raise ToolError(f"scripts/{name} gave no result (exit {proc.returncode}); its stderr:\n"
                            + untrusted("\n".join(proc.stderr.splitlines()[-20:]))) from None
        if proc.returncode != 0 or "error" in result:
            error = result.get("error", {})
            raise ToolError(f"scripts/{name}: {error.get('message', 'failed')}")
        return result

    # ------------------------------------------------------------- generate and update

    def generate(self, project_name: str, output_dir: Optional[str], top: dict[str, Any],
                 sections: dict[str, Any], template_version: Optional[str], git_init: bool,
                 client_roots: Optional[list[Path]]) -> GenerateResult:
        check_name(project_name, "project_name")
        parent = self.path(output_dir or self.settings.output_dir, "output_dir", client_roots)
        project = parent / project_name
        if project.exists() and any(project.iterdir()):
            raise ToolError(f"{project} already exists and is not empty; choose another project_name or output_dir")
        data = questionnaire.to_answers({"project_name": project_name, **top}, sections)
        template = self.settings.template
        created = not project.exists()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # nothing but MCP messages on stdout
                run_copy(template, str(project), data=data, defaults=True, quiet=True, overwrite=False,
                         unsafe=self.settings.trusted(template), vcs_ref=template_version)
        except ValueError as error:
            if created:
                shutil.rmtree(project, ignore_errors=True)
            match = QUESTION_ERROR.search(str(error))
            if match:
                raise ToolError(f"{questionnaire.field_of(match[1])}: {match[2].strip()}") from None
            raise ToolError(f"copier could not generate the project: {error}") from None
        except Exception as error:
            if created:
                shutil.rmtree(project, ignore_errors=True)
            raise ToolError(f"copier could not generate the project: {type(error).__name__}: {error}") from None
        recorded = yaml.safe_load((project / ".copier-answers.yml").read_text()) or {}
        if not is_git_source(template):  # the bundled copy: record the release for later updates
            recorded = record_source(project, self.settings.template_git or template, release_ref())
        if git_init and shutil.which("git"):
            _git(project, "init", "-q", "-b", "main")
            _git(project, "add", "-A")
            _git(project, "commit", "-q", "-m", f"Generated from olmo-fine-tuning-mcp {recorded.get('_commit')}")
        stages = recorded.get("num_stages", 1)
        return GenerateResult(
            success=True,
            project_path=str(project),
            template_version=recorded.get("_commit"),
            project_structure=ProjectStructure(
                config_file=str(project / "config" / "fine_tuning_config.yaml"),
                trainer_modules=sorted(str(p) for p in (project / "trainer").glob("*.py")),
                scripts=sorted(str(p) for p in (project / "scripts").glob("*.py")),
                requirements_file=str(project / "requirements.txt"),
            ),
            next_steps=[
                f"cd {project}",
                "python -m venv .venv && . .venv/bin/activate  (the server then runs the project's scripts with it)",
                "pip install -e '.[all,dev]'  (CPU-only Linux: pip install torch first, from the CPU index)",
                "put your data in data/raw/" + (" and data/raw/stage2/" if stages == 2 else "")
                + ", then prepare_dataset (tool) or python scripts/prepare_dataset.py",
                "optional smoke test without downloads: python scripts/make_tiny_model.py",
                "configure_training_run, then start_training and monitor_training_progress (tools)",
            ],
            command_examples={
                "prepare": "python scripts/prepare_dataset.py",
                "tiny_model": "python scripts/make_tiny_model.py",
                "configure": "python scripts/configure_run.py --name first-try",
                "train": "python scripts/train.py --run-id <run_id>",
                "status": "python scripts/status.py --run-id <run_id>",
            },
            answers={k: v for k, v in recorded.items() if not k.startswith("_")},
        )

    def update(self, project_value: str, template_version: Optional[str],
               client_roots: Optional[list[Path]]) -> UpdateResult:
        project = self.path(project_value, "project_path", client_roots)
        answers_file = project / ".copier-answers.yml"
        if not answers_file.is_file():
            raise ToolError(f"{project} has no .copier-answers.yml, so it was not generated by a template")
        if not (project / ".git").exists():
            raise ToolError(f"{project} is not a git repository; copier update needs one (git init && git add -A "
                            "&& git commit -m 'before update')")
        dirty = _git(project, "status", "--porcelain").strip()
        if dirty:
            shown = "\n".join(dirty.splitlines()[:20])
            raise ToolError(f"{project} has uncommitted changes; commit or stash them first (copier update merges "
                            f"into a clean git tree):\n{shown}")
        before = yaml.safe_load(answers_file.read_text()) or {}
        source = str(before.get("_src_path") or self.settings.template)
        if not is_git_source(source):
            source = self._record_git_source(project, source, before)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                run_update(str(project), defaults=True, overwrite=True, quiet=True, skip_answered=True,
                           unsafe=self.settings.trusted(source), vcs_ref=template_version)
        except Exception as error:
            hint = (" (the template runs migrations; add its source to OLMO_TRUSTED_TEMPLATES to allow them)"
                    if "unsafe" in str(error).lower() else "")
            raise ToolError(f"copier update failed: {type(error).__name__}: {error}{hint}") from None
        after = yaml.safe_load(answers_file.read_text()) or {}
        changed = [line[3:] for line in _git(project, "status", "--porcelain").splitlines()]
        conflicts = sorted({name.removesuffix(".rej") for name in changed if name.endswith(".rej")}
                           | {name for name in changed if (project / name).is_file()
                              and "<<<<<<< before updating" in (project / name).read_text(errors="replace")})
        same = before.get("_commit") == after.get("_commit")
        return UpdateResult(
            success=True, project_path=str(project), previous_version=before.get("_commit"),
            new_version=after.get("_commit"), changed_files=changed, conflicts=conflicts,
            message=("already at the newest template version" if same and not changed else
                     f"updated from {before.get('_commit')} to {after.get('_commit')}; review and commit the changes"
                     + ("; resolve the conflicts first" if conflicts else "")),
        )

    def _record_git_source(self, project: Path, source: str, answers: dict[str, Any]) -> str:
        """A project made from a copy without git history gets the template's git source
        (OLMO_TEMPLATE_GIT) written into its answers, in a commit of its own."""
        if not self.settings.template_git:
            raise ToolError(
                f"{project} was generated from a copy of the template without git history ({source}), and copier "
                "update needs the template's versions: set OLMO_TEMPLATE_GIT (or --template-git) to the template's "
                "git URL or a local clone, then update again")
        if not answers.get("_commit"):
            raise ToolError(f"{project}/.copier-answers.yml does not record which template version made the project "
                            "(no _commit), so there is nothing to update from; regenerate it from the git template")
        record_source(project, self.settings.template_git, answers["_commit"])
        _git(project, "commit", "-q", "-m", "Record the template's git source for copier update",
             ".copier-answers.yml")
        return self.settings.template_git

    # ------------------------------------------------------------- data and runs

    def prepare(self, project_value: str, input_files: Optional[list[str]], stage: Optional[int],
                skip_invalid: bool, client_roots: Optional[list[Path]]) -> PrepareResult:
        project = self.project(project_value, client_roots)
        args = []
        if input_files:
            args += ["--input", *(str(self.path(f, "input_files", client_roots)) for f in input_files)]
        if stage:
            args += ["--stage", str(stage)]
        if skip_invalid:
            args.append("--skip-invalid")
        result = self.script(project, "prepare_dataset.py", *args)
        stages = {"stage2": result.pop("stage2")} if "stage2" in result else {}
        return PrepareResult(success=True, stages={f"stage{stage or 1}": result, **stages})

    def configure(self, project_value: str, run_name: str, training_data: dict[str, Optional[str]],
                  override_params: Optional[dict[str, Any]], client_roots: Optional[list[Path]]) -> ConfigureResult:
        project = self.project(project_value, client_roots)
        check_name(run_name, "run_name")
        flags = {"train_dataset": "--train", "validation_dataset": "--valid", "test_dataset": "--test",
                 "stage2_train_dataset": "--stage2-train", "stage2_validation_dataset": "--stage2-valid",
                 "stage2_test_dataset": "--stage2-test"}
        args = ["--name", run_name]
        for key, value in (training_data or {}).items():
            if key not in flags:
                raise ToolError(f"training_data.{key} is not known; use {', '.join(flags)}")
            if value:
                args += [flags[key], str(self.path(value, f"training_data.{key}", client_roots))]
        for key, value in flatten(override_params or {}).items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        result = self.script(project, "configure_run.py", *args, timeout=600)
        return ConfigureResult(success=True, **{k: result[k] for k in (
            "run_id", "run_directory", "manifest_path", "configuration_summary")})

    def evaluate(self, project_value: str, run_id: str, stage: int, test_dataset: Optional[str],
                 include_base: bool, max_samples: Optional[int], client_roots: Optional[list[Path]]) -> EvaluateResult:
        project = self.project(project_value, client_roots)
        self.run_dir(project, run_id)
        args = ["--run-id", run_id, "--stage", str(stage)]
        if test_dataset:
            args += ["--test-data", str(self.path(test_dataset, "test_dataset", client_roots))]
        if not include_base:
            args.append("--no-base")
        if max_samples:
            args += ["--max-samples", str(max_samples)]
        result = self.script(project, "evaluate.py", *args)
        return EvaluateResult(success=True, run_id=run_id, stage=stage, evaluation_results=result["metrics"],
                              base_results=result.get("base"), forgetting=result.get("forgetting"),
                              thresholds=result["thresholds"], results_file=result["results_file"],
                              samples_file=result["samples_file"])

    def generate_text(self, project_value: str, prompt: str, run_id: Optional[str], stage: Optional[int],
                      export_path: Optional[str], system: Optional[str], backend: Optional[str], max_tokens: int,
                      temperature: float, top_p: float, client_roots: Optional[list[Path]]) -> GenerateTextResult:
        project = self.project(project_value, client_roots)
        # --flag=value: a prompt that starts with '-' is still the prompt, not an option
        args = [f"--prompt={prompt}", "--max-tokens", str(max_tokens), "--temperature", str(temperature),
                "--top-p", str(top_p)]
        if run_id and export_path:
            raise ToolError("give run_id or export_path, not both")
        if run_id:
            self.run_dir(project, run_id)
            args += ["--run-id", run_id] + (["--stage", str(stage)] if stage else [])
        elif export_path:
            args += ["--export", str(self.in_project(project, export_path, "export_path", client_roots))]
        if system:
            args.append(f"--system={system}")
        if backend:
            args += ["--backend", backend]
        result = self.script(project, "generate.py", *args)
        return GenerateTextResult(success=True, model=result["model"], prompt=prompt,
                                  response=untrusted(result["response"]), max_tokens=result["max_tokens"],
                                  temperature=result["temperature"], top_p=result["top_p"])

    def export(self, project_value: str, run_id: str, stage: int, export_format: str, export_path: Optional[str],
               merge_adapters: bool, quantization: Optional[str], overwrite: bool, upload_to_huggingface: bool,
               hf_repo_id: Optional[str], dry_run: bool, client_roots: Optional[list[Path]]) -> ExportResult:
        project = self.project(project_value, client_roots)
        self.run_dir(project, run_id)
        args = ["--run-id", run_id, "--stage", str(stage), "--format", export_format]
        if export_path:
            args += ["--output", str(self.in_project(project, export_path, "export_path", client_roots))]
        if not merge_adapters:
            args.append("--no-merge")
        if quantization:
            args += ["--quantization", quantization]
        if overwrite:
            args.append("--overwrite")
        if upload_to_huggingface:
            args.append("--upload")
            if hf_repo_id:
                args += ["--hf-repo-id", hf_repo_id]
            if dry_run:
                args.append("--dry-run")
        result = self.script(project, "export.py", *args, timeout=EXPORT_TIMEOUT)
        return ExportResult(**{k: result.get(k) for k in ExportResult.model_fields})

    def emissions_report(self, project_value: str, run_id: Optional[str],
                         client_roots: Optional[list[Path]]) -> EmissionsReport:
        project = self.project(project_value, client_roots)
        args = []
        if run_id:
            self.run_dir(project, run_id)
            args = ["--run-id", run_id]
        result = self.script(project, "emissions_report.py", *args)
        return EmissionsReport(scope="run" if run_id else "all runs", report=result)

    def _argv(self, project: Path, run_id: str, stage: Optional[int], resume: bool) -> list[str]:
        argv = [self.settings.project_python(project), str(project / "scripts" / "train.py"), "--json",
                "--run-id", run_id]
        if stage:
            argv += ["--stage", str(stage)]
        if resume:
            argv.append("--resume")
        return argv

    def launch(self, project_value: str, run_id: str, stage: Optional[int], resume: bool,
               client_roots: Optional[list[Path]]) -> tuple[subprocess.Popen, Path, Path]:
        """Start scripts/train.py in its own process group, output to the run's log; wait
        until its status says running with its pid (it started) or it exits (refused)."""
        project = self.project(project_value, client_roots)
        run_dir = self.run_dir(project, run_id)
        if lock_held(run_dir):
            raise ToolError(f"run {run_id} is already running; watch it with monitor_training_progress "
                            "or stop it with cancel_training")
        log_file = run_dir / "train-process.log"
        with log_file.open("ab") as log:
            proc = subprocess.Popen(self._argv(project, run_id, stage, resume), cwd=project, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=proc.wait, daemon=True).start()  # reaps the child: no zombies
        def running() -> bool:
            with contextlib.suppress(OSError, ValueError):
                status = read_json(run_dir / "status.json")
                return status.get("status") == "running" and status.get("pid") == proc.pid
            return False

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not running():
            time.sleep(0.05)
        if proc.poll() is not None and proc.returncode != 0:
            raise ToolError(f"training did not start: {self._final(log_file).get('error', {}).get('message')}")
        return proc, run_dir, log_file

    @staticmethod
    def _final(log_file: Path) -> dict[str, Any]:
        for line in reversed(tail_lines(log_file, 50)):
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    return json.loads(line)
        return {"error": {"message": "no result; see " + str(log_file)}}

    def estimate_minutes(self, project: Path, run_dir: Path, stage: Optional[int]) -> Optional[int]:
        """Minutes for this run at the pace of the project's last completed run (None without one)."""
        manifest = read_json(run_dir / "run-manifest.json")
        todo = sum(s["iterations"] for key, s in manifest["stages"].items()
                   if s["status"] != "completed" and (stage is None or key == f"stage{stage}"))
        for other in sorted((project / "runs").glob("*/run-manifest.json"), reverse=True):
            for entry in read_json(other)["stages"].values():
                if entry.get("status") == "completed" and entry.get("started_at") and entry.get("completed_at"):
                    seconds = (datetime.fromisoformat(entry["completed_at"])
                               - datetime.fromisoformat(entry["started_at"])).total_seconds()
                    return max(1, math.ceil(seconds / entry["iterations"] * todo / 60))
        return None

    def start_async(self, project_value: str, run_id: str, stage: Optional[int], resume: bool,
                    client_roots: Optional[list[Path]]) -> StartResult:
        proc, run_dir, log_file = self.launch(project_value, run_id, stage, resume, client_roots)
        project = run_dir.parents[1]
        status = self.monitor(str(project), run_id, False, False, client_roots).status
        return StartResult(
            success=True, run_id=run_id, training_started=True, status=status, pid=proc.pid,
            estimated_duration_minutes=self.estimate_minutes(project, run_dir, stage), log_file=str(log_file),
            monitor_command=f"monitor_training_progress(project_path={str(project)!r}, run_id={run_id!r})")

    def monitor(self, project_value: str, run_id: str, include_emissions: bool, include_log: bool,
                client_roots: Optional[list[Path]]) -> MonitorResult:
        project = self.project(project_value, client_roots)
        run_dir = self.run_dir(project, run_id)
        status = read_json(run_dir / "status.json")
        alive = lock_held(run_dir)
        state, error = status.get("status", "not_started"), status.get("error")
        if state == "running" and not alive:
            state = "failed"
            error = (f"the training process (pid {status.get('pid')}) ended without finishing; start_training with "
                     "resume=true continues from its last checkpoint")
        latest = last_metrics(run_dir / "metrics.jsonl")
        eta = status.get("eta_seconds") if state == "running" else None
        emissions, alerts = None, None
        if include_emissions:  # status.json has the live figure (flushed at each evaluation), the manifest the final
            manifest = read_json(run_dir / "run-manifest.json")
            final = manifest.get("emissions") or {}
            emissions = status.get("emissions_kg") if state == "running" else final.get("total_kg")
            emissions = emissions if emissions is not None else final.get("total_kg")
            alerts = status.get("emissions_alerts") or final.get("alerts") or []
        return MonitorResult(
            run_id=run_id, status=state, process_alive=alive, current_stage=status.get("stage"),
            current_iteration=status.get("iteration"), total_iterations=status.get("total_iterations"),
            progress_percentage=status.get("progress"),
            metrics=Metrics(**{k: latest.get(k) for k in Metrics.model_fields}),
            carbon_emissions_kg=emissions, emissions_alerts=alerts, eta_seconds=eta,
            estimated_completion_time=(_now() + timedelta(seconds=eta)).isoformat(timespec="seconds") if eta else None,
            error=error,
            log_tail=untrusted("\n".join(tail_lines(run_dir / "train.log", 20))) if include_log else None,
        )

    def list_runs(self, project_value: str, client_roots: Optional[list[Path]]) -> RunList:
        project = self.project(project_value, client_roots)
        runs = []
        for run_dir in sorted((project / "runs").glob("*")):
            if (run_dir / "run-manifest.json").is_file() and (run_dir / "status.json").is_file():
                seen = self.monitor(str(project), run_dir.name, False, False, client_roots)
                runs.append(RunSummary(run_id=run_dir.name, status=seen.status, process_alive=seen.process_alive,
                                       current_stage=seen.current_stage, progress_percentage=seen.progress_percentage,
                                       updated_at=read_json(run_dir / "status.json").get("updated_at")))
        return RunList(project_path=str(project), runs=runs)

    def cancel(self, project_value: str, run_id: str, grace_seconds: float,
               client_roots: Optional[list[Path]]) -> CancelResult:
        """SIGTERM (the trainer checkpoints and ends as cancelled), then SIGKILL after the grace period."""
        project = self.project(project_value, client_roots)
        run_dir = self.run_dir(project, run_id)
        if not lock_held(run_dir):
            state = self.monitor(str(project), run_id, False, False, client_roots).status
            return CancelResult(run_id=run_id, signal="none", status=state, message=f"run {run_id} is not running")
        holder = re.search(r"pid (\d+)", (run_dir / ".lock").read_text())
        if not holder:
            raise ToolError(f"cannot tell which process runs {run_id}")
        pid = int(holder[1])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and lock_held(run_dir):
            time.sleep(0.05)
        sent = "SIGTERM"
        if lock_held(run_dir):
            sent = "SIGTERM then SIGKILL"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while lock_held(run_dir):
                time.sleep(0.05)
            # the trainer could not record it: say so in its status (atomically, as it would)
            status = read_json(run_dir / "status.json")
            status.update(status="cancelled", error=f"killed after {grace_seconds:.0f} s without stopping on SIGTERM",
                          updated_at=_now().isoformat(timespec="seconds"))
            tmp = run_dir / f".tmp-status.json.{os.getpid()}"
            tmp.write_text(json.dumps(status, indent=2))
            os.replace(tmp, run_dir / "status.json")
        checkpoints = sorted(run_dir.glob("stage*/checkpoints/iter-*/checkpoint.json"))
        last = read_json(checkpoints[-1])["iteration"] if checkpoints else None
        state = self.monitor(str(project), run_id, False, False, client_roots).status
        return CancelResult(run_id=run_id, signal=sent, status=state, last_checkpoint_iteration=last,
                            message=f"run {run_id} is {state}; start_training with resume=true continues it")


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"training": {"stage1": {"iterations": 5}}} -> {"training.stage1.iterations": 5}."""
    flat = {}
    for key, value in params.items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", str(key)):
            raise ToolError(f"override_params key {key!r} is not a config key")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
