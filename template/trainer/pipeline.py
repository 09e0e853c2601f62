"""Train a configured run: pick the backend, run its stages in order (stage 2 from the
stage-1 adapter, with replay), resume from checkpoints, and keep the manifest, status
and metrics current so other processes (the MCP server, dashboards) can follow along.

Started by `accelerate launch` or `mlx.launch`, every process runs this; rank 0 holds the
run's lock and writes its files, the other ranks train alongside and only read them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np

from trainer import distributed, emissions
from trainer.base_trainer import (
    Backend,
    Cancelled,
    StagePlan,
    TrainingCallback,
    TrainingError,
    checkpoint_dirs,
    hardware,
    prune_incomplete,
    train_stage,
)
from trainer.config import FineTuningConfig
from trainer.emissions import StageEmissions
from trainer.errors import advice
from trainer.files import TEMP_PREFIX, Reserve, write_json
from trainer.tracking import Tracking, flatten
from trainer.training_data import Sampler, quality_weights, read_records, tokenize
from trainer.training_run_manager import RunError, RunManager, now
from trainer.weighting import summary as weighting_summary

log = logging.getLogger("trainer")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def engines() -> dict[str, bool]:
    """Which training engines are installed."""
    return {"mlx": installed("mlx_lm"), "transformers": installed("torch") and installed("peft")}


def resolve_backend(config: FineTuningConfig) -> tuple[str, str]:
    """(backend, reason): mlx on Apple silicon, transformers with CUDA, else what is installed."""
    requested = config.training.backend
    has = engines()
    if requested != "auto":
        if not has[requested]:
            raise TrainingError(f"training.backend is {requested}, but it is not installed: "
                                f"pip install -e '.[{requested}]'")
        return requested, "set in the config"
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    cuda = has["transformers"] and _cuda()
    if apple and has["mlx"]:
        return "mlx", "auto: Apple silicon"
    if cuda:
        return "transformers", "auto: CUDA is available"
    if config.base_model.quantization != "none" and has["mlx"]:
        return "mlx", "auto: a quantized base needs mlx without CUDA"
    if has["transformers"]:
        return "transformers", "auto: installed (no CUDA, not Apple silicon)"
    if has["mlx"]:
        return "mlx", "auto: installed"
    raise TrainingError("no training backend is installed: pip install -e '.[transformers]' or '.[mlx]'")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def make_backend(name: str, seed: int, world: distributed.World | None = None) -> Backend:
    if name == "mlx":
        from trainer.mlx_trainer import MLXBackend

        return MLXBackend(seed, world)
    from trainer.transformers_trainer import TransformersBackend

    return TransformersBackend(seed, world)


class Follower(RunManager):
    """A run as ranks other than 0 see it: they read its files and never write them."""

    def update_manifest(self, run_id: str, change) -> dict[str, Any]:
        manifest = self.manifest(run_id)
        change(manifest)
        return manifest

    def write_status(self, run_id: str, **fields: Any) -> dict[str, Any]:
        return fields

    @contextmanager
    def lock(self, run_id: str):
        self.run_dir(run_id)  # an unknown run is refused on every rank
        yield {"cleaned": []}


class RunRecorder(TrainingCallback):
    """Appends every report to metrics.jsonl and keeps status.json current."""

    def __init__(self, manager: RunManager, run_id: str, offset: int, total: int):
        self.manager, self.run_id = manager, run_id
        self.offset, self.total = offset, total  # iterations of earlier stages, of all stages
        self.path = manager.run_dir(run_id) / "metrics.jsonl"
        self.last: dict[str, Any] = {}
        self.pace = 0.0  # seconds per iteration, from the stage's latest ETA

    def append(self, info: dict[str, Any]) -> None:
        line = (json.dumps(info) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write per line: readers never see half a line
        finally:
            os.close(fd)

    def _write(self, info: dict[str, Any]) -> None:
        self.append(info)
        self.last.update({k: v for k, v in info.items() if v is not None})
        self.manager.write_status(self.run_id, **self.position(info), total_iterations=info["total_iterations"],
                                  eta_seconds=self.eta(info), last_metrics=self.last)

    def position(self, info: dict[str, Any]) -> dict[str, Any]:
        """Where the run is: stage, iteration, and progress over every stage being trained."""
        done = self.offset + info["iteration"]
        return {"stage": info["stage"], "iteration": info["iteration"], "progress": round(100 * done / self.total, 2)}

    def eta(self, info: dict[str, Any]) -> Optional[float]:
        """Seconds until the run ends: the stage's own ETA, plus the later stages' iterations at
        this stage's pace (metrics.jsonl keeps the stage's ETA)."""
        eta = info.get("eta")
        if eta is None:
            return None
        left = info["total_iterations"] - info["iteration"]
        if left > 0:
            self.pace = eta / left
        later = self.total - self.offset - info["total_iterations"]
        return round(eta + later * self.pace, 1)

    on_train_loss_report = _write
    on_val_loss_report = _write

    def on_first_step(self, info: dict[str, Any]) -> None:
        """The first iteration's pace: an ETA for the whole run right after it starts."""
        self.manager.write_status(self.run_id, **self.position(info), total_iterations=info["total_iterations"],
                                  eta_seconds=self.eta(info))

    def on_checkpoint(self, info: dict[str, Any]) -> None:
        """A checkpoint is where a resume starts: the status says that iteration (a cancel
        between reports would otherwise show an older one than the checkpoint it kept)."""
        self.manager.write_status(self.run_id, **self.position(info), last_checkpoint=info["iteration"])


