"""copier.yml: every question is well formed, every validator rejects what it should
(naming the question), defaults derive from earlier answers, and `when` hides questions."""

from __future__ import annotations

import pytest
import yaml

from conftest import REPO, answers_of, questionnaire, render

QUESTIONS = questionnaire()

# Every question a wrong value is possible for: (bad value, answers it depends on).
BAD_ANSWERS = {
    # "x\n" cases: a regex with '$' would accept a trailing newline (it needs a full match)
    "project_name": [("My Project", {}), ("9lives", {}), ("trailing-", {}), ("p9\n", {})],
    "project_description": [("one\ntwo", {}), ("tab\there", {}), ("nul\x00", {})],
    "project_version": [("version one", {}), ("1.0.0\n", {})],
    "model_id": [("not an id", {}), ("", {"model_type": "custom"}), ("a/b\n", {})],
    "model_local_path": [('bad"path', {}), ("models/x\ncarbon_tracking:", {})],
    "stage1_iterations": [(0, {})],
    "stage1_learning_rate": [(0, {}), (1.5, {})],
    "stage1_batch_size": [(0, {})],
    "stage1_warmup_steps": [(-1, {}), (101, {"stage1_iterations": 100})],
    "stage2_iterations": [(0, {"num_stages": 2})],
    "stage2_learning_rate": [(0, {"num_stages": 2})],
    "stage2_batch_size": [(0, {"num_stages": 2})],
    "stage2_warmup_steps": [(500, {"num_stages": 2, "stage2_iterations": 150})],
    "stage1_beta": [(0, {"stage1_method": "dpo"}), (11, {"stage1_method": "orpo"})],
    "stage2_beta": [(-0.1, {"num_stages": 2, "stage2_method": "dpo"})],
    "replay_ratio": [(1.0, {"num_stages": 2}), (-0.1, {"num_stages": 2})],
    "gradient_accumulation_steps": [(0, {})],
    "save_steps": [(0, {})],
    "eval_steps": [(0, {})],
    "max_seq_length": [(8, {})],
    "seed": [(-1, {})],
    "lora_rank": [(0, {}), (4096, {})],
    "lora_alpha": [(0, {})],
    "lora_dropout": [(1.0, {})],
    "lora_target_modules": [("q_proj", {}), ([], {}), (["q proj"], {}), ({"q_proj": 1}, {}), (["q_proj\n"], {})],
    "lora_num_layers": [(0, {}), (-2, {})],
    "export_formats": [("gguf", {}), (["onnx"], {}), ({"gguf": 1}, {}), (["adapters"], {"fine_tune": "full"})],
    "fine_tune": [("full", {"quantization": "q4"})],
    "instruction_field": [("bad!", {}), ("", {}), ("instruction\n", {})],
    "input_field": [("bad!", {})],
    "system_field": [("bad!", {})],
    "output_field": [("bad!", {}), ("instruction", {"instruction_field": "instruction"})],
    "quality_field": [("bad!", {}), ("1st", {})],
    "metadata_field": [("bad!", {})],
    "train_split": [(0, {}), (1, {})],
    "validation_split": [(0, {})],
    "test_split": [(0.5, {}), (0, {})],
    "quality_weight_multiplier": [(0.5, {})],
    "quality_threshold": [(1.5, {})],
    "carbon_project_name": [("  ", {}), ("x\ny", {})],
    "carbon_country_iso_code": [("usa", {}), ("US", {}), ("USA\n", {})],
    "mlflow_tracking_uri": [("::nope", {"enable_mlflow": True}), ("mlruns\nx: 1", {"enable_mlflow": True})],
    "wandb_project": [("has space", {"enable_wandb": True}), ("w\n", {"enable_wandb": True})],
    "hf_repo_prefix": [("-bad", {"enable_huggingface_upload": True}), ("me\n", {"enable_huggingface_upload": True})],
}
CHOICE_ANSWERS = {"model_type": "gpt", "quantization": "q3", "num_stages": 3, "backend": "jax", "dataset_format": "xml",
                  "stage1_method": "ppo", "stage2_method": "kto", "fine_tune": "qlora"}


