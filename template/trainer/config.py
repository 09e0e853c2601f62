"""The project's configuration: config/fine_tuning_config.yaml as a validated pydantic model.

One-way flow: defaults in the models below, then the YAML file, then environment
overrides (OLMO_<SECTION>__<KEY>[__<KEY>...]), then explicit overrides from code or
the command line. Validation fails fast with messages that name the key, the allowed
values and where the bad value came from (the file or the environment variable).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.config_overrides import ENV_DELIMITER, ENV_PREFIX, apply, describe, env_overrides  # noqa: F401
from trainer.errors import ConfigError  # noqa: F401  (re-exported: callers catch trainer.config.ConfigError)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "fine_tuning_config.yaml"

# Hugging Face `model_type` of each base model family (used for tiny models and exports).
ARCHITECTURES = {"olmo": "olmo2", "llama": "llama", "mistral": "mistral", "custom": "llama"}

# Kinds of fields that are not plain values (trainer.guard holds requests from outside to them);
# fields typed Path are paths without saying so.
RAW_EXTENSIONS = ("jsonl", "csv", "parquet", "pq")  # what trainer.data.dataset_preparator reads
GLOBS, CODE, ENDPOINT, STORE, MODEL = ({"guard": kind} for kind in ("globs", "code", "endpoint", "store", "model"))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _optional_name(value: Any) -> Any:
    """Empty strings mean 'not set' for optional field names and paths."""
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _code_names(value: Any) -> Any:
    """CODE fields name 'package.module:function'; only their shape is checked here (imported when used)."""
    bad = [n for n in (value if isinstance(value, list) else [value])
           if n is not None and (":" not in str(n) or not all(str(n).partition(":")[::2]))]
    if bad:
        raise ValueError(f"must look like 'package.module:function', got {', '.join(map(repr, bad))}")
    return value


class ProjectSection(Section):
    name: str = Field(pattern=r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$", description="project slug")
    description: str = ""
    version: str = "1.0.0"


class BaseModelSection(Section):
    type: Literal["olmo", "llama", "mistral", "custom"] = "olmo"
    model_id: str = Field(default="allenai/OLMo-2-0425-1B-Instruct", min_length=3, json_schema_extra=MODEL)
    local_path: Optional[Path] = None
    quantization: Literal["none", "q4", "q8"] = "none"

    _clean_path = field_validator("local_path", mode="before")(_optional_name)

    @field_validator("local_path")
    @classmethod
    def _expand(cls, value: Optional[Path]) -> Optional[Path]:
        return value.expanduser() if value is not None else None

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.type]


class StageSection(Section):
    iterations: int = Field(default=100, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0, lt=1)
    batch_size: int = Field(default=4, ge=1)
    warmup_steps: int = Field(default=10, ge=0)
    method: Literal["sft", "dpo", "orpo"] = "sft"  # dpo and orpo train on preference pairs (engines.preference)
    beta: float = Field(default=0.1, gt=0, le=10)  # DPO's beta (strength of the pull to the reference), ORPO's lambda

    @model_validator(mode="after")
    def _warmup_fits(self) -> StageSection:
        if self.warmup_steps > self.iterations:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed iterations ({self.iterations})")
        return self


class Stage2Section(StageSection):
    iterations: int = Field(default=150, ge=1)
    learning_rate: float = Field(default=1e-4, gt=0, lt=1)
    warmup_steps: int = Field(default=0, ge=0)
    replay_ratio: float = Field(default=0.15, ge=0, lt=1)


class TrainingSection(Section):
    num_stages: Literal[1, 2] = 1
    backend: Literal["auto", "mlx", "transformers"] = "auto"
    seed: int = Field(default=42, ge=0)
    max_seq_length: int = Field(default=2048, ge=16)
    gradient_checkpointing: bool = True
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    mask_prompt: bool = True
    stage1: StageSection = StageSection()
    stage2: Optional[Stage2Section] = None
    quality_weighting: bool = True
    quality_weight_multiplier: float = Field(default=2.5, ge=1, le=100)
    quality_threshold: float = Field(default=0.8, ge=0, le=1)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    save_steps: int = Field(default=50, ge=1)
    eval_steps: int = Field(default=25, ge=1)
    log_steps: int = Field(default=10, ge=1)
    val_batches: int = Field(default=25)
    # Draw N batches at once, cut from the rows sorted by length: less padding, the same rows (1 = off)
    length_grouping: int = Field(default=1, ge=1, le=1024)
    packing: bool = False  # rows side by side, positions and attention per row (transformers; collate)
    fine_tune: Literal["lora", "full"] = "lora"  # full: every weight trains; a stage saves a whole model
    precision: Literal["auto", "float32", "bf16"] = "auto"  # bf16: autocast, float32 weights (transformers)

    @field_validator("val_batches")
    @classmethod
    def _val_batches(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"val_batches must be -1 (the whole validation set) or >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _stage2_present(self) -> TrainingSection:
        if self.num_stages == 2 and self.stage2 is None:
            raise ValueError("num_stages is 2 but the stage2 section is missing")
        return self

    def stage(self, number: int) -> StageSection:
        if number == 1:
            return self.stage1
        if number == 2 and self.num_stages == 2 and self.stage2 is not None:
            return self.stage2
        raise ValueError(f"stage {number} does not exist: this project has {self.num_stages} stage(s)")


class LoraSection(Section):
    rank: int = Field(default=8, ge=1, le=1024)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)
    num_layers: int = -1
    use_dora: bool = False  # DoRA: a learned magnitude per output beside the low-rank direction (both engines)

    @field_validator("target_modules")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        bad = [m for m in value if not m or not m.replace("_", "a").replace(".", "a").isalnum()]
        if bad:
            raise ValueError(f"target_modules entries must be module names such as q_proj, got {bad}")
        return value

    @field_validator("num_layers")
    @classmethod
    def _layers(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError(f"num_layers must be -1 (all layers) or >= 1, got {value}")
        return value

    @property
    def scale(self) -> float:
        """The LoRA update's scale, alpha / rank, the same on both backends."""
        return self.alpha / self.rank


