"""Train a configured run: pick the backend, run its stages in order (stage 2 from the
stage-1 adapter, with replay), resume from checkpoints, and keep the manifest, status
and metrics current so other processes (the MCP server, dashboards) can follow along.

Started by `accelerate launch` or `mlx.launch`, every process runs this; rank 0 holds the
run's lock and writes its files, the other ranks train alongside and only read them.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from trainer.config import FineTuningConfig
from trainer.data.training_data import Sampler, quality_weights, read_records, tokenize
from trainer.data.weighting import summary as weighting_summary
from trainer.engines import distributed, fast_paths, preference
from trainer.engines.backends import (  # noqa: F401  (engines, installed: re-exported, they were here)
    cuda_available,
    engines,
    installed,
    make_backend,
    precision_error,
    resolve_backend,
)
from trainer.engines.base_trainer import (
    Cancelled,
    StagePlan,
    TrainingError,
    checkpoint_dirs,
    hardware,
    prune_incomplete,
    train_stage,
)
from trainer.engines.recorder import EmissionsProbe, Follower, Progress, RunRecorder
from trainer.errors import advice
from trainer.files import TEMP_PREFIX, Reserve, sha256_file, write_json
from trainer.observe import emissions
from trainer.observe.callbacks import TrainingCallback  # noqa: F401  (re-exported, it was here)
from trainer.observe.emissions import StageEmissions
from trainer.observe.tracking import Tracking, flatten
from trainer.runs.training_run_manager import RunError, RunManager, now, stage_output

log = logging.getLogger("trainer")


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
        raise RunError(f"stage 2 of run {run_id} starts from what stage 1 trained, and stage 1 has not completed; "
                       "train stage 1 first " + advice(f"(scripts/train.py --run-id {run_id} --stage 1)",
                                                         "(start_training with stage=1)"))
    for number in stages:
        distributed.check_batch(world, number, config.training.stage(number).batch_size)
    if backend[0] == "mlx" and config.training.packing:
        raise TrainingError("training.packing is for the transformers backend: packed rows need attention and "
                            "positions that restart at each row, and mlx-lm's models take neither (a causal mask "
                            "over the whole sequence, RoPE from one offset), so rows would see each other. Use "
                            "training.length_grouping on mlx to cut padding", details={"field": "training.packing"})
    if backend[0] == "mlx" and config.training.precision == "bf16":
        raise precision_error()
    if backend[0] == "transformers" and config.base_model.quantization != "none" and not cuda_available():
        from trainer.engines.transformers_trainer import quantization_error

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
    """runs/<id>/final-model/: the last stage's adapter (or whole model), what the run produced,
    with a note of where it comes from (export_model merges or converts it)."""
    last = max(manifest["stages"], key=lambda key: int(key.removeprefix("stage")))
    source, full = stage_output(run_dir, manifest, int(last.removeprefix("stage")))
    target = run_dir / "final-model"
    tmp = run_dir / f"{TEMP_PREFIX}final-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    entry = {"path": "final-model", "stage": int(last.removeprefix("stage")), "source": f"{last}/{source.name}",
             "fine_tune": "full" if full else "lora", "adapter_format": manifest["stages"][last].get("adapter_format"),
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
    manifest = manager.manifest(run_id)
    entry = manifest["stages"][key]
    section = config.training.stage(number)
    training = config.training
    backend = make_backend(backend_name, training.seed + number, world, training.precision)
    source = config.model_source()
    if config.base_model.local_path is not None and not Path(source).is_dir():
        raise RunError(f"base_model.local_path {source} does not exist", details={"stage": number})
    full = training.fine_tune == "full"
    output, _ = stage_output(run_dir, manifest, number)
    parent = None
    if number == 2:
        parent, _ = stage_output(run_dir, manifest, 1)
        if not any(parent.glob("*.safetensors")):
            raise RunError(f"stage 2 starts from what stage 1 trained, and {parent} holds nothing; train stage 1 "
                           "first", details={"stage": 2})
        if full:  # a fully fine-tuned stage 2 trains the stage-1 model itself
            source = str(parent)
    try:
        facts = backend.load(source, config.base_model.quantization, config.root / "models" / "quantized")
    except (OSError, ValueError) as error:
        raise TrainingError(f"could not load the base model {source} with {backend_name}: {error}. Without "
                            "network access set base_model.local_path to a local copy "
                            "(scripts/make_tiny_model.py builds a tiny one)", details={"stage": number}) from error
    if full:
        trainable = backend.train_all(training.gradient_checkpointing)
    else:
        trainable = backend.add_adapters(config.lora, training.gradient_checkpointing, parent)
    backend.method, backend.beta = section.method, section.beta
    backend.setup_optimizer(training)
    layout = fast_paths.check(backend, training.packing)

    def load(split: str, stage_dir: str = key):
        path = run_dir / stage_dir / "training-data" / f"{split}.jsonl"
        # pairs where this stage trains on pairs and the file holds them (an SFT stage replays chosen answers)
        pairs = section.method != "sft" and training.stage(int(stage_dir.removeprefix("stage"))).method != "sft"
        return tokenize(read_records(path, pairs), backend.tokenizer, training.max_seq_length, training.mask_prompt,
                        pairs)

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

    reference = valid_reference = None
    method: dict[str, Any] = {"name": section.method} | ({"beta": section.beta} if section.method != "sft" else {})
    if section.method == "dpo":  # the model as the stage starts, before a checkpoint is loaded
        files = [run_dir / key / "training-data" / f"{split}.jsonl" for split in ("train", "valid")]
        shown = len(valid) if training.val_batches == -1 else min(len(valid), training.val_batches * section.batch_size)
        fingerprint = ":".join([sha256_file(f) for f in files] + [str(x) for x in (
            parent, training.max_seq_length, len(train), shown, backend_name, source, config.base_model.quantization,
            training.packing)])
        both, began = train + valid.head(shown), time.perf_counter()  # the validation rows evaluated
        logps = preference.reference_logps(backend, both, section.batch_size, training.packing,
                                           run_dir / key / "reference_logps.json", fingerprint)
        reference, valid_reference = logps[:len(train)], logps[len(train):]
        method["reference"] = {"pairs": int(sum(both.is_pair(i) for i in range(len(both)))),
                               "seconds": round(time.perf_counter() - began, 3)}
        log.info("stage %s: reference log-probabilities in %.1f s", number, method["reference"]["seconds"])

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
        "fine_tune": training.fine_tune, "method": method,
        "lora": None if full else config.lora.model_dump() | {"scale": config.lora.scale},
        "data": entry["data"], "rows": {"train": len(train) - replay_rows, "replay": replay_rows,
                                        "valid": len(valid), "dropped_too_long": train.dropped + valid.dropped},
        "weighting": weights, "parent_adapter": entry.get("parent_adapter"), "parent_model": entry.get("parent_model"),
        "resumed_from": start or None,
        "distributed": world.describe() | {"global_batch_size": sampler.batch_size}, "layout": layout,
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
        val_batches=training.val_batches, packed=training.packing, checkpoint_dir=run_dir / key / "checkpoints",
        method=section.method, reference=reference, valid_reference=valid_reference,
        adapter_dir=output, start_iteration=start, stop_requested=stop,
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
        status="completed", completed_at=now(), metrics=result,
        adapter_format=None if full else backend_name, model_format="huggingface" if full else None))
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
