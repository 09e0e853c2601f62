"""The mlx-lm backend (Apple silicon; Linux through mlx[cpu]).

Uses mlx-lm's own loading, quantization (mlx_lm.convert) and LoRA layers; the adapter
is saved in mlx-lm's format (adapters.safetensors + adapter_config.json), so
`mlx_lm.load(base, adapter_path=...)` and `mlx_lm.generate --adapter-path` use it as is.
The step is compiled like mlx-lm's own trainer.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm import load as mlx_load
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import linear_to_lora_layers

from trainer.config import LoraSection, TrainingSection
from trainer.data.training_data import Batch
from trainer.engines import preference
from trainer.engines.base_trainer import Backend, TrainingError, process_peak_memory_gb
from trainer.engines.distributed import MLXWorld, World
from trainer.files import TEMP_PREFIX
from trainer.models.model_config import mlx_overrides

QUANT_BITS = {"q4": 4, "q8": 8}


def lora_keys(layer: nn.Module, targets: list[str]) -> list[str]:
    """Module paths inside a transformer block for the configured target names: a plain
    name (q_proj) matches any linear layer ending in it; a dotted one must match exactly."""
    keys = []
    for path, module in layer.named_modules():
        if not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            continue
        if any(path == t or (("." not in t) and path.split(".")[-1] == t) or path.endswith("." + t) for t in targets):
            keys.append(path)
    return sorted(keys)


def fingerprint(source: str) -> str:
    """Identifies a base model's content: for a local directory its config and weight files
    (name, size, modification time), so a rebuilt model gets a fresh quantized copy."""
    digest = hashlib.sha256(source.encode())
    path = Path(source)
    if path.is_dir():
        for file in sorted(path.glob("*.safetensors")) + [path / "config.json"]:
            if file.is_file():
                stat = file.stat()
                digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def quantized_copy(source: str, bits: int, cache_dir: Path) -> Path:
    """Quantize the base model once with mlx-lm and cache it; later runs reuse the copy."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/")).name)[-60:]
    target = cache_dir / f"{name}-q{bits}-{fingerprint(source)}"
    if (target / "config.json").is_file():
        return target
    from mlx_lm import convert

    tmp = cache_dir / f"{TEMP_PREFIX}{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    convert(source, mlx_path=str(tmp), quantize=True, q_bits=bits, q_group_size=64)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def checkpoint_blocks(layer: nn.Module) -> None:
    """mlx-lm's grad_checkpoint patches the block's class, so a second stage in the same process
    would nest a second checkpoint around the first (other float rounding than a process that
    resumes that stage alone): patch each class once."""
    if not getattr(type(layer), "_checkpointed", False):
        grad_checkpoint(layer)
        type(layer)._checkpointed = True


def output_layer(model: nn.Module):
    """What turns mlx-lm's hidden states into logits: its lm_head, or the tied embedding."""
    head = getattr(model, "lm_head", None)
    return head if head is not None else model.model.embed_tokens.as_linear


def target_loss(head, hidden: mx.array, labels: mx.array, weights: mx.array, chunk: int) -> mx.array:
    """Weighted cross-entropy of `head(hidden)` per position, `chunk` positions at a time; with
    more than one chunk each is recomputed in the backward pass (mx.checkpoint) instead of kept."""

    def part(h, y, w):
        return nn.losses.cross_entropy(head(h).astype(mx.float32), y) * w

    if hidden.shape[0] <= chunk:
        return part(hidden, labels, weights)
    parts = []
    for i in range(0, hidden.shape[0], chunk):
        y, w = labels[i:i + chunk], weights[i:i + chunk]  # captured: no gradient w.r.t. the labels
        parts.append(mx.checkpoint(lambda h, y=y, w=w: part(h, y, w))(hidden[i:i + chunk]))
    return mx.concatenate(parts)


def token_ce(model: nn.Module, ids: mx.array, select: mx.array, labels: mx.array, weights: mx.array,
             target_only: bool = False, chunk: int = 1024) -> mx.array:
    """Weighted cross-entropy at each of the batch's target positions (Batch.select): with
    `target_only` the output layer runs at those positions only."""
    inputs = ids[:, :-1]
    if target_only:
        hidden = model.model(inputs)
        hidden = hidden.reshape(-1, hidden.shape[-1])[select]
        return target_loss(output_layer(model), hidden, labels, weights, chunk)
    logits = model(inputs)
    logits = logits.reshape(-1, logits.shape[-1])[select]
    return nn.losses.cross_entropy(logits.astype(mx.float32), labels) * weights


