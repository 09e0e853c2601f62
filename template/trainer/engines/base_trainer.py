"""The backend interface and the one training loop both engines run.

The loop owns everything that must mean the same on mlx and transformers: which rows
form each batch (trainer.data.training_data.Sampler), the learning-rate schedule, gradient
accumulation, when to report, evaluate and checkpoint, stopping on a non-finite loss,
and saving a checkpoint on SIGTERM. A backend only computes losses and gradients,
applies updates, and saves/restores its own weights and optimizer state.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import shutil
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from trainer.config import LoraSection, TrainingSection
from trainer.data.training_data import Batch, Sampler, TokenizedSet, collate, collate_pairs, eval_rows
from trainer.engines import preference
from trainer.engines.checkpoints import (  # noqa: F401  (re-exported: they were here)
    CHECKPOINT_PREFIX,
    KEEP_CHECKPOINTS,
    checkpoint_dirs,
    prune_incomplete,
    save_checkpoint,
)
from trainer.engines.distributed import World
from trainer.errors import ProjectError, advice
from trainer.files import TEMP_PREFIX
from trainer.observe.callbacks import TrainingCallback

# end-of-turn tokens of the common chat templates (ChatML, Llama 3, Phi, Gemma, OLMo 2 uses EOS)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")


def end_of_turn_ids(tokenizer: Any, extra: Any = None) -> list[int]:
    """Tokens that end the assistant's turn: the tokenizer's end of sequence, `extra` (the
    model's generation config), and the chat template's own end-of-turn token when it is a
    special token of the vocabulary (`<|im_end|>` of ChatML, `<|eot_id|>` of Llama 3...), so
    generation stops where the turn ends even when the tokenizer names another token."""
    ids = {tokenizer.eos_token_id} | set(extra if isinstance(extra, (list, tuple, set)) else [extra])
    template = getattr(tokenizer, "chat_template", None) or ""
    vocab = tokenizer.get_vocab()
    ids |= {vocab[token] for token in END_OF_TURN if token in template and token in vocab}
    return sorted(i for i in ids if isinstance(i, int))


class TrainingError(ProjectError):
    kind = "training_error"


class NonFiniteLoss(TrainingError):
    kind = "non_finite_loss"


class Cancelled(TrainingError):
    kind = "cancelled"


class Backend(ABC):
    """One engine. `load`, then `add_adapters` (or `train_all`), then `setup_optimizer`, then steps."""

    name: str = ""
    tokenizer: Any = None
    pad_multiple: int = 1  # batch widths are rounded up to this (compiled engines like few shapes)
    world: World = World()  # the processes training together (data parallel)
    target_only: bool = False  # logits only at target positions (fast_paths.check turns it on)
    chunk: int = 1024  # target positions per output-layer chunk
    method: str = "sft"  # or dpo, orpo (trainer.engines.preference), with beta
    beta: float = 0.1
    stats: dict[str, float] = {}  # a preference step's statistics (preference.STATS)
    full: bool = False  # every weight trains (train_all); what is saved is a whole model, not an adapter
    precision: str = "auto"  # training.precision, set by make_backend

    @abstractmethod
    def load(self, source: str, quantization: str, cache_dir: Path) -> dict[str, Any]:
        """Load the base model and tokenizer; returns facts for the manifest."""

    @abstractmethod
    def add_adapters(self, lora: LoraSection, gradient_checkpointing: bool, init_from: Optional[Path]) -> int:
        """Freeze the base, add LoRA layers (weights from `init_from` if given); returns trainable parameters."""

    def train_all(self, gradient_checkpointing: bool) -> int:
        """Full fine-tuning: every weight of the loaded model trains; returns their number."""
        raise TrainingError(f"the {self.name} backend does not train every weight (training.fine_tune full)")

    @abstractmethod
    def setup_optimizer(self, training: TrainingSection) -> None:
        """AdamW over the trainable weights, with the config's weight decay and clipping."""

    @abstractmethod
    def step(self, batch: Batch, learning_rate: float, accumulation: int, update: bool,
             denominator: Optional[float] = None) -> float:
        """Forward and backward one micro-batch; apply the accumulated update (gradients
        averaged over the ranks) when `update`. The loss is the batch's summed target-token
        loss / `denominator` (default: its target count) / `accumulation`. Returns the loss
        before the division by `accumulation`."""

    def row_logps(self, batch: Batch) -> list[float]:
        """Summed log-probabilities of each row's targets (owner order); no gradients."""
        raise TrainingError(f"the {self.name} backend does not train on preference pairs")

    def preference_values(self, batches: list[Batch]) -> list[dict[str, float]]:
        """Each batch's summed pair loss and NLL (`pair_loss`, `nll`) and per-pair statistics
        (preference.REPORTED), in inference mode; no gradients."""
        raise TrainingError(f"the {self.name} backend does not train on preference pairs")

    def preference_sums(self, batches: list[Batch]) -> dict[str, float]:
        """Summed preference statistics (preference.STATS) of `batches`; no gradients."""
        sums = dict.fromkeys(preference.STATS, 0.0)
        for batch, values in zip(batches, self.preference_values(batches), strict=True):
            for key, value in values.items():
                sums[key] += value
            sums["pairs"] += batch.pairs
            sums["nll_tokens"] += float(preference.nll_rows(self.method, batch).sum())
        return sums

    @abstractmethod
    def loss_sums(self, batches: list[Batch]) -> tuple[float, int]:
        """Summed loss over the target tokens of `batches`, and their count; no gradients."""

    def evaluate(self, batches: list[Batch]) -> float:
        """Mean loss over the target tokens of `batches`."""
        total, count = self.loss_sums(batches)
        return total / max(count, 1)

    def gather(self) -> None:  # noqa: B027 - most engines have nothing to collect
        """Every rank calls this before rank 0 saves (FSDP must collect sharded state)."""

    @abstractmethod
    def save_adapter(self, folder: Path) -> None:
        """The adapter in the engine's own format (loads back with that engine's tools)."""

    def save_model(self, folder: Path) -> None:
        """The whole model as a Hugging Face folder (config, safetensors, tokenizer) that both
        engines load (full fine-tuning)."""
        raise TrainingError(f"the {self.name} backend does not save whole models")

    @property
    def weights_dir(self) -> str:
        """Where a checkpoint keeps the trained weights."""
        return "model" if self.full else "adapter"

    def save_weights(self, folder: Path) -> None:
        """What trains: the whole model (full fine-tuning), or the adapter."""
        self.save_model(folder) if self.full else self.save_adapter(folder)

    @abstractmethod
    def save_state(self, folder: Path) -> None:
        """Optimizer state and RNG state, next to the saved weights."""

    @abstractmethod
    def load_state(self, folder: Path) -> None:
        """Restore the trained weights (weights_dir), optimizer state and RNG state of a checkpoint."""

    @abstractmethod
    def generate(self, prompts: list[str], max_tokens: int, temperature: float, top_p: float) -> list[str]:
        """Continue each (chat-templated) prompt; greedy when temperature is 0."""

    @abstractmethod
    def eval_mode(self) -> None:
        """Inference from here on: no dropout."""

    def end_ids(self, extra: Any = None) -> list[int]:
        """This model's end-of-turn tokens (end_of_turn_ids)."""
        return end_of_turn_ids(self.tokenizer, extra)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens as training saw them (the template already holds any BOS)."""
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))

    def vocabulary(self) -> int:
        return len(self.tokenizer)

    def tolerance(self) -> float:
        """Relative difference allowed between two ways of computing the same loss."""
        return 1e-4

    def target_only_blocked(self) -> Optional[str]:
        """Why target-only logits cannot be used here, if they cannot."""
        return None

    @abstractmethod
    def peak_memory_gb(self) -> float:
        ...

    @abstractmethod
    def versions(self) -> dict[str, str]:
        ...

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad if pad is not None else self.tokenizer.eos_token_id)


def process_peak_memory_gb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**3 if sys.platform == "darwin" else 1024**2)


def learning_rate(iteration: int, peak: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup to `peak`, then constant or cosine decay to 10% of it (iteration is 1-based)."""
    if warmup and iteration <= warmup:
        return peak * iteration / warmup
    if schedule == "constant" or total <= warmup:
        return peak
    progress = (iteration - warmup) / (total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------- the loop


@dataclass
class StagePlan:
    stage: int
    train: TokenizedSet
    valid: TokenizedSet
    sampler: Sampler
    iterations: int
    learning_rate: float
    warmup_steps: int
    schedule: str
    accumulation: int
    batch_size: int
    log_steps: int
    eval_steps: int
    save_steps: int
    val_batches: int
    checkpoint_dir: Path
    adapter_dir: Path  # where the stage's result goes: its adapter, or the whole model (full fine-tuning)
    packed: bool = False  # rows share sequences (collate)
    method: str = "sft"  # dpo, orpo: preference pairs, with each pair's reference log-probabilities
    reference: Optional[Any] = None
    valid_reference: Optional[Any] = None
    start_iteration: int = 0
    stop_requested: Callable[[], bool] = lambda: False
    callbacks: list[TrainingCallback] = field(default_factory=list)


@dataclass
class StageResult:
    iterations: int
    train_loss: Optional[float] = None
    val_loss_before: Optional[float] = None
    val_loss: Optional[float] = None
    tokens: int = 0  # real (unpadded) tokens trained on
    target_tokens: int = 0  # of those, the ones the loss counts (what mlx-lm calls trained tokens)
    tokens_per_second: float = 0.0
    seconds: float = 0.0
    peak_memory_gb: float = 0.0
    resumed_from: Optional[int] = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train_stage(backend: Backend, plan: StagePlan) -> StageResult:
    """Run one stage from `plan.start_iteration` to `plan.iterations`. With several
    processes every rank runs this loop in step; only rank 0 has callbacks and writes."""
    world = backend.world
    result = StageResult(iterations=plan.iterations,
                         resumed_from=plan.start_iteration or None)
    pairs = plan.method != "sft"

    def layout(data: TokenizedSet, rows, reference) -> Batch:
        if pairs:
            return collate_pairs(data, rows, backend.pad_id, backend.pad_multiple, plan.packed, reference)
        return collate(data, rows, backend.pad_id, backend.pad_multiple, plan.packed)

    valid = []  # this rank's share of each validation batch, collated once for every evaluation
    for rows in eval_rows(plan.valid, plan.batch_size, plan.val_batches):
        mine, weight = world.shard(rows), 1
        if not len(mine):  # a short last batch: run a row anyway, FSDP gathers weights in every forward
            mine, weight = rows[:1], 0
        valid.append((layout(plan.valid, mine, plan.valid_reference), weight))
    started = time.perf_counter()

    def validate() -> tuple[float, dict[str, float]]:
        if pairs:
            sums = dict.fromkeys(preference.STATS, 0.0)
            for batch, weight in valid:
                for key, value in backend.preference_sums([batch]).items():
                    sums[key] += weight * value
            sums = dict(zip(preference.STATS, world.sum([sums[k] for k in preference.STATS]), strict=True))
            return preference.loss(sums), {f"val_{k}": v for k, v in preference.report(sums).items()}
        total, count = 0.0, 0
        for batch, weight in valid:
            loss_sum, tokens = backend.loss_sums([batch])
            total, count = total + weight * loss_sum, count + weight * tokens
        total, count = world.sum([total, count])
        return total / max(count, 1), {}

    def report(kind: str, iteration: int, **values: Any) -> dict[str, Any]:
        elapsed = time.perf_counter() - started
        done = iteration - plan.start_iteration
        eta = elapsed / done * (plan.iterations - iteration) if done > 0 else None
        info = {"stage": plan.stage, "iteration": iteration, "total_iterations": plan.iterations,
                "learning_rate": learning_rate(max(iteration, 1), plan.learning_rate, plan.warmup_steps,
                                               plan.iterations, plan.schedule),
                "peak_memory_gb": round(backend.peak_memory_gb(), 4), "elapsed": round(elapsed, 3),
                "eta": round(eta, 1) if eta is not None else None, "time": time.time(), **values}
        for callback in plan.callbacks:
            getattr(callback, f"on_{kind}_loss_report")(info)
        return info

    if plan.start_iteration == 0 and valid:
        result.val_loss_before, extra = validate()
        report("val", 0, val_loss=result.val_loss_before, train_loss=None, **extra)

    train = plan.train
    paired = [pairs and train.is_pair(i) for i in range(len(train))]  # an SFT stage trains chosen answers only
    lengths = [len(row) + (len(train.rejected[i]) if paired[i] else 0) for i, row in enumerate(train.tokens)]
    targets_of = [len(row) - train.starts[i] + (len(train.rejected[i]) - train.rejected_starts[i]
                                                if paired[i] else 0) for i, row in enumerate(train.tokens)]
    window_loss, window_steps, window_tokens, window_time, window_targets = 0.0, 0, 0, 0.0, 0
    window_stats = dict.fromkeys(preference.STATS, 0.0)
    for iteration in range(plan.start_iteration + 1, plan.iterations + 1):
        lr = learning_rate(iteration, plan.learning_rate, plan.warmup_steps, plan.iterations, plan.schedule)
        tic = time.perf_counter()
        loss = 0.0
        for micro in range(plan.accumulation):
            rows = plan.sampler.batch(iteration, micro)  # the global batch: the same on every rank
            targets = sum(targets_of[i] for i in rows)
            batch = layout(train, world.shard(rows), plan.reference)
            denominator = (preference.denominators(plan.method, train, rows, world.size) if pairs
                           else targets / world.size)
            loss += backend.step(batch, lr, plan.accumulation, update=micro == plan.accumulation - 1,
                                 denominator=denominator)
            for key, value in backend.stats.items() if pairs else ():
                window_stats[key] += value
            window_tokens += sum(lengths[i] for i in rows)
            window_targets += targets
        loss /= plan.accumulation
        stopping = plan.stop_requested()
        if world.size > 1:  # the global batch's loss, and a stop any rank was asked for
            total, stops = world.sum([loss, float(stopping)])
            loss, stopping = total / world.size, stops > 0
        window_time += time.perf_counter() - tic
        if iteration == plan.start_iteration + 1:  # a first pace, long before the first report
            step = time.perf_counter() - tic
            for callback in plan.callbacks:
                callback.on_first_step({
                    "stage": plan.stage, "iteration": iteration, "total_iterations": plan.iterations,
                    "eta": round(step * (plan.iterations - iteration), 1)})
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"stage {plan.stage}: the training loss became {loss} at iteration {iteration}; "
                                "lower the learning rate or check the data and the base model",
                                details={"stage": plan.stage, "iteration": iteration})
        window_loss += loss
        window_steps += 1

        last = iteration == plan.iterations
        if iteration % plan.log_steps == 0 or last:
            result.train_loss = window_loss / window_steps
            tps = window_tokens / window_time if window_time > 0 else 0.0
            extra = {}
            if pairs:
                extra = preference.report(dict(zip(preference.STATS, world.sum(
                    [window_stats[k] for k in preference.STATS]), strict=True)))
                window_stats = dict.fromkeys(preference.STATS, 0.0)
            report("train", iteration, train_loss=result.train_loss, tokens_per_second=round(tps, 2),
                   tokens=window_tokens, target_tokens=window_targets, **extra)
            result.tokens += window_tokens
            result.target_tokens += window_targets
            result.seconds += window_time
            window_loss, window_steps, window_tokens, window_time, window_targets = 0.0, 0, 0, 0.0, 0
        if valid and (iteration % plan.eval_steps == 0 or last):
            result.val_loss, extra = validate()
            report("val", iteration, val_loss=result.val_loss, train_loss=None, **extra)
        if iteration % plan.save_steps == 0 or last or stopping:
            backend.gather()
            if world.main:
                path = save_checkpoint(backend, plan.checkpoint_dir, iteration, {
                    "stage": plan.stage, "train_loss": result.train_loss, "val_loss": result.val_loss,
                    "processes": world.size})
                for callback in plan.callbacks:
                    callback.on_checkpoint({"stage": plan.stage, "iteration": iteration, "path": str(path)})
        if stopping and not last:
            world.barrier()  # the checkpoint is on disk before any rank leaves
            raise Cancelled(f"stage {plan.stage} cancelled at iteration {iteration}; a checkpoint was saved, "
                            + advice("continue with --resume", "start_training with resume=true continues it"),
                            details={"stage": plan.stage, "iteration": iteration})

    # the last iteration always checkpoints, so the state gathered for it is the final adapter or model
    if world.main:
        tmp = plan.adapter_dir.parent / f"{TEMP_PREFIX}{plan.adapter_dir.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        backend.save_weights(tmp)
        if plan.adapter_dir.exists():
            shutil.rmtree(plan.adapter_dir)
        os.replace(tmp, plan.adapter_dir)
    world.barrier()  # stage 2 on every rank starts from what was just written
    result.tokens_per_second = round(result.tokens / result.seconds, 2) if result.seconds else 0.0
    result.peak_memory_gb = round(backend.peak_memory_gb(), 4)
    return result


def hardware() -> dict[str, Any]:
    return {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "cpus": os.cpu_count()}