class DatasetSection(Section):
    format: Literal["jsonl", "csv", "parquet"] = "jsonl"
    raw_files: list[str] = Field(default_factory=lambda: [f"data/raw/*.{x}" for x in RAW_EXTENSIONS], min_length=1,
                                 json_schema_extra=GLOBS)
    stage2_raw_files: list[str] = Field(default_factory=lambda: [f"data/raw/stage2/*.{x}" for x in RAW_EXTENSIONS],
                                        min_length=1, json_schema_extra=GLOBS)
    processed_dir: Path = Path("data/processed")
    reports_dir: Path = Path("data/quality_reports")
    record_format: Literal["chat", "completions"] = "chat"
    instruction_field: str = Field(default="instruction", min_length=1)
    input_field: Optional[str] = "input"
    system_field: Optional[str] = None
    output_field: str = Field(default="output", min_length=1)
    quality_field: Optional[str] = "quality"
    metadata_field: Optional[str] = "metadata"
    prompt_field: str = Field(default="prompt", min_length=1)  # pairs (dpo, orpo); else the instruction fields
    chosen_field: str = Field(default="chosen", min_length=1)
    rejected_field: str = Field(default="rejected", min_length=1)
    deduplicate: bool = True
    train_split: float = Field(default=0.8, gt=0, lt=1)
    validation_split: float = Field(default=0.1, gt=0, lt=1)
    test_split: float = Field(default=0.1, gt=0, lt=1)

    _clean = field_validator("input_field", "system_field", "quality_field", "metadata_field", mode="before")(
        _optional_name)

    @model_validator(mode="after")
    def _check(self) -> DatasetSection:
        total = self.train_split + self.validation_split + self.test_split
        if abs(total - 1) > 1e-3:
            raise ValueError(f"train_split + validation_split + test_split must sum to 1, got "
                             f"{self.train_split} + {self.validation_split} + {self.test_split} = {total:g}")
        fields = [self.instruction_field, self.input_field, self.system_field, self.output_field,
                  self.quality_field, self.metadata_field]
        named = [f for f in fields if f]
        answers = {self.chosen_field, self.rejected_field}  # a pair's answers (output_field may be one: SFT on it)
        if len(named) != len(set(named)) or len(answers) < 2 or answers & (set(named) - {self.output_field}
                                                                            | {self.prompt_field}):
            raise ValueError(f"the dataset field names must be distinct, got {named + [self.prompt_field]} "
                             f"and the answers' {self.chosen_field}, {self.rejected_field}")
        return self


