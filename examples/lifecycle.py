"""What the three examples share: start the olmo-fine-tuning-mcp server over stdio with the
official MCP SDK client, and drive one fine-tuning project from generation to export.

Each example passes its scenario (answers, training rows, questions to ask the tuned model);
this module runs the tool calls and prints one line per call. Everything goes through MCP: the
rows are imported with import_data, and by default the base model is a tiny local model of the
real architecture, built with set_base_model(tiny=true), so an example runs anywhere in minutes;
--model-id trains the real model instead (it is downloaded from the Hugging Face Hub). A long
call that answers with a running job is followed with wait_for_job, as any agent would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

import anyio
from mcp import Client, StdioServerParameters


def parser(description: str, default_model: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model-id", help=f"train this Hugging Face model (e.g. {default_model}) instead of the tiny "
                                      "local one (downloads it)")
    p.add_argument("--output-dir", default="example-projects", help="where the project is generated")
    p.add_argument("--server", help="the server command (default: olmo-fine-tuning-mcp if installed, else "
                                    "python -m mcp_wrapper)")
    p.add_argument("--backend", choices=("auto", "mlx", "transformers"), default="auto")
    p.add_argument("--iterations", type=int, default=40, help="training iterations per stage")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    return p


def server_parameters(command: Optional[str], output_dir: Path) -> StdioServerParameters:
    if command:
        argv = command.split()
    elif shutil.which("olmo-fine-tuning-mcp"):
        argv = ["olmo-fine-tuning-mcp"]
    else:
        argv = [sys.executable, "-m", "mcp_wrapper"]
    # the project's scripts run with the project's .venv if it has one, else OLMO_PROJECT_PYTHON,
    # else the server's own interpreter
    env = {**os.environ, "OLMO_PROJECT_PYTHON": os.environ.get("OLMO_PROJECT_PYTHON", sys.executable)}
    return StdioServerParameters(command=argv[0], args=[*argv[1:], "--output-dir", str(output_dir)], env=env)


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    began = time.monotonic()
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise SystemExit(f"{tool} failed: {result.content[0].text}")
    out = result.structured_content
    if out.get("job_status") == "running":  # the work goes on: its result comes from wait_for_job
        state = out
        while state.get("job_status") == "running" or state.get("status") == "running":
            state = (await client.call_tool("wait_for_job", {"project_path": arguments["project_path"],
                                                             "job_id": out["job_id"]})).structured_content
        if state["status"] != "completed":
            raise SystemExit(f"{tool} {state['status']}: {state.get('error')}")
        out = state["result"]
    print(f"[{time.monotonic() - began:6.1f}s] {tool}", file=sys.stderr, flush=True)
    return out


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


async def lifecycle(args: argparse.Namespace, project_name: str, answers: dict[str, Any],
                    rows: list[dict[str, Any]], questions: list[str], tiny: str,
                    stage2_rows: Optional[list[dict[str, Any]]] = None) -> dict[str, Any]:
    """generate -> (tiny model) -> prepare -> configure -> train -> evaluate -> ask -> export."""
    output_dir = Path(args.output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    stages = 2 if stage2_rows else 1
    base = dict(answers.get("base_model", {}))
    if args.model_id:
        base["model_id"] = args.model_id
    # a random tiny model needs a high learning rate to learn anything in a few dozen steps
    fast = {} if args.model_id else {"learning_rate": 3e-3}
    training = {"num_stages": stages, "backend": args.backend,
                "stage1": {"iterations": args.iterations, "warmup_steps": 2, **fast},
                "save_steps": max(args.iterations // 2, 1), "eval_steps": max(args.iterations // 2, 1),
                **answers.get("training", {})}
    if stages == 2:
        training["stage2"] = {"iterations": args.iterations, "warmup_steps": 2,
                              **({} if args.model_id else {"learning_rate": 2e-3}), **training.get("stage2", {})}
    inbox = output_dir / "inbox" / project_name  # the user's files, outside the project (inside the roots)
    async with Client(server_parameters(args.server, output_dir), read_timeout_seconds=3600) as client:
        generated = await call(client, "generate_fine_tuning_project", {
            **{k: v for k, v in answers.items() if k not in ("base_model", "training")},
            "project_name": project_name, "base_model": base, "training": training})
        project = Path(generated["project_path"])
        where = {"project_path": str(project)}
        for stage, stage_rows in ((1, rows), (2, stage2_rows)):
            if stage_rows:
                data = write_rows(inbox / f"stage{stage}.jsonl", stage_rows)
                await call(client, "import_data", {**where, "files": [str(data)], "stage": stage,
                                                   "replace_samples": True})
        if not args.model_id:  # no downloads: a tiny model of the same architecture, its tokenizer fit to the data
            await call(client, "set_base_model", {**where, "tiny": True, "architecture": tiny})
        prepared = await call(client, "prepare_dataset", where)
        run_id = (await call(client, "configure_training_run",
                             {"project_path": str(project), "run_name": "example"}))["run_id"]
        await call(client, "start_training", {"project_path": str(project), "run_id": run_id})
        while True:
            seen = await call(client, "monitor_training_progress", {"project_path": str(project), "run_id": run_id})
            print(f"    stage {seen.get('current_stage')} iteration {seen.get('current_iteration')}: "
                  f"{seen['status']}, {seen.get('progress_percentage') or 0:.0f}%", file=sys.stderr)
            if seen["status"] not in ("running", "not_started"):
                break
            await anyio.sleep(2)
        if seen["status"] != "completed":
            raise SystemExit(f"training ended {seen['status']}: {seen.get('error')}")
        evaluated = await call(client, "evaluate_model", {"project_path": str(project), "run_id": run_id,
                                                          "stage": stages, "max_samples": 8})
        answers_given = [(await call(client, "generate_text", {
            "project_path": str(project), "run_id": run_id, "prompt": question, "max_tokens": 48}))["response"]
            for question in questions]
        exported = await call(client, "export_model", {"project_path": str(project), "run_id": run_id,
                                                       "stage": stages, "export_format": "adapters"})
        emissions = await call(client, "get_emissions_report", {"project_path": str(project), "run_id": run_id})
    summary = {"project_path": str(project), "run_id": run_id, "template_version": generated["template_version"],
               "rows": {k: v["counts"]["train"] for k, v in prepared["stages"].items()},
               "evaluation": evaluated["evaluation_results"],
               "answers": dict(zip(questions, answers_given, strict=True)),
               "export_path": exported["export_path"], "emissions": emissions["report"].get("status")}
    return summary


def main(args: argparse.Namespace, scenario) -> None:
    summary = anyio.run(scenario, args)
    print(f"\nproject: {summary['project_path']}\nrun: {summary['run_id']}\n"
          f"evaluation: {json.dumps({k: v for k, v in summary['evaluation'].items() if k != 'custom_metrics'})}")
    for question, answer in summary["answers"].items():
        print(f"\nQ: {question}\nA: {answer}")
    print(f"\nadapter exported to {summary['export_path']}")
    if args.json:
        print(json.dumps(summary))