class Progress(TrainingCallback):
    """A progress bar on a terminal, log lines otherwise."""

    def __init__(self, stage: int, quiet: bool):
        self.stage, self.quiet = stage, quiet
        self.tty = sys.stderr.isatty()

    def on_train_loss_report(self, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        done, total = info["iteration"], info["total_iterations"]
        filled = int(30 * done / total)
        eta = time.strftime("%H:%M:%S", time.gmtime(info["eta"] or 0))
        line = (f"stage {self.stage} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} "
                f"loss {info['train_loss']:.4f} lr {info['learning_rate']:.2e} "
                f"{info['tokens_per_second']:.0f} tok/s eta {eta}")
        print(("\r" + line) if self.tty else line, end="" if self.tty and done < total else "\n", file=sys.stderr)

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        if not self.quiet:
            log.info("stage %s iteration %s: validation loss %.4f", self.stage, info["iteration"], info["val_loss"])


class EmissionsProbe(TrainingCallback):
    """At each validation report: the emissions so far into status.json (and the stage's CSV),
    with the config's alert thresholds checked."""

    def __init__(self, manager: RunManager, run_id: str, tracker: StageEmissions, earlier_kg: float):
        self.manager, self.run_id, self.tracker, self.earlier_kg = manager, run_id, tracker, earlier_kg

    def on_val_loss_report(self, info: dict[str, Any]) -> None:
        so_far = self.tracker.flush()
        if so_far is not None:
            total = self.earlier_kg + so_far
            hours = max(info.get("elapsed") or 0, 1e-9) / 3600
            self.manager.write_status(self.run_id, emissions_kg=total, emissions_alerts=emissions.alerts_of(
                total, so_far / hours, self.tracker.config))


def train_run(config: FineTuningConfig, run_id: str, stage: Optional[int] = None, resume: bool = False,
              quiet: bool = False) -> dict[str, Any]:
    """Train the run's stages (or one); returns the run's result. Raises TrainingError,
    Cancelled or RunError with the run's files left consistent."""
    run_config = RunManager(config).run_config(run_id)
    backend = resolve_backend(run_config)
    world = distributed.world_for(backend[0])
    manager = RunManager(config) if world.main else Follower(config)
    run_dir = manager.run_dir(run_id)
    with manager.lock(run_id) as found:
        stages = check_request(manager, run_id, run_config, backend, stage, resume, world)  # refusals change nothing
        reserve = _reserve(run_dir, run_id) if world.main else None
        handler = logging.FileHandler(run_dir / "train.log") if world.main else logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        if found["cleaned"]:
            log.info("removed leftovers of an interrupted writer: %s", found["cleaned"])
        stop = {"requested": False}
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
        try:
            return _train(manager, run_id, run_config, stages, backend, resume, quiet or not world.main,
                          lambda: stop["requested"], world)
        except (TrainingError, RunError) as error:
            _end(manager, run_id, "cancelled" if isinstance(error, Cancelled) else "failed", str(error), reserve)
            raise
        except BaseException as error:
            _end(manager, run_id, "failed", f"{type(error).__name__}: {error}", reserve)
            log.exception("failed")
            raise
        finally:
            if reserve is not None:
                reserve.release()
            signal.signal(signal.SIGTERM, previous)
            log.removeHandler(handler)
            handler.close()


def _reserve(run_dir: Path, run_id: str) -> Reserve:
    """Hold the run's disk reserve, or refuse to start (nothing written) on a disk too full for it."""
    reserve = Reserve(run_dir)
    try:
        reserve.hold()
    except OSError as error:
        raise RunError(f"run {run_id} cannot start: the disk holding {run_dir} cannot spare "
                       f"{Reserve.SIZE >> 20} MiB ({error.strerror}); free some space and start it again",
                       details={"run_id": run_id}) from None
    return reserve


def _end(manager: RunManager, run_id: str, status: str, error: str, reserve: Optional[Reserve] = None) -> None:
    """Record how the run ended, in the status and on the stage that was running. The disk
    reserve is freed first: after ENOSPC this is what makes room for the record."""
    if reserve is not None:
        reserve.release()

    def mark(manifest: dict[str, Any]) -> None:
        for entry in manifest["stages"].values():
            if entry["status"] == "running":
                entry.update(status=status, error=error)

    try:
        manager.write_status(run_id, status=status, error=error, finished_at=now())
        manager.update_manifest(run_id, mark)
    except OSError as failure:  # the cause still reaches the log and the script's error output
        log.error("could not record the end of the run: %s", failure)
    log.error("%s: %s", status, error)


def check_request(manager: RunManager, run_id: str, config: FineTuningConfig, backend: tuple[str, str],
                  only: Optional[int], resume: bool, world: distributed.World) -> list[int]:
    """The stages to train, or a RunError/TrainingError for a request that cannot be served
    (by the run's `config` with the resolved `backend`); nothing is written either way."""
    manifest = manager.manifest(run_id)
    stages = [only] if only else list(range(1, config.training.num_stages + 1))
    if only and f"stage{only}" not in manifest["stages"]:
        raise RunError(f"run {run_id} has no stage {only}; its stages: {sorted(manifest['stages'])}")
    for number in stages:
        if manifest["stages"][f"stage{number}"]["status"] == "completed" and not resume and only:
            raise RunError(f"stage {number} of run {run_id} is already completed; configure a new run to train again")
    if 2 in stages and 1 not in stages and manifest["stages"]["stage1"]["status"] != "completed":
        raise RunError(f"stage 2 of run {run_id} starts from the stage-1 adapter, and stage 1 has not completed; "
                       "train stage 1 first " + advice(f"(scripts/train.py --run-id {run_id} --stage 1)",
                                                         "(start_training with stage=1)"))
    for number in stages:
        distributed.check_batch(world, number, config.training.stage(number).batch_size)
    if backend[0] == "transformers" and config.base_model.quantization != "none" and not _cuda():
        from trainer.transformers_trainer import quantization_error

        raise quantization_error(config.base_model.quantization)
    return stages


def _train(manager: RunManager, run_id: str, config: FineTuningConfig, stages: list[int], backend: tuple[str, str],
           resume: bool, quiet: bool, stop, world: distributed.World) -> dict[str, Any]:
    run_dir = manager.run_dir(run_id)
    only = len(stages) == 1 and config.training.num_stages > 1
    backend_name, reason = backend
    manager.update_manifest(run_id, lambda m: m["backend"].update(resolved=backend_name, reason=reason,
                                                                  **world.describe()))
    totals = {n: config.training.stage(n).iterations for n in stages}
    started = now()
    manager.write_status(run_id, status="running", pid=os.getpid(), backend=backend_name, started_at=started,
                         error=None, finished_at=None, total_iterations_all_stages=sum(totals.values()))
    results = {}
    offset = 0
    tracking = Tracking(config, run_dir, run_id, manager.manifest(run_id).get("tracking"))
    if world.main:  # an unstarted Tracking logs nothing
        tracking.start(flatten(config.to_yaml_dict()) | {"backend": backend_name, "run_id": run_id,
                                                         "processes": world.size})
    manager.update_manifest(run_id, lambda m: m.__setitem__("tracking", tracking.state))
    ending = "failed"
    try:
        for number in stages:
            key = f"stage{number}"
            if manager.manifest(run_id)["stages"][key]["status"] == "completed" and (resume or not only):
                log.info("stage %s already completed; skipping", number)
                offset += totals[number]
                continue
            tracking.begin_stage(offset)
            results[key] = _train_stage(manager, run_id, config, number, backend_name, resume, quiet, stop,
                                        RunRecorder(manager, run_id, offset, sum(totals.values())), tracking, world)
            offset += totals[number]
        ending = "completed"
    except Cancelled:
        ending = "cancelled"
        raise
    finally:
        state = tracking.finish(ending)
        manager.update_manifest(run_id, lambda m: m.__setitem__("tracking", state))
    world.barrier()  # rank 0 has written the run's last records
    final = manager.manifest(run_id)
    if not world.main:  # every rank returns what rank 0 recorded
        results = {key: final["stages"][key].get("metrics", result) for key, result in results.items()}
    status = "completed" if all(s["status"] == "completed" for s in final["stages"].values()) else "not_started"
    if status == "completed" and world.main:
        manager.update_manifest(run_id, lambda m: m.__setitem__("final_model", _final_model(run_dir, final)))
    manager.write_status(run_id, status=status, finished_at=now(), progress=100.0 if status == "completed" else None)
    return {"run_id": run_id, "status": status, "backend": backend_name, "stages": results,
            "emissions": final.get("emissions"), "tracking": final.get("tracking"),
            "manifest_path": str(run_dir / "run-manifest.json")}


def _final_model(run_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """runs/<id>/final-model/: the last stage's adapter, what the run produced, with a note
    of where it comes from (export_model merges or converts it)."""
    last = max(manifest["stages"], key=lambda key: int(key.removeprefix("stage")))
    source = run_dir / manifest["stages"][last]["adapter_path"]
    target = run_dir / "final-model"
    tmp = run_dir / f"{TEMP_PREFIX}final-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    entry = {"path": "final-model", "stage": int(last.removeprefix("stage")), "source": f"{last}/adapters",
             "adapter_format": manifest["stages"][last].get("adapter_format"),
             "base_model": manifest["base_model"]["source"], "created_at": now()}
    write_json(tmp / "final-model.json", entry)
    old = run_dir / f"{TEMP_PREFIX}final-model-old-{os.getpid()}"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return entry


def _train_stage(manager: RunManager, run_id: str, config: FineTuningConfig, number: int, backend_name: str,
                 resume: bool, quiet: bool, stop, recorder: RunRecorder, tracking: Tracking,
                 world: distributed.World) -> dict[str, Any]:
    run_dir = manager.run_dir(run_id)
    key = f"stage{number}"
    entry = manager.manifest(run_id)["stages"][key]
    section = config.training.stage(number)
    training = config.training
    backend = make_backend(backend_name, training.seed + number, world)
    source = config.model_source()
    if config.base_model.local_path is not None and not Path(source).is_dir():
        raise RunError(f"base_model.local_path {source} does not exist", details={"stage": number})
    try:
        facts = backend.load(source, config.base_model.quantization, config.root / "models" / "quantized")
    except (OSError, ValueError) as error:
        raise TrainingError(f"could not load the base model {source} with {backend_name}: {error}. Without "
                            "network access set base_model.local_path to a local copy "
                            "(scripts/make_tiny_model.py builds a tiny one)", details={"stage": number}) from error
    parent = None
    if number == 2:
        parent = run_dir / "stage1" / "adapters"
        if not any(parent.glob("*.safetensors")):
            raise RunError(f"stage 2 needs the stage-1 adapter, and {parent} has none; train stage 1 first",
                           details={"stage": 2})
    trainable = backend.add_adapters(config.lora, training.gradient_checkpointing, parent)
    backend.setup_optimizer(training)

    def load(split: str, stage_dir: str = key):
        path = run_dir / stage_dir / "training-data" / f"{split}.jsonl"
        return tokenize(read_records(path), backend.tokenizer, training.max_seq_length, training.mask_prompt)

    train, valid = load("train"), load("valid")
    if not len(train):
        raise RunError(f"stage {number}: no training row fits max_seq_length {training.max_seq_length}",
                       details={"stage": number})
    def weigh(data):
        return quality_weights(data.quality, training.quality_weight_multiplier, training.quality_threshold,
                               training.quality_weighting)

    pools = [(weigh(train), 1.0)]
    replay_rows = 0
    if number == 2 and training.stage2.replay_ratio > 0:
        replay = load("train", "stage1")
        replay_rows = len(replay)
        pools = [(weigh(train), 1 - training.stage2.replay_ratio), (weigh(replay), training.stage2.replay_ratio)]
        train = train + replay  # concatenates references to the rows, copies none
    lengths = np.array([len(row) for row in train.tokens]) if training.length_grouping > 1 else None
    sampler = Sampler(pools, section.batch_size, training.seed, number, lengths, training.length_grouping)
    weights = weighting_summary(train.quality[: len(train) - replay_rows], training.quality_weight_multiplier,
                                training.quality_threshold, training.quality_weighting)

    start = 0
    if world.main:
        for path in prune_incomplete(run_dir / key / "checkpoints"):
            log.info("stage %s: ignored and removed an incomplete checkpoint %s", number, path.name)
        if not resume:  # a fresh start: checkpoints of an earlier attempt must not be resumed later
            for _, path in checkpoint_dirs(run_dir / key / "checkpoints"):
                shutil.rmtree(path)
    world.barrier()  # every rank sees the same checkpoints from here
    checkpoints = checkpoint_dirs(run_dir / key / "checkpoints") if resume else []
    if checkpoints:
        start, path = checkpoints[-1]
        backend.load_state(path)
        log.info("stage %s: resuming from %s (iteration %s)", number, path.name, start)
    metadata = {
        "stage": number, "backend": backend_name, "versions": {"python": platform.python_version(),
                                                               **backend.versions()},
        "seed": training.seed, "hardware": hardware(), "base_model": facts, "trainable_parameters": trainable,
        "lora": config.lora.model_dump() | {"scale": config.lora.scale},
        "data": entry["data"], "rows": {"train": len(train) - replay_rows, "replay": replay_rows,
                                        "valid": len(valid), "dropped_too_long": train.dropped + valid.dropped},
        "weighting": weights, "parent_adapter": entry["parent_adapter"], "resumed_from": start or None,
        "distributed": world.describe() | {"global_batch_size": sampler.batch_size},
    }
    if world.main:
        write_json(run_dir / key / "training_metadata.json", metadata)
    manager.update_manifest(run_id, lambda m: m["stages"][key].update(
        status="running", started_at=m["stages"][key]["started_at"] or now(), weighting=weights,
        trainable_parameters=trainable, metadata_file=f"{key}/training_metadata.json", error=None))

    plan = StagePlan(
        stage=number, train=train, valid=valid, sampler=sampler, iterations=section.iterations,
        learning_rate=section.learning_rate, warmup_steps=section.warmup_steps, schedule=training.lr_schedule,
        accumulation=training.gradient_accumulation_steps, batch_size=section.batch_size,
        log_steps=training.log_steps, eval_steps=training.eval_steps, save_steps=training.save_steps,
        val_batches=training.val_batches, checkpoint_dir=run_dir / key / "checkpoints",
        adapter_dir=run_dir / key / "adapters", start_iteration=start, stop_requested=stop,
        callbacks=[recorder, Progress(number, quiet), tracking] if world.main else [],
    )
    log.info("stage %s: %s backend, %s trainable parameters, %s rows (+%s replay), from iteration %s",
             number, backend_name, trainable, len(train) - replay_rows, replay_rows, start)
    if not world.main:  # rank 0 measures the machine; it writes every record
        result = train_stage(backend, plan).as_dict()
        return result | {"emissions": {"status": "measured by rank 0"}}
    tracker = StageEmissions(config, run_id, number)
    earlier = sum(s.get("emissions", {}).get("emissions_kg", 0) or 0
                  for k, s in manager.manifest(run_id)["stages"].items() if k != key)
    plan.callbacks.append(EmissionsProbe(manager, run_id, tracker, earlier))
    tracker.start()
    try:
        result = train_stage(backend, plan).as_dict()
    finally:  # a failed or cancelled stage still records what it emitted
        measured = _record_emissions(manager, run_id, config, number, tracker.stop(), recorder, tracking)
    result["emissions"] = measured
    manager.update_manifest(run_id, lambda m: m["stages"][key].update(
        status="completed", completed_at=now(), metrics=result, adapter_format=backend_name))
    return result


def _record_emissions(manager: RunManager, run_id: str, config: FineTuningConfig, number: int,
                      record: dict[str, Any], recorder: RunRecorder, tracking: Tracking) -> dict[str, Any]:
    """A stage's emissions into the manifest (stage entry and run totals), metrics.jsonl, status and trackers."""
    key = f"stage{number}"
    if record.get("status") == "measured" and manager.manifest(run_id)["stages"][key].get("emissions", {}).get(
            "status") == "measured" and config.carbon_tracking.enabled:
        record = emissions.read_csv(emissions.csv_path(config, run_id, number))  # resumed: every session counts

    def store(manifest: dict[str, Any]) -> None:
        manifest["stages"][key]["emissions"] = record
        measured = {k: s["emissions"] for k, s in manifest["stages"].items() if "emissions" in s}
        manifest["emissions"] = emissions.totals(measured, config)

    manifest = manager.update_manifest(run_id, store)
    run_totals = manifest["emissions"]
    manager.write_status(run_id, emissions_kg=run_totals["total_kg"], emissions_alerts=run_totals["alerts"])
    if record.get("status") == "measured":
        recorder.append({"type": "emissions", "stage": number, "iteration": recorder.last.get("iteration"),
                         **{k: record[k] for k in ("emissions_kg", "energy_kwh", "cpu_energy_kwh", "gpu_energy_kwh",
                                                   "ram_energy_kwh", "duration_seconds",
                                                   "carbon_intensity_g_per_kwh")}})
        log.info("stage %s: %.6f kg CO2eq, %.6f kWh in %.0f s", number, record["emissions_kg"],
                 record["energy_kwh"], record["duration_seconds"])
    tracking.stage_emissions(number, record)
    return record