class MlxSection(Section):
    enabled: bool = True
    memory_efficient: bool = True


class CarbonAlerts(Section):
    high_emissions_kg: float = Field(default=10.0, gt=0)
    high_emissions_per_hour_kg: float = Field(default=2.0, gt=0)


class CarbonSection(Section):
    enabled: bool = True
    project_name: str = Field(default="fine-tuning", min_length=1)
    country_iso_code: str = Field(default="USA", pattern=r"^[A-Z]{3}$")
    offline_mode: bool = True
    emissions_endpoint: Optional[str] = Field(default=None, json_schema_extra=ENDPOINT)
    output_dir: Path = Path("emissions")
    tracking_mode: Literal["process", "machine"] = "process"
    measure_power_secs: float = Field(default=15, gt=0)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "warning"
    # Offsets: voluntary-market prices run from a few dollars (avoidance) to hundreds (removal) a tonne
    offset_price_usd_per_tonne: float = Field(default=15.0, ge=0)
    # 'package.module:function' called as function(config, run_id, stage), returning a tracker with
    # CodeCarbon's start/stop/flush/final_emissions_data; empty: CodeCarbon's own
    tracker_factory: Optional[str] = Field(default=None, json_schema_extra=CODE)
    alerts: CarbonAlerts = CarbonAlerts()

    _code = field_validator("tracker_factory", mode="before")(lambda value: _code_names(_optional_name(value)))


class MlflowSection(Section):
    enabled: bool = False
    tracking_uri: str = Field(default="sqlite:///mlruns/mlflow.db", json_schema_extra=STORE)
    experiment_name: str = "fine-tuning"
    log_emissions: bool = True


class WandbSection(Section):
    enabled: bool = False
    project: str = "fine-tuning"
    mode: Literal["offline", "online", "disabled"] = "offline"


class HuggingfaceSection(Section):
    enabled: bool = False
    repo_prefix: str = "your-username"
    private_repos: bool = True
    upload_staging_dir: Path = Path("upload_staging")


class GenerationSection(Section):
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=256, ge=1)


class EvaluationSection(Section):
    enabled: bool = True
    metrics: list[Literal["perplexity", "accuracy", "bleu", "chrf"]] = Field(
        default_factory=lambda: ["perplexity", "accuracy", "bleu", "chrf"]
    )
    custom_metrics: list[str] = Field(default_factory=list, description="'package.module:function' names",
                                      json_schema_extra=CODE)
    # relative: the tuned model beats the base model on the same held-out rows by the threshold
    # (0.1 = 10% better); absolute: the metric itself reaches it (the spec's accuracy 0.7/0.7/0.6)
    threshold_metric: Literal["chrf", "bleu", "accuracy", "perplexity"] = "chrf"
    threshold_mode: Literal["relative", "absolute"] = "relative"
    stage1_threshold: float = Field(default=0.1, ge=0)
    stage2_threshold: float = Field(default=0.1, ge=0)
    sequential_threshold: float = Field(default=0.9, ge=0)
    generation: GenerationSection = GenerationSection()

    @model_validator(mode="after")
    def _threshold_scale(self) -> EvaluationSection:
        if self.threshold_metric not in self.metrics:
            raise ValueError(f"threshold_metric '{self.threshold_metric}' must be one of the measured metrics "
                             f"({', '.join(self.metrics)})")
        if self.threshold_mode == "absolute":
            top = {"accuracy": 1.0, "chrf": 100.0, "bleu": 100.0}.get(self.threshold_metric)
            for name in ("stage1_threshold", "stage2_threshold", "sequential_threshold"):
                if top is not None and getattr(self, name) > top:
                    raise ValueError(f"{name} {getattr(self, name)} is above what {self.threshold_metric} "
                                     f"reaches ({top:g})")
        return self

    _code = field_validator("custom_metrics")(lambda value: _code_names(value))


