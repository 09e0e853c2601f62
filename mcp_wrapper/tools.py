"""What each tool does. No training logic lives here: projects are made and updated with
copier, and everything else runs the project's own scripts (argv lists, never a shell)
or reads the files they write."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import yaml
from copier import run_copy
from mcp.server.mcpserver.exceptions import ToolError

from mcp_wrapper import answers as questionnaire
from mcp_wrapper.files import untrusted
from mcp_wrapper.git import git, own_repository
from mcp_wrapper.jobs import WAIT_DEFAULT, JobTools
from mcp_wrapper.models import (
    BaseModelResult,
    CommitResult,
    ConfigureResult,
    EmissionsReport,
    EvaluateResult,
    ExportResult,
    GenerateResult,
    GenerateTextResult,
    ImportDataResult,
    JobFields,
    PrepareResult,
    ProjectStructure,
)
from mcp_wrapper.paths import check_name
from mcp_wrapper.release import record_source, release_ref
from mcp_wrapper.runs import RunTools
from mcp_wrapper.settings import is_git_source
from mcp_wrapper.update import UpdateTools, version_note

QUESTION_ERROR = re.compile(r"(?:Validation error for question|Invalid choice for) '(\w+)'[: ]*(.*)", re.DOTALL)
EXPORT_TIMEOUT = 4 * 3600  # merging and converting a 70B model takes a while
GENERATE_TIMEOUT = 900  # loading a large model on a CPU, then at most 1024 new tokens
SHORT_TIMEOUT = 600  # configure, emissions reports
SCRIPT_TIMEOUT = 3600  # preparing, importing, evaluating
# Copier answers that are paths (held to the roots, relative to the project) or tracking stores.
PATH_ANSWERS = {"model_local_path": "base_model.local_path"}
STORE_ANSWERS = {"mlflow_tracking_uri": "integrations.mlflow_tracking_uri"}


def _rejected_line(error: Any) -> str:
    if not isinstance(error, dict):
        return str(error)
    where = f"{error.get('file')}" + (f", {error.get('unit', 'line')} {error.get('line')}" if error.get("line") else "")
    field = f"field '{error.get('field')}': " if error.get("field") else ""
    return f"{where}: {field}{error.get('reason')}"


class Tools(RunTools, JobTools, UpdateTools):
    # ------------------------------------------------------------- generate and update

    def generate(self, project_name: str, output_dir: Optional[str], top: dict[str, Any],
                 sections: dict[str, Any], template_version: Optional[str], git_init: bool,
                 client_roots: Optional[list[Path]]) -> GenerateResult:
        check_name(project_name, "project_name")
        parent = self.path(output_dir or self.settings.output_dir, "output_dir", client_roots)
        project = parent / project_name
        if project.is_symlink():
            raise ToolError(f"project_name {project_name!r}: {project} is a link (to {project.resolve()}); a project "
                            "is generated only into a real folder inside the allowed roots")
        self.path(project, "the project folder", client_roots)
        if project.exists() and (not project.is_dir() or any(project.iterdir())):
            raise ToolError(f"{project} already exists and is not empty; choose another project_name or output_dir")
        data = questionnaire.to_answers({"project_name": project_name, **top}, sections)
        self._check_answers(project, data, client_roots)
        template = self.settings.template
        created = not project.exists()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # nothing but MCP messages on stdout
                run_copy(template, str(project), data=data, defaults=True, quiet=True, overwrite=False,
                         unsafe=self.settings.trusted(template),
                         vcs_ref=template_version or self.settings.template_ref)
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
        note = None
        if not is_git_source(template):  # the bundled copy: record the release for later updates
            recorded = record_source(project, self.settings.template_git or template, release_ref())
        else:
            note = version_note(template, recorded.get("_commit"), project)
            recorded = yaml.safe_load((project / ".copier-answers.yml").read_text()) or {}
        if git_init and shutil.which("git"):
            git(project, "init", "-q", "-b", "main")
            git(project, "add", "-A")
            git(project, "commit", "-q", "-m", f"Generated from olmo-fine-tuning-mcp {recorded.get('_commit')}")
        stages = recorded.get("num_stages", 1)
        return GenerateResult(
            success=True,
            project_path=str(project),
            template_version=recorded.get("_commit"),
            project_structure=ProjectStructure(
                config_file=str(project / "config" / "fine_tuning_config.yaml"),
                trainer_modules=sorted(str(p) for p in (project / "trainer").rglob("*.py")),
                scripts=sorted(str(p) for p in (project / "scripts").glob("*.py")),
                requirements_file=str(project / "requirements.txt"),
            ),
            next_steps=[
                f"cd {project}",
                "python -m venv .venv && . .venv/bin/activate  (the server then runs the project's scripts with it)",
                "pip install -e '.[all,dev]'  (CPU-only Linux: pip install torch first, from the CPU index)",
                "bring your data with import_data (tool)" + (" for stage 1 and stage=2" if stages == 2 else "")
                + ", or put files in data/raw/" + ("(stage2/)" if stages == 2 else "") + "; then prepare_dataset",
                "set_base_model (tool): a local model folder or GGUF file, or tiny=true for a smoke test",
                "configure_training_run, then start_training and monitor_training_progress (tools)",
                "commit_project before update_project",
            ],
            command_examples={
                "import": "python scripts/import_data.py FILE...",
                "base_model": "python scripts/set_base_model.py --tiny  (or a model folder / .gguf file)",
                "prepare": "python scripts/prepare_dataset.py",
                "configure": "python scripts/configure_run.py --name first-try",
                "train": "python scripts/train.py --run-id <run_id>",
                "status": "python scripts/status.py --run-id <run_id>",
            },
            answers={k: v for k, v in recorded.items() if not k.startswith("_")},
            version_note=note,
        )

    def _check_answers(self, project: Path, data: dict[str, Any], client_roots: Optional[list[Path]]) -> None:
        """Answers that name places: paths inside the roots (relative ones are the project's), and
        tracking stores that are local (a server would receive the project's data)."""
        for question, field in PATH_ANSWERS.items():
            if data.get(question):
                self.in_project(project, str(data[question]), field, client_roots)
        for question, field in STORE_ANSWERS.items():
            value = str(data.get(question) or "")
            local = store_path(value) if value else None
            if value and local is None and not loopback(value):
                raise ToolError(f"{field} {value!r} names a server on another machine, which would receive the "
                                "project's data; through MCP only a local store or a server on this machine is "
                                "allowed (e.g. sqlite:///mlruns/mlflow.db, http://127.0.0.1:5000); set another server "
                                "in config/fine_tuning_config.yaml by hand if you mean it")
            if local:
                self.in_project(project, local, field, client_roots)

    # ------------------------------------------------------------- data and runs

    def long(self, project: Path, tool: str, script: str, args: list[str], client_roots: Optional[list[Path]],
             wait_seconds: float, timeout: float, stdin: Optional[str] = None, tick=None) -> JobFields:
        """Run a script as a job and wait up to `wait_seconds`: the tool's result if it ended
        (its error as a ToolError), else the tool's result model saying running, with the job id."""
        job_id = self.start_job(project, tool, script, args, client_roots, timeout, stdin)
        state = self.wait_job(str(project), job_id, wait_seconds, client_roots, tick)
        model = PARSERS[tool][0]
        if state.status != "running":  # the answer carries it all: no job is left to poll
            self.forget_job(project, job_id, client_roots)
        if state.status == "completed":
            return model.model_validate({**state.result, "job_id": job_id, "job_status": "completed"})
        if state.status == "running":
            return model(success=True, job_id=job_id, job_status="running")
        raise ToolError(state.error or f"job {job_id} {state.status}")

    def prepare(self, project_value: str, input_files: Optional[list[str]], stage: Optional[int],
                skip_invalid: bool, client_roots: Optional[list[Path]], wait_seconds: float = WAIT_DEFAULT,
                tick=None) -> PrepareResult:
        project = self.project(project_value, client_roots)
        args = []
        if input_files:
            args += ["--input", *(str(self.in_project(project, f, f"input_files[{i}]", client_roots))
                                  for i, f in enumerate(input_files))]
        if stage:
            args += ["--stage", str(stage)]
        if skip_invalid:
            args.append("--skip-invalid")
        return self.long(project, "prepare_dataset", "prepare_dataset.py", args, client_roots, wait_seconds,
                         SCRIPT_TIMEOUT, tick=tick)

    def import_data(self, project_value: str, files: list[str], stage: int, replace_samples: bool, overwrite: bool,
                    skip_invalid: bool, client_roots: Optional[list[Path]], wait_seconds: float = WAIT_DEFAULT,
                    tick=None) -> ImportDataResult:
        project = self.project(project_value, client_roots)
        if not files:
            raise ToolError("files: name at least one data file")
        args = ["--stage", str(stage), *(["--replace-samples"] if replace_samples else []),
                *(["--overwrite"] if overwrite else []), *(["--skip-invalid"] if skip_invalid else []), "--"]
        args += [str(self.in_project(project, f, f"files[{i}]", client_roots)) for i, f in enumerate(files)]
        return self.long(project, "import_data", "import_data.py", args, client_roots, wait_seconds, SCRIPT_TIMEOUT,
                         tick=tick)

    def set_base_model(self, project_value: str, source: Optional[str], tiny: bool, architecture: Optional[str],
                       name: Optional[str], client_roots: Optional[list[Path]], wait_seconds: float = WAIT_DEFAULT,
                       tick=None) -> BaseModelResult:
        project = self.project(project_value, client_roots)
        if tiny == bool(source):
            raise ToolError("give source (a model folder or .gguf file) or tiny=true, one of them")
        if tiny:
            args = ["--tiny", *(["--architecture", architecture] if architecture else [])]
        else:
            if name is not None:
                check_name(name, "name")
            args = [*(["--name", name] if name else []), "--",
                    str(self.in_project(project, source, "source", client_roots))]
        return self.long(project, "set_base_model", "set_base_model.py", args, client_roots, wait_seconds,
                         SCRIPT_TIMEOUT, tick=tick)

    def commit(self, project_value: str, message: Optional[str], client_roots: Optional[list[Path]]) -> CommitResult:
        """git add -A and commit: the project's state as it is, so update_project can merge into it."""
        project = self.path(project_value, "project_path", client_roots)
        if not (project / ".copier-answers.yml").is_file():
            raise ToolError(f"{project} was not generated by the template (no .copier-answers.yml)")
        own_repository(project)
        if not (project / ".git").is_dir():
            git(project, "init", "-q", "-b", "main")
        text = message or "Project state committed through olmo-fine-tuning-mcp"
        if "\x00" in text or len(text) > 2000:
            raise ToolError("message must be at most 2000 characters, without NUL")
        git(project, "add", "-A")
        files = [line[3:] for line in git(project, "status", "--porcelain").splitlines()]
        if not files:
            return CommitResult(success=True, project_path=str(project), committed=False,
                                commit=git(project, "rev-parse", "HEAD", check=False).strip() or None, files=[],
                                message="nothing to commit; the tree is clean")
        git(project, "commit", "-q", "-m", text)
        return CommitResult(success=True, project_path=str(project), committed=True,
                            commit=git(project, "rev-parse", "HEAD").strip(), files=files,
                            message=f"committed {len(files)} file(s); update_project can now merge into this state")

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
                args += [flags[key], str(self.in_project(project, value, f"training_data.{key}", client_roots))]
        for key, value in flatten(override_params or {}).items():
            args += ["--set", f"{key}={json.dumps(value)}"]
        result = self.script(project, "configure_run.py", args, client_roots, timeout=SHORT_TIMEOUT)
        return ConfigureResult(success=True, **{k: result[k] for k in (
            "run_id", "run_directory", "manifest_path", "configuration_summary")})

    def evaluate(self, project_value: str, run_id: str, stage: int, test_dataset: Optional[str],
                 include_base: bool, max_samples: Optional[int], client_roots: Optional[list[Path]],
                 wait_seconds: float = WAIT_DEFAULT, tick=None, lm_eval: bool = False) -> EvaluateResult:
        project = self.project(project_value, client_roots)
        self.run_dir(project, run_id, client_roots)
        args = ["--run-id", run_id, "--stage", str(stage)] + (["--lm-eval"] if lm_eval else [])
        if test_dataset:
            args += ["--test-data", str(self.in_project(project, test_dataset, "test_dataset", client_roots))]
        if not include_base:
            args.append("--no-base")
        if max_samples:
            args += ["--max-samples", str(max_samples)]
        return self.long(project, "evaluate_model", "evaluate.py", args, client_roots, wait_seconds, SCRIPT_TIMEOUT,
                         tick=tick)

    def generate_text(self, project_value: str, prompt: str, run_id: Optional[str], stage: Optional[int],
                      export_path: Optional[str], system: Optional[str], backend: Optional[str], max_tokens: int,
                      temperature: float, top_p: float, client_roots: Optional[list[Path]],
                      wait_seconds: float = WAIT_DEFAULT, tick=None) -> GenerateTextResult:
        project = self.project(project_value, client_roots)
        # the texts travel as one JSON object on stdin: no argv limits, no '-' or NUL ambiguity
        args = ["--request-stdin", "--max-tokens", str(max_tokens), "--temperature", str(temperature),
                "--top-p", str(top_p)]
        if run_id and export_path:
            raise ToolError("give run_id or export_path, not both")
        if run_id:
            self.run_dir(project, run_id, client_roots)
            args += ["--run-id", run_id] + (["--stage", str(stage)] if stage else [])
        elif export_path:
            args += ["--export", str(self.in_project(project, export_path, "export_path", client_roots))]
        if backend:
            args += ["--backend", backend]
        return self.long(project, "generate_text", "generate.py", args, client_roots, wait_seconds, GENERATE_TIMEOUT,
                         stdin=json.dumps({"prompt": prompt, "system": system or None}), tick=tick)

    def export(self, project_value: str, run_id: str, stage: int, export_format: str, export_path: Optional[str],
               merge_adapters: bool, quantization: Optional[str], overwrite: bool, upload_to_huggingface: bool,
               hf_repo_id: Optional[str], dry_run: bool, client_roots: Optional[list[Path]],
               wait_seconds: float = WAIT_DEFAULT, tick=None) -> ExportResult:
        project = self.project(project_value, client_roots)
        self.run_dir(project, run_id, client_roots)
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
                args.append(f"--hf-repo-id={hf_repo_id}")  # one argv item: a leading '-' stays the value
            if dry_run:
                args.append("--dry-run")
        return self.long(project, "export_model", "export.py", args, client_roots, wait_seconds, EXPORT_TIMEOUT,
                         tick=tick)

    def emissions_report(self, project_value: str, run_id: Optional[str],
                         client_roots: Optional[list[Path]]) -> EmissionsReport:
        project = self.project(project_value, client_roots)
        args = []
        if run_id:
            self.run_dir(project, run_id, client_roots)
            args = ["--run-id", run_id]
        result = self.script(project, "emissions_report.py", args, client_roots, timeout=SHORT_TIMEOUT)
        return EmissionsReport(scope="run" if run_id else "all runs", report=result)


def store_path(uri: str) -> Optional[str]:
    """The local file or folder of a tracking store (sqlite:///x, file:///x or a plain folder), else None."""
    if uri.startswith("sqlite:///"):
        return uri[len("sqlite:///"):]
    if uri.startswith("file://"):
        return uri[len("file://"):] or "/"
    return None if "://" in uri else uri


def loopback(uri: str) -> bool:
    """Whether a server URI stays on this machine (localhost, 127.0.0.0/8, ::1)."""
    try:
        host = urlparse(uri).hostname or ""
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"training": {"stage1": {"iterations": 5}}} -> {"training.stage1.iterations": 5}."""
    flat = {}
    for key, value in params.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
            raise ToolError(f"override_params key {key!r} is not a config key")
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _prepared(result: dict[str, Any]) -> PrepareResult:
    stages = {"stage2": result.pop("stage2")} if "stage2" in result else {}
    stages = {f"stage{result.get('stage') or 1}": result, **stages}
    for summary in stages.values():  # rejected rows quote the data: one delimited block
        if isinstance(summary, dict) and summary.get("rejected"):
            summary["rejected"] = untrusted("\n".join(_rejected_line(e) for e in summary["rejected"]))
    return PrepareResult(success=True, stages=stages)


def _imported(result: dict[str, Any]) -> ImportDataResult:
    validation = dict(result["validation"])
    if validation.get("rejected"):
        validation["rejected"] = untrusted("\n".join(_rejected_line(e) for e in validation["rejected"]))
    return ImportDataResult(success=True, stage=result["stage"], imported=result["imported"],
                            removed_samples=result["removed_samples"], validation=validation,
                            unmatched=result["unmatched"])


def _base_model(result: dict[str, Any]) -> BaseModelResult:
    details = {k: v for k, v in result.items() if k not in ("kind", "local_path", "path")}
    return BaseModelResult(success=True, kind=result["kind"], local_path=result["local_path"], path=result["path"],
                           details=details)


def _evaluated(result: dict[str, Any]) -> EvaluateResult:
    bench = result.get("lm_eval")
    if bench:  # the models' generations are untrusted text
        bench = {**bench, **{who: {**bench[who], "generations": [untrusted(g) for g in bench[who]["generations"]]}
                             for who in ("tuned", "base") if who in bench}}
    return EvaluateResult(success=True, run_id=result["run_id"], stage=result["stage"],
                          evaluation_results=result["metrics"], base_results=result.get("base"),
                          forgetting=result.get("forgetting"), thresholds=result["thresholds"],
                          results_file=result["results_file"], samples_file=result["samples_file"], lm_eval=bench)


def _generated(result: dict[str, Any]) -> GenerateTextResult:
    return GenerateTextResult(success=True, model=result["model"], prompt=result["prompt"],
                              response=untrusted(result["response"]), max_tokens=result["max_tokens"],
                              temperature=result["temperature"], top_p=result["top_p"])


def _exported(result: dict[str, Any]) -> ExportResult:
    fields = {k: result.get(k) for k in ExportResult.model_fields if k not in JobFields.model_fields}
    check = (result.get("details") or {}).get("llama_cpp_check")
    if check:  # the models' words, and llama.cpp's own output after a crash, are untrusted text
        fields["llama_cpp_check"] = {**check, **{k: untrusted(str(check[k])) for k in ("llama_cpp_text",
                                                                                      "transformers_text")
                                                 if check.get(k) is not None}}
        if check.get("crash", {}).get("stderr"):
            fields["llama_cpp_check"]["crash"] = {**check["crash"], "stderr": untrusted(check["crash"]["stderr"])}
    details = result.get("details") or {}
    if details.get("gguf_file"):
        modelfile = dict(details.get("modelfile") or {})
        if modelfile.get("system"):  # from the training data or the model's template: untrusted text
            modelfile["system"] = untrusted(modelfile["system"])
        fields["gguf_details"] = {k: details[k] for k in ("gguf_file", "size_mb", "tensor_types", "quantize")
                                  if k in details} | {"modelfile": modelfile}
    return ExportResult(**fields)


# each long tool: its result model, and how its script's --json result becomes that model
PARSERS: dict[str, tuple[type[JobFields], Any]] = {
    "prepare_dataset": (PrepareResult, _prepared), "import_data": (ImportDataResult, _imported),
    "set_base_model": (BaseModelResult, _base_model), "evaluate_model": (EvaluateResult, _evaluated),
    "generate_text": (GenerateTextResult, _generated), "export_model": (ExportResult, _exported),
}
JobTools.parsers = {tool: parse for tool, (_, parse) in PARSERS.items()}