def masked_loss(model: nn.Module, ids: mx.array, select: mx.array, labels: mx.array, weights: mx.array,
                target_only: bool = False, chunk: int = 1024) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the batch's target positions, and their count."""
    return token_ce(model, ids, select, labels, weights, target_only, chunk).sum(), weights.sum()


OPS = preference.Ops(logsigmoid=nn.log_sigmoid, log1mexp=lambda x: mx.log(-mx.expm1(mx.minimum(x, -1e-7))),
                     greater=lambda a, b: (a > b).astype(mx.float32), total=mx.sum)


def row_sums(values: mx.array, owners: mx.array, row_ids: mx.array) -> mx.array:
    """Per row of the batch (row_ids = arange(rows)), the sum of `values` over its positions."""
    return values @ (owners[:, None] == row_ids[None, :]).astype(values.dtype)


class MLXBackend(Backend):
    name = "mlx"
    pad_multiple = 32  # as mlx-lm's own batching: each new shape costs a compile

    def __init__(self, seed: int, world: World | None = None):
        mx.random.seed(seed)  # the same on every rank: LoRA starts from the same weights everywhere
        self.world = world or World()
        self.model = None
        self.optimizer = None
        self.lora_config: dict[str, Any] = {}
        self.config: dict[str, Any] = {}  # the loaded model's (saved with a whole model)
        self._grad = None
        self._step = None
        self.max_grad_norm = 0.0

    def load(self, source: str, quantization: str, cache_dir: Path) -> dict[str, Any]:
        facts: dict[str, Any] = {"source": source}
        if quantization in QUANT_BITS:
            quantized = quantized_copy(source, QUANT_BITS[quantization], cache_dir)
            facts["quantized_copy"] = str(quantized)
            source = str(quantized)
        self.source = source
        self.model, self.tokenizer, self.config = mlx_load(source, model_config=mlx_overrides(source),  # real RoPE
                                                           return_config=True)
        facts["architecture"] = getattr(self.model, "model_type", type(self.model).__module__.split(".")[-1])
        facts["layers"] = len(self.model.layers)
        return facts

    def add_adapters(self, lora: LoraSection, gradient_checkpointing: bool, init_from: Optional[Path]) -> int:
        model = self.model
        model.freeze()
        layers = len(model.layers)
        num_layers = layers if lora.num_layers == -1 else min(lora.num_layers, layers)
        keys = lora_keys(model.layers[-1], lora.target_modules)
        if not keys:
            raise TrainingError(f"none of lora.target_modules {lora.target_modules} is a linear layer of this "
                                f"model's blocks; linear layers: {lora_keys(model.layers[-1], [''])}")
        self.lora_config = {"rank": lora.rank, "scale": lora.scale, "dropout": lora.dropout, "keys": keys}
        self.num_layers = num_layers
        self.fine_tune_type = "dora" if lora.use_dora else "lora"
        linear_to_lora_layers(model, num_layers, self.lora_config, use_dora=lora.use_dora)
        if init_from is not None:
            model.load_weights(str(init_from / "adapters.safetensors"), strict=False)
        if gradient_checkpointing:
            checkpoint_blocks(model.layers[0])
        model.train()
        return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))

    def train_all(self, gradient_checkpointing: bool) -> int:
        self.full = True
        self.model.unfreeze()  # every weight, embeddings included (mlx-lm's own "full" trains the last blocks only)
        if gradient_checkpointing:
            checkpoint_blocks(self.model.layers[0])
        self.model.train()
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    def setup_optimizer(self, training: TrainingSection) -> None:
        # bias-corrected as torch's AdamW (mlx's default is not): one update rule on both engines
        self.optimizer = optim.AdamW(learning_rate=0.0, weight_decay=training.weight_decay, bias_correction=True)
        self.max_grad_norm = training.max_grad_norm
        model, optimizer = self.model, self.optimizer

        def loss_fn(model, ids, select, labels, weights, denominator):
            total, count = masked_loss(model, ids, select, labels, weights, self.target_only, self.chunk)
            return total / denominator, count

        value_and_grad = nn.value_and_grad(model, loss_fn)
        state = [model.state, optimizer.state, mx.random.state]

        def micro_step(ids, select, labels, weights, denominator, accumulation):
            (loss, _), grad = value_and_grad(model, ids, select, labels, weights, denominator)
            return loss, tree_map(lambda g: g / accumulation, grad)

        def preference_loss(model, ids, select, labels, weights, owners, row_ids, reference, nll_mask, pairs, tokens):
            pair_loss, nll, stats = self._preference(model, ids, select, labels, weights, owners, row_ids,
                                                     reference, nll_mask)
            return pair_loss / pairs + nll / tokens, *[stats[k] for k in preference.REPORTED if k in stats]

        preference_grad = nn.value_and_grad(model, preference_loss)

        def preference_step(*arrays):
            *inputs, accumulation = arrays
            (loss, *stats), grad = preference_grad(model, *inputs)
            return loss, tree_map(lambda g: g / accumulation, grad), stats

        # compiled once the fast-path check has set target_only (flags are baked into the graph)
        self._compile = lambda: partial(mx.compile, inputs=state, outputs=state)(
            micro_step if self.method == "sft" else preference_step)
        self._step = None

    def _preference(self, model, ids, select, labels, weights, owners, row_ids, reference, nll_mask):
        ce = token_ce(model, ids, select, labels, weights, self.target_only, self.chunk)
        logps, counts = -row_sums(ce, owners, row_ids), row_sums(weights, owners, row_ids)
        return preference.objective(OPS, self.method, self.beta, reference.shape[0] // 2, reference, logps, counts,
                                    ce, nll_mask)

    def _preference_arrays(self, batch: Batch) -> tuple[mx.array, ...]:
        reference = batch.reference if batch.reference is not None else np.zeros(2 * batch.pairs, np.float32)
        return (*self._arrays(batch), mx.array(batch.owners), mx.arange(batch.rows), mx.array(reference),
                mx.array(preference.nll_rows(self.method, batch)))

    def step(self, batch: Batch, learning_rate: float, accumulation: int, update: bool,
             denominator: Any = None) -> float:
        if self._step is None:
            self._step = self._compile()
        scale = mx.array(accumulation, dtype=mx.float32)
        if self.method == "sft":
            denominator = float(batch.targets if denominator is None else denominator)
            loss, grad = self._step(*self._arrays(batch), mx.array(denominator, dtype=mx.float32), scale)
        else:
            pairs, tokens = denominator or (max(batch.pairs, 1), 1.0)
            loss, grad, stats = self._step(*self._preference_arrays(batch), mx.array(pairs, dtype=mx.float32),
                                           mx.array(tokens, dtype=mx.float32), scale)
            self.stats = {k: float(v.item()) for k, v in zip(preference.REPORTED, stats, strict=False)} | {
                "pairs": batch.pairs}
        if self._grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, self._grad)
        if update:
            if isinstance(self.world, MLXWorld):  # once per update, as mlx-lm's trainer does
                grad = average_gradients(grad, group=self.world.group)
            if self.max_grad_norm > 0:
                grad, _ = optim.clip_grad_norm(grad, self.max_grad_norm)
            self.optimizer.learning_rate = learning_rate
            self.optimizer.update(self.model, grad)
            self._grad = None
            mx.eval(self.model.trainable_parameters(), self.optimizer.state, loss)
        else:
            self._grad = grad
            mx.eval(grad, loss)
        return float(loss.item())

    def row_logps(self, batch: Batch) -> list[float]:
        training = self.model.training
        self.model.eval()
        ce = token_ce(self.model, *self._arrays(batch), self.target_only, self.chunk)
        sums = -row_sums(ce, mx.array(batch.owners), mx.arange(batch.rows))
        self.model.train(training)
        return sums.tolist()

    def preference_values(self, batches: list[Batch]) -> list[dict[str, float]]:
        training = self.model.training
        self.model.eval()
        found = []
        for batch in batches:
            pair_loss, nll, stats = self._preference(self.model, *self._preference_arrays(batch))
            found.append({key: float(value.item()) for key, value in {**stats, "pair_loss": pair_loss,
                                                                       "nll": nll}.items()})
        self.model.train(training)
        return found

    def loss_sums(self, batches: list[Batch]) -> tuple[float, int]:
        training = self.model.training  # during training it goes back to training; after, it stays in eval
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            loss, tokens = masked_loss(self.model, *self._arrays(batch), self.target_only, self.chunk)
            mx.eval(loss, tokens)
            total += float(loss.item())
            count += int(tokens.item())
        self.model.train(training)
        return total, count

    @staticmethod
    def _arrays(batch: Batch) -> tuple[mx.array, ...]:
        if batch.positions is not None:
            raise TrainingError("training.packing needs position ids per row, which mlx-lm's models do not take")
        return (mx.array(batch.ids), mx.array(batch.select), mx.array(batch.labels), mx.array(batch.weights))

    def vocabulary(self) -> int:
        rows = getattr(getattr(self.model, "args", None), "vocab_size", None) or len(self.tokenizer._tokenizer)
        return min(len(self.tokenizer._tokenizer), rows)

    def tolerance(self) -> float:
        first = next(v for _, v in tree_flatten(self.model.parameters()) if mx.issubdtype(v.dtype, mx.floating))
        return 1e-4 if first.dtype == mx.float32 else 2e-2

    def save_adapter(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        weights = dict(tree_flatten(self.model.trainable_parameters()))
        mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
        config = {"fine_tune_type": self.fine_tune_type, "num_layers": self.num_layers,
                  "lora_parameters": self.lora_config}
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def save_model(self, folder: Path) -> None:
        """As mlx_lm.fuse saves a model: Hugging Face names, so transformers loads it too."""
        from mlx_lm.utils import save_config, save_model

        save_model(folder, self.model, donate_model=False)
        save_config(dict(self.config), config_path=folder / "config.json")
        self.tokenizer.save_pretrained(str(folder))
        generation = Path(self.source) / "generation_config.json"
        if generation.is_file():
            shutil.copyfile(generation, folder / "generation_config.json")

    def save_state(self, folder: Path) -> None:
        state = dict(tree_flatten(self.optimizer.state))
        mx.save_safetensors(str(folder / "optimizer.safetensors"), state)
        np.save(folder / "rng.npy", np.array(mx.random.state[0]))

    def load_state(self, folder: Path) -> None:
        if self.full:
            weights = [item for file in sorted((folder / "model").glob("*.safetensors"))
                       for item in mx.load(str(file)).items()]
            self.model.load_weights(weights, strict=True)
        else:
            self.model.load_weights(str(folder / "adapter" / "adapters.safetensors"), strict=False)
        self.optimizer.state = tree_unflatten(list(mx.load(str(folder / "optimizer.safetensors")).items()))
        # mx.random.key(seed) is [seed >> 32, seed & 0xffffffff]: reseeding with the saved
        # key's two words restores it exactly (the state object takes no item assignment)
        high, low = (int(word) for word in np.load(folder / "rng.npy"))
        mx.random.seed((high << 32) | low)
        mx.eval(self.model.parameters(), self.optimizer.state)

    def eval_mode(self) -> None:
        self.model.eval()

    def generate(self, prompts: list[str], max_tokens: int, temperature: float, top_p: float) -> list[str]:
        from mlx_lm import generate
        from mlx_lm.sample_utils import make_sampler

        self.model.eval()  # dropout off: greedy generation is the same every time
        for token in self.end_ids(list(self.tokenizer.eos_token_ids)):
            self.tokenizer.add_eos_token(token)  # stop where the turn ends, as transformers does
        sampler = make_sampler(temp=temperature, top_p=top_p if temperature > 0 and top_p < 1 else 0.0)
        return [generate(self.model, self.tokenizer, prompt=self.prompt_ids(p), max_tokens=max_tokens,
                         sampler=sampler, verbose=False) for p in prompts]

    def peak_memory_gb(self) -> float:
        """The GPU allocator's peak on Apple silicon; the process's peak resident memory on CPU
        (as the transformers backend reports it there, so the two compare)."""
        if mx.default_device() == mx.gpu:
            return mx.get_peak_memory() / 1e9
        return process_peak_memory_gb()

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {"mlx": version("mlx"), "mlx-lm": version("mlx-lm")}