EXPORT_FORMATS = ("adapters", "safetensors", "huggingface", "mlx", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s",
              "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs")  # past q8_0: llama.cpp's quantizer


class ExportSection(Section):
    # Formats this project means to export: checked against the base model when a run is configured
    formats: list[Literal[EXPORT_FORMATS]] = Field(default_factory=lambda: ["adapters", "huggingface"])
    output_dir: Path = Path("exports")
    gguf_quantization: Literal[GGUF_TYPES] = "q8_0"
    mlx_quantization: Literal["none", "q4", "q8"] = "none"


class PathsSection(Section):
    runs_dir: Path = Path("runs")
    logs_dir: Path = Path("logs")


class FineTuningConfig(Section):
    project: ProjectSection
    base_model: BaseModelSection = BaseModelSection()
    training: TrainingSection = TrainingSection()
    lora: LoraSection = LoraSection()
    dataset: DatasetSection = DatasetSection()
    mlx: MlxSection = MlxSection()
    carbon_tracking: CarbonSection = CarbonSection()
    mlflow: MlflowSection = MlflowSection()
    wandb: WandbSection = WandbSection()
    huggingface: HuggingfaceSection = HuggingfaceSection()
    evaluation: EvaluationSection = EvaluationSection()
    export: ExportSection = ExportSection()
    paths: PathsSection = PathsSection()

    @model_validator(mode="after")
    def _full_fits(self) -> FineTuningConfig:
        if self.training.fine_tune == "full" and (self.base_model.quantization != "none" or self.lora.use_dora):
            raise ValueError("training.fine_tune full trains every weight: it takes neither "
                             "base_model.quantization (quantized weights do not train) nor lora.use_dora")
        return self

    # Where relative paths point, and the file this was loaded from; not part of the YAML.
    _root: Path = PROJECT_ROOT
    _source: Path = DEFAULT_CONFIG

    @property
    def root(self) -> Path:
        return self._root

    @property
    def source(self) -> Path:
        return self._source

    def resolve(self, path: Path | str) -> Path:
        """A config path made absolute against the project root ('~' expanded)."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else (self._root / path)

    def model_source(self) -> str:
        """Where the base model loads from: the local directory if set, else the hub id."""
        if self.base_model.local_path is not None:
            return str(self.resolve(self.base_model.local_path))
        return self.base_model.model_id

    def to_yaml_dict(self) -> dict[str, Any]:
        """Plain data (paths as strings) for snapshots in run manifests."""
        return self.model_dump(mode="json")


# ----------------------------------------------------------------- loading


def load_config(
    path: Path | str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    root: Path | str | None = None,
) -> FineTuningConfig:
    """Load and validate the config: YAML file, then environment, then `overrides`.

    `overrides` maps dotted keys ("training.stage1.iterations") to values. `root` is the
    directory relative paths are resolved against; by default the project that holds
    the file (the parent of its config/ folder).
    """
    path = Path(path).expanduser() if path is not None else DEFAULT_CONFIG
    environ = os.environ if environ is None else environ
    if not path.is_file():
        raise ConfigError(str(path), [f"config file not found: {path}"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(str(path), [f"not valid YAML at {where}: {getattr(error, 'problem', error)}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), [f"the top level must be a mapping of sections, got {type(data).__name__}"])

    found = env_overrides(environ)
    for dotted, value in (overrides or {}).items():
        found[tuple(dotted.split("."))] = (f"override {dotted}", value)
    problems = apply(FineTuningConfig, data, found)
    if problems:
        raise ConfigError(str(path), problems)

    sources = {key: name for key, (name, _) in found.items()}
    try:
        config = FineTuningConfig.model_validate(data)
    except ValidationError as error:
        problems = [describe(FineTuningConfig, e, sources, str(path)) for e in error.errors()]
        raise ConfigError(str(path), problems) from None

    if root is None:
        parent = path.resolve().parent
        root = parent.parent if parent.name == "config" else parent
    config._root = Path(root).resolve()
    config._source = path.resolve()
    return config
