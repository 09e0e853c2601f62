"""Experiment tracking: MLflow and Weights & Biases, each optional by config.

One MLflow run (and one W&B run) per training run, named after the run id and resumed
when the run is resumed: parameters at the start, every train/validation report as step
metrics, per-stage emissions as metrics (the spec's stage<N>_... names), and the manifest
and emissions CSVs as artifacts; evaluation adds its results later. A tracker that fails
(a server that is down, a missing package) is switched off with the reason recorded in the
manifest; training goes on.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

from trainer.config import FineTuningConfig
from trainer.observe.callbacks import TrainingCallback

log = logging.getLogger("trainer")
REWARDS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")  # dpo, orpo stages
STEP_KEYS = ("train_loss", "val_loss", "learning_rate", "tokens_per_second", "peak_memory_gb",
             *REWARDS, *(f"val_{k}" for k in REWARDS))
EMISSION_KEYS = {"emissions_kg": "carbon_emissions_kg_co2", "energy_kwh": "energy_consumed_kwh",
                 "cpu_energy_kwh": "cpu_energy_kwh", "gpu_energy_kwh": "gpu_energy_kwh",
                 "ram_energy_kwh": "ram_energy_kwh", "emissions_per_hour_kg": "emissions_per_hour_kg",
                 "carbon_intensity_g_per_kwh": "carbon_intensity_gco2_kwh"}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def mlflow_uri(config: FineTuningConfig) -> str:
    """The tracking URI with a relative local store made absolute against the project root."""
    uri = config.mlflow.tracking_uri
    match = re.match(r"^sqlite:///(?!/)(.+)$", uri)
    if match:
        path = config.resolve(match.group(1))
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if "://" not in uri:  # a plain directory: a file store
        return config.resolve(uri).as_uri()
    return uri


def _import_mlflow():
    # Bounded failures: without these a down server is retried for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    import mlflow

    return mlflow


class Tracking(TrainingCallback):
    """MLflow and W&B for one training process. Every call is safe: failures switch the tracker off."""

    def __init__(self, config: FineTuningConfig, run_dir: Path, run_id: str, previous: Optional[dict] = None):
        self.config, self.run_dir, self.run_id = config, run_dir, run_id
        self.previous = previous or {}
        self.state: dict[str, dict[str, Any]] = {}
        self.mlflow = None
        self.wandb_run = None
        self.offset = 0

    # ----------------------------------------------------------------- lifecycle

    def start(self, params: dict[str, Any]) -> None:
        if self.config.mlflow.enabled:
            self._guard("mlflow", self._start_mlflow, params)
        else:
            self.state["mlflow"] = {"status": "off"}
        if self.config.wandb.enabled and self.config.wandb.mode != "disabled":
            self._guard("wandb", self._start_wandb, params)
        else:
            self.state["wandb"] = {"status": "off"}

    def _start_mlflow(self, params: dict[str, Any]) -> None:
        mlflow = _import_mlflow()
        uri = mlflow_uri(self.config)
        mlflow.set_tracking_uri(uri)
        name = self.config.mlflow.experiment_name
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            local = uri.startswith(("sqlite:", "file:"))
            location = (self.config.root / "mlruns" / "artifacts").as_uri() if local else None
            experiment_id = mlflow.create_experiment(name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        earlier = (self.previous.get("mlflow") or {}).get("run_id")
        run = mlflow.start_run(run_id=earlier) if earlier else mlflow.start_run(
            experiment_id=experiment_id, run_name=self.run_id, tags={"olmo.run_id": self.run_id})
        if not earlier:
            items = {k: str(v)[:6000] for k, v in params.items()}
            for start in range(0, len(items), 100):
                mlflow.log_params(dict(list(items.items())[start:start + 100]))
        self.mlflow = mlflow
        self.state["mlflow"] = {"status": "logging", "run_id": run.info.run_id, "experiment_id": experiment_id,
                                "tracking_uri": uri}

    def _start_wandb(self, params: dict[str, Any]) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        folder = self.config.root / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        wandb_id = re.sub(r"[^A-Za-z0-9_-]", "-", self.run_id)[-64:]
        self.wandb_run = wandb.init(project=self.config.wandb.project, name=self.run_id, id=wandb_id,
                                    resume="allow", mode=self.config.wandb.mode, dir=str(self.config.root),
                                    config=params)
        self.state["wandb"] = {"status": "logging", "mode": self.config.wandb.mode, "id": wandb_id,
                               "dir": str(Path(self.wandb_run.dir).parent)}

    def _guard(self, name: str, function, *args) -> None:
        try:
            function(*args)
        except Exception as error:  # any failure of a tracker: off, with the reason
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
            log.warning("%s tracking is off for this run: %s", name, reason)
            self.state[name] = {**self.state.get(name, {}), "status": "failed", "reason": reason}
            if name == "mlflow":
                self.mlflow = None
            else:
                self.wandb_run = None

    # ----------------------------------------------------------------- reports

    def begin_stage(self, offset: int) -> None:
        """Iterations of earlier stages: steps are global across stages."""
        self.offset = offset

    def _metrics(self, info: dict[str, Any]) -> dict[str, float]:
        stage = info["stage"]
        return {f"stage{stage}_{k}": float(info[k]) for k in STEP_KEYS if info.get(k) is not None}

    def _log(self, info: dict[str, Any]) -> None:
        step = self.offset + info["iteration"]
        values = self._metrics(info)
        if self.mlflow is not None:
            self._guard("mlflow", self.mlflow.log_metrics, values, step)
        if self.wandb_run is not None:
            self._guard("wandb", self.wandb_run.log, {k.replace("_", "/", 1): v for k, v in values.items()}, step)

    on_train_loss_report = _log
    on_val_loss_report = _log

    def stage_emissions(self, stage: int, record: dict[str, Any]) -> None:
        if record.get("status") != "measured":
            return
        values = {f"stage{stage}_{name}": float(record[key]) for key, name in EMISSION_KEYS.items()
                  if record.get(key) is not None}
        values[f"stage{stage}_training_duration_hours"] = record["duration_seconds"] / 3600
        if self.mlflow is not None and self.config.mlflow.log_emissions:
            self._guard("mlflow", self.mlflow.log_metrics, values)
            if Path(record["csv"]).is_file():
                self._guard("mlflow", self.mlflow.log_artifact, record["csv"], f"emissions/stage{stage}")
        if self.wandb_run is not None:
            self._guard("wandb", self.wandb_run.summary.update, values)

    def finish(self, status: str) -> dict[str, dict[str, Any]]:
        """End the runs (FINISHED, FAILED or KILLED) after uploading the manifest; returns the state."""
        if self.mlflow is not None:
            manifest = self.run_dir / "run-manifest.json"
            if manifest.is_file():
                self._guard("mlflow", self.mlflow.log_artifact, str(manifest))
            if self.mlflow is not None:
                ending = {"completed": "FINISHED", "cancelled": "KILLED"}.get(status, "FAILED")
                self._guard("mlflow", self.mlflow.end_run, ending)
        if self.wandb_run is not None:
            self._guard("wandb", self.wandb_run.finish, 0 if status == "completed" else 1)
        for entry in self.state.values():
            if entry.get("status") == "logging":
                entry["status"] = "finished"
        return self.state


def log_evaluation(config: FineTuningConfig, manifest: dict[str, Any], stage: int, metrics: dict[str, Any],
                   results_file: Path) -> Optional[str]:
    """Add an evaluation to the run's MLflow run (if it has one); returns a reason when it could not."""
    run_id = ((manifest.get("tracking") or {}).get("mlflow") or {}).get("run_id")
    if not config.mlflow.enabled or not run_id:
        return None
    try:
        mlflow = _import_mlflow()
        mlflow.set_tracking_uri(mlflow_uri(config))
        with mlflow.start_run(run_id=run_id):
            mlflow.log_metrics({f"stage{stage}_eval_{k}": float(v) for k, v in metrics.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
            mlflow.log_artifact(str(results_file), f"evaluation/stage{stage}")
    except Exception as error:
        log.warning("MLflow: could not log the evaluation: %s", error)
        return f"{type(error).__name__}: {error}"
    return None
