"""The MCP server in memory (mcp.Client against MCPServer): tool list and schemas, the
questionnaire mapping, generation with copier's defaults, and every error path that needs
no training."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import yaml
from mcp import Client

from conftest import REPO, answers_of, mcp_error, mcp_ok, questionnaire, render, unwrap
from mcp_wrapper import answers as mapping
from mcp_wrapper.server import build_server
from mcp_wrapper.settings import Settings

TOOLS = {"generate_fine_tuning_project", "update_project", "prepare_dataset", "configure_training_run",
         "start_training", "monitor_training_progress", "list_runs", "cancel_training", "evaluate_model",
         "export_model", "get_emissions_report", "generate_text", "import_data", "set_base_model", "commit_project",
         "wait_for_job", "cancel_job"}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "projects").mkdir()
    return tmp_path / "projects"


@pytest.fixture
def server(root):
    return build_server(Settings(output_dir=root))


def list_tools(server):
    async def go():
        async with Client(server) as client:
            return (await client.list_tools()).tools

    return {tool.name: tool for tool in anyio.run(go)}


def test_tools_have_input_and_output_schemas(server):
    tools = list_tools(server)
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.description and tool.output_schema and tool.output_schema["type"] == "object", tool.name
        assert "\n" not in tool.description and "  " not in tool.description, f"{tool.name}: indented description"
        hints = tool.annotations
        assert hints is not None and hints.read_only_hint is not None and hints.destructive_hint is not None, tool.name
        for name, schema in tool.input_schema["properties"].items():  # every parameter says what it is
            assert schema.get("description"), f"{tool.name}.{name} has no description"
    read_only = {name for name, tool in tools.items() if tool.annotations.read_only_hint}
    assert read_only == {"monitor_training_progress", "generate_text", "get_emissions_report", "list_runs",
                         "wait_for_job"}
    for name in ("import_data", "set_base_model", "prepare_dataset", "evaluate_model", "generate_text",
                 "export_model"):  # every long tool answers within a minute, with a job when its work goes on
        properties = tools[name].input_schema["properties"]
        assert properties["wait_seconds"]["maximum"] <= 50, name
        assert {"job_id", "job_status"} <= set(tools[name].output_schema["properties"]), name
    assert tools["export_model"].annotations.destructive_hint and tools["cancel_training"].annotations.destructive_hint
    assert "relative to the server's output folder" in \
        tools["list_runs"].input_schema["properties"]["project_path"]["description"]
    generate = tools["generate_fine_tuning_project"].input_schema
    assert generate["required"] == ["project_name"]
    for section in mapping.SECTIONS:
        assert section in generate["properties"], section
    lora = generate["$defs"]["LoraInput"]
    assert lora["additionalProperties"] is False
    assert "LoRA rank r" in lora["properties"]["rank"]["description"]
    base = generate["$defs"]["BaseModelInput"]["properties"]["type"]["anyOf"][0]
    assert base["enum"] == ["olmo", "llama", "mistral", "custom"]
    monitor = tools["monitor_training_progress"].output_schema["properties"]
    for field in ("status", "current_stage", "current_iteration", "total_iterations", "progress_percentage",
                  "metrics", "estimated_completion_time", "carbon_emissions_kg"):
        assert field in monitor, field


def test_every_question_is_answerable_and_nothing_else():
    asked = set(questionnaire())
    mapped = {q for fields in mapping.SECTIONS.values() for _, q in mapping.leaves(fields)} | set(
        mapping.TOP_LEVEL.values())
    assert mapped == asked, {"unanswerable": asked - mapped, "unknown to copier": mapped - asked}


def test_defaults_come_from_copier(server, root, tmp_path):
    out = mcp_ok(server, "generate_fine_tuning_project", {"project_name": "plain"})
    direct = answers_of(render(tmp_path / "direct", project_name="plain"))
    assert out["answers"] == {k: v for k, v in direct.items() if not k.startswith("_")}
    assert out["project_path"] == str(root / "plain")
    assert out["project_structure"]["config_file"].endswith("config/fine_tuning_config.yaml")
    assert any(s.endswith("scripts/train.py") for s in out["project_structure"]["scripts"])
    modules = {str(Path(m).relative_to(root / "plain")) for m in out["project_structure"]["trainer_modules"]}
    assert {"trainer/engines/base_trainer.py", "trainer/engines/mlx_trainer.py", "trainer/config.py",
            "trainer/runs/training_run_manager.py", "trainer/data/dataset_preparator.py"} <= modules
    assert "train" in out["command_examples"] and out["next_steps"]
    # a git repository with everything committed, ready for update_project
    assert (root / "plain" / ".git").is_dir()


def test_nested_values_reach_the_answers(server, root):
    out = mcp_ok(server, "generate_fine_tuning_project", {
        "project_name": "nested", "description": "Health notes", "version": "2.0.0",
        "base_model": {"type": "llama", "quantization": "q4"},
        "training": {"num_stages": 2, "stage1": {"learning_rate": 1e-4, "batch_size": 8},
                     "stage2": {"iterations": 40, "learning_rate": 2e-4, "replay_ratio": 0.2},
                     "quality_weighting": {"enabled": True, "multiplier": 3.0, "threshold": 0.6}},
        "lora": {"rank": 16, "target_modules": ["q_proj", "v_proj"]},
        "dataset": {"format": "csv", "quality_field": "score"},
        "features": {"enable_mlflow": True},
        "carbon_config": {"project_name": "carbon-x"},
        "integrations": {"mlflow_tracking_uri": "http://127.0.0.1:5000"},
    })
    a = out["answers"]
    assert (a["model_type"], a["model_id"], a["quantization"]) == ("llama", "meta-llama/Llama-3.2-1B-Instruct", "q4")
    assert (a["num_stages"], a["stage1_learning_rate"], a["stage1_batch_size"], a["replay_ratio"]) == (2, 1e-4, 8, 0.2)
    assert (a["stage2_iterations"], a["stage2_learning_rate"]) == (40, 2e-4)
    assert (a["enable_quality_weighting"], a["quality_weight_multiplier"], a["quality_threshold"]) == (True, 3.0, 0.6)
    assert (a["lora_rank"], a["lora_alpha"], a["lora_target_modules"]) == (16, 32, ["q_proj", "v_proj"])
    assert (a["dataset_format"], a["quality_field"], a["carbon_project_name"]) == ("csv", "score", "carbon-x")
    assert a["project_description"] == "Health notes" and a["mlflow_tracking_uri"] == "http://127.0.0.1:5000"
    config = yaml.safe_load((root / "nested" / "config" / "fine_tuning_config.yaml").read_text())
    assert config["training"]["stage2"]["replay_ratio"] == 0.2 and config["mlflow"]["enabled"] is True
    assert config["training"]["stage2"]["learning_rate"] == 2e-4
    assert config["training"]["quality_weight_multiplier"] == 3.0


@pytest.mark.parametrize(("arguments", "message"), [
    ({"lora": {"rank": 0}}, "lora.rank: lora_rank must be in [1, 1024], got 0"),
    ({"training": {"stage2": {"replay_ratio": 1.5}, "num_stages": 2}},
     "training.stage2.replay_ratio: replay_ratio must be in [0, 1)"),
    ({"training": {"stage1": {"iterations": 0}}}, "training.stage1.iterations: stage1_iterations must be"),
    ({"base_model": {"type": "custom"}}, "base_model.model_id: model_id must be a Hugging Face id"),
    ({"lora": {"rnak": 4}}, "lora.rnak"),
    ({"base_model": {"type": "gpt"}}, "base_model.type"),
    ({"integrations": {"codecarbon_project_name": "b"}}, "integrations.codecarbon_project_name"),
    ({"training": {"learning_rate": 1e-4}}, "training.learning_rate"),  # it is training.stage1.learning_rate
])
def test_bad_answers_are_refused_naming_the_field(server, root, arguments, message):
    text = mcp_error(server, "generate_fine_tuning_project", {"project_name": "bad", **arguments})
    assert message in text
    assert not (root / "bad").exists(), "a refused project leaves nothing behind"


def test_an_existing_project_is_not_overwritten(server, root):
    (root / "taken").mkdir()
    (root / "taken" / "notes.txt").write_text("mine")
    assert "already exists and is not empty" in mcp_error(server, "generate_fine_tuning_project",
                                                          {"project_name": "taken"})
    assert (root / "taken" / "notes.txt").read_text() == "mine"


def test_run_tools_need_a_project_and_a_known_run(server, root):
    assert "not a fine-tuning project" in mcp_error(server, "list_runs", {"project_path": str(root)})
    project = mcp_ok(server, "generate_fine_tuning_project", {"project_name": "runs"})["project_path"]
    assert mcp_ok(server, "list_runs", {"project_path": project})["runs"] == []
    for tool in ("monitor_training_progress", "start_training", "cancel_training"):
        text = mcp_error(server, tool, {"project_path": project, "run_id": "nope-1"})
        assert "unknown run id 'nope-1'" in text and "known runs: none" in text
    text = mcp_error(server, "evaluate_model", {"project_path": project, "run_id": "nope-1", "stage": 1})
    assert "unknown run id 'nope-1'" in text
    text = mcp_error(server, "configure_training_run", {"project_path": project, "run_name": "first"})
    assert "stage 1 train data file not found" in text and "(run prepare_dataset first)" in text
    text = mcp_error(server, "configure_training_run", {"project_path": project, "run_name": "x",
                                                        "training_data": {"train": "a.jsonl"}})
    assert "training_data.train is not known" in text


def test_prepare_and_configure_through_the_tools(server, root):
    project = mcp_ok(server, "generate_fine_tuning_project", {"project_name": "prep"})["project_path"]
    prepared = mcp_ok(server, "prepare_dataset", {"project_path": project})
    assert prepared["stages"]["stage1"]["counts"]["accepted"] == 280
    out = mcp_ok(server, "configure_training_run", {
        "project_path": project, "run_name": "first",
        "override_params": {"training": {"stage1": {"iterations": 12}}, "lora.rank": 4}})
    assert out["run_id"].startswith("first-")
    assert out["configuration_summary"]["stages"]["stage1"]["iterations"] == 12
    assert out["configuration_summary"]["lora"]["rank"] == 4
    status = mcp_ok(server, "monitor_training_progress", {"project_path": project, "run_id": out["run_id"]})
    assert status["status"] == "not_started" and status["process_alive"] is False
    runs = mcp_ok(server, "list_runs", {"project_path": project})["runs"]
    assert [r["run_id"] for r in runs] == [out["run_id"]]
    text = mcp_error(server, "configure_training_run", {"project_path": project, "run_name": "bad",
                                                        "override_params": {"lora": {"rank": 0}}})
    assert "lora.rank" in text


def test_update_refuses_a_dirty_project(server, root):
    project = mcp_ok(server, "generate_fine_tuning_project", {"project_name": "dirty"})["project_path"]
    (root / "dirty" / "README.md").write_text("edited, not committed\n")
    text = mcp_error(server, "update_project", {"project_path": project})
    assert "uncommitted changes" in text and unwrap(text[text.index("<<<untrusted-text"):]) == " M README.md", \
        "git's status lines come back whole, delimited"
    assert (root / "dirty" / "README.md").read_text() == "edited, not committed\n"


def test_settings_from_environment(tmp_path):
    env = {"OLMO_TEMPLATES_DIR": str(REPO), "OLMO_DEFAULT_OUTPUT_DIR": str(tmp_path / "out"),
           "OLMO_ALLOWED_ROOTS": f"{tmp_path / 'a'}:{tmp_path / 'b'}", "OLMO_TRUSTED_TEMPLATES": "/srv/tpl"}
    settings = Settings.from_env(env)
    assert settings.output_dir == (tmp_path / "out").resolve()
    assert settings.allowed_roots == [(tmp_path / "a").resolve(), (tmp_path / "b").resolve()]
    assert settings.trusted(str(REPO)) and settings.trusted("/srv/tpl") and not settings.trusted("/elsewhere")
    assert Settings.from_env({"OLMO_DEFAULT_OUTPUT_DIR": str(tmp_path)}).allowed_roots == [tmp_path.resolve()]