def test_every_question_has_type_and_help():
    for name, spec in QUESTIONS.items():
        assert spec.get("type") in {"str", "int", "float", "bool", "yaml"}, name
        assert spec.get("help", "").strip(), f"{name} has no help"
        assert "default" in spec, f"{name} has no default"


def test_every_free_question_has_a_validator_and_a_failing_case():
    """Questions without choices that are not booleans or prose need a validator, and
    every validator appears in BAD_ANSWERS (so this file tests it)."""
    for name, spec in QUESTIONS.items():
        if "choices" in spec or spec["type"] == "bool":
            continue
        assert "validator" in spec, f"{name} can take a wrong value but has no validator"
    with_validator = {n for n, s in QUESTIONS.items() if "validator" in s}
    assert with_validator == set(BAD_ANSWERS), with_validator ^ set(BAD_ANSWERS)
    assert {n for n, s in QUESTIONS.items() if "choices" in s} == set(CHOICE_ANSWERS)


@pytest.mark.parametrize(
    ("question", "bad", "context"),
    [(q, bad, ctx) for q, cases in BAD_ANSWERS.items() for bad, ctx in cases],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_validator_rejects_and_names_the_question(tmp_path, question, bad, context):
    with pytest.raises(ValueError) as caught:
        render(tmp_path / "p", **{**context, question: bad})
    message = str(caught.value)
    assert f"question '{question}'" in message and question in message.split(":", 1)[1]
    assert not (tmp_path / "p" / "config").exists(), "nothing may be written for rejected answers"


@pytest.mark.parametrize(("question", "bad"), CHOICE_ANSWERS.items())
def test_choices_reject_unknown_values(tmp_path, question, bad):
    with pytest.raises(ValueError, match=f"Invalid choice for '{question}'"):
        render(tmp_path / "p", **{question: bad})


def test_custom_model_requires_a_model_id(tmp_path):
    with pytest.raises(ValueError, match="model_id.*required for custom models"):
        render(tmp_path / "p", model_type="custom")
    project = render(tmp_path / "q", model_type="custom", model_id="Qwen/Qwen2.5-0.5B-Instruct")
    assert answers_of(project)["model_id"] == "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.mark.parametrize(("model_type", "model_id", "modules"), [
    ("olmo", "allenai/OLMo-2-0425-1B-Instruct", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("llama", "meta-llama/Llama-3.2-1B-Instruct", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("mistral", "mistralai/Mistral-7B-Instruct-v0.3", ["q_proj", "k_proj", "v_proj", "o_proj"]),
])
def test_defaults_follow_the_model_type(tmp_path, model_type, model_id, modules):
    answers = answers_of(render(tmp_path / "p", model_type=model_type))
    assert answers["model_id"] == model_id
    assert answers["lora_target_modules"] == modules
    assert answers["export_formats"] == ["adapters", "huggingface", "gguf"]  # GGUF exports all three families


def test_a_custom_model_does_not_plan_gguf_by_default(tmp_path):
    answers = answers_of(render(tmp_path / "p", model_type="custom", model_id="Qwen/Qwen2.5-0.5B-Instruct"))
    assert answers["export_formats"] == ["adapters", "huggingface"]


def test_defaults_derive_from_earlier_answers(tmp_path):
    project = render(tmp_path / "p", project_name="health-notes", lora_rank=32, train_split=0.7,
                     validation_split=0.2, stage1_batch_size=8, num_stages=2)
    answers = answers_of(project)
    assert answers["lora_alpha"] == 64
    assert answers["test_split"] == pytest.approx(0.1)
    assert answers["stage2_batch_size"] == 8
    assert answers["carbon_project_name"] == "health-notes"
    config = yaml.safe_load((project / "config" / "fine_tuning_config.yaml").read_text())
    assert config["dataset"]["test_split"] == pytest.approx(0.1)
    assert config["mlflow"]["experiment_name"] == "health-notes-training"


def test_column_names_may_be_in_any_script(tmp_path):
    project = render(tmp_path / "p", instruction_field="Frage", output_field="Antwort", quality_field="Güte",
                     metadata_field="métadonnées")
    dataset = yaml.safe_load((project / "config" / "fine_tuning_config.yaml").read_text())["dataset"]
    assert (dataset["instruction_field"], dataset["quality_field"], dataset["metadata_field"]) == (
        "Frage", "Güte", "métadonnées")


def test_when_hides_stage2_questions_for_one_stage(tmp_path):
    stage2 = {"stage2_iterations", "stage2_learning_rate", "stage2_batch_size", "stage2_warmup_steps", "replay_ratio",
              "stage2_method"}
    assert all(QUESTIONS[q]["when"] == "{{ num_stages == 2 }}" for q in stage2)
    assert QUESTIONS["stage2_beta"]["when"] == "{{ num_stages == 2 and stage2_method != 'sft' }}"
    one = render(tmp_path / "one", num_stages=1)
    assert not stage2 & set(answers_of(one))
    assert "stage2" not in yaml.safe_load((one / "config" / "fine_tuning_config.yaml").read_text())["training"]
    two = render(tmp_path / "two", num_stages=2, replay_ratio=0.25)
    assert stage2 <= set(answers_of(two))
    stage = yaml.safe_load((two / "config" / "fine_tuning_config.yaml").read_text())["training"]["stage2"]
    assert stage == {"iterations": 150, "learning_rate": 1e-4, "batch_size": 4, "warmup_steps": 0, "replay_ratio": 0.25,
                     "method": "sft", "beta": 0.1}
    dpo = render(tmp_path / "dpo", num_stages=2, stage2_method="dpo", stage2_beta=0.3)
    assert answers_of(dpo)["stage2_beta"] == 0.3 and "stage2_beta" not in answers_of(two)  # asked only for dpo/orpo
    stage = yaml.safe_load((dpo / "config" / "fine_tuning_config.yaml").read_text())["training"]["stage2"]
    assert (stage["method"], stage["beta"]) == ("dpo", 0.3)


@pytest.mark.parametrize(("flag", "dependents"), [
    ("enable_quality_weighting", {"quality_weight_multiplier", "quality_threshold"}),
    ("enable_carbontracking", {"carbon_project_name", "carbon_country_iso_code", "carbon_offline_mode"}),
    ("enable_mlflow", {"mlflow_tracking_uri"}),
    ("enable_wandb", {"wandb_project"}),
    ("enable_huggingface_upload", {"hf_repo_prefix", "hf_private_repos"}),
])
def test_feature_questions_are_asked_only_when_enabled(tmp_path, flag, dependents):
    off = answers_of(render(tmp_path / "off", **{flag: False}))
    on = answers_of(render(tmp_path / "on", **{flag: True}))
    assert not dependents & set(off)
    assert dependents <= set(on)


def test_strict_undefined_and_settings():
    data = yaml.safe_load((REPO / "copier.yml").read_text())
    assert data["_envops"]["undefined"] == "jinja2.StrictUndefined"
    assert data["_subdirectory"] == "template"
    assert data["_min_copier_version"]
    assert data["_skip_if_exists"] == [".env"]  # not the samples: a removed one must stay removed
    assert (REPO / "template" / "{{_copier_conf.answers_file}}.jinja").is_file()


def test_readme_documents_every_question():
    readme = (REPO / "README.md").read_text()
    missing = [name for name in QUESTIONS if f"`{name}`" not in readme]
    assert not missing, f"README.md's questionnaire table lacks {missing}"
