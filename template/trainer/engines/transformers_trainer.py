"""The transformers + peft backend (CUDA, or CPU).

The adapter is saved in peft's format (adapter_model.safetensors + adapter_config.json),
so `PeftModel.from_pretrained(base, path)` loads it. The loss is computed here, not by
the model, so that it is exactly the mlx backend's: mean cross-entropy over the target
tokens of the whole batch.

Under `accelerate launch` the model and optimizer go through `Accelerator.prepare` (DDP or
FSDP, as the accelerate config says). Checkpoints hold state dicts keyed by parameter
name (torch.distributed.checkpoint's full state dicts), so a checkpoint written by N
processes resumes on any number of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.config import LoraSection, TrainingSection
from trainer.data.training_data import Batch
from trainer.engines import preference
from trainer.engines.base_trainer import Backend, TrainingError, process_peak_memory_gb
from trainer.engines.distributed import TorchWorld, World
from trainer.models.model_config import write_mlx_fields


def quantization_error(quantization: str) -> TrainingError:
    return TrainingError(
        f"base_model.quantization {quantization} with the transformers backend needs CUDA and bitsandbytes, "
        "and this machine has no CUDA device; use training.backend: mlx (pip install -e '.[mlx]'), which "
        "quantizes the base model itself, or set base_model.quantization: none",
        details={"quantization": quantization, "backend": "transformers", "supported_by": ["mlx"]},
    )


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="none") * weights


def target_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                chunk: int) -> torch.Tensor:
    """Weighted cross-entropy of `head(hidden)` against `labels` per position, `chunk` positions
    at a time. With more than one chunk each is recomputed in the backward pass instead of kept,
    so at most one chunk's logits ([chunk, vocabulary]) exist at any time."""
    if hidden.shape[0] <= chunk:
        return _chunk_loss(head, hidden, labels, weights)
    return torch.cat([checkpoint(_chunk_loss, head, hidden[i:i + chunk], labels[i:i + chunk], weights[i:i + chunk],
                                 use_reentrant=False) for i in range(0, hidden.shape[0], chunk)])


OPS = preference.Ops(logsigmoid=F.logsigmoid, log1mexp=lambda x: torch.log(-torch.expm1(x.clamp(max=-1e-7))),
                     greater=lambda a, b: (a > b).float(), total=torch.sum)


def row_sums(values: torch.Tensor, owners: torch.Tensor, rows: int) -> torch.Tensor:
    """Per row of the batch, the sum of `values` over its positions (padding's owner is -1)."""
    return torch.zeros(rows, dtype=values.dtype, device=values.device).index_add(
        0, owners.clamp(min=0), values * (owners >= 0))


class TransformersBackend(Backend):
    name = "transformers"
    pad_multiple = 8  # tensor-core friendly on GPUs

    def __init__(self, seed: int, world: World | None = None):
        torch.manual_seed(seed)  # the same on every rank: LoRA starts from the same weights everywhere
        self.world = world or World()
        self.accelerator = self.world.accelerator if isinstance(self.world, TorchWorld) else None
        if self.accelerator is not None:
            self.device = self.accelerator.device
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = None  # what trains: the peft model, or its DDP/FSDP wrapper
        self.peft = None  # the peft model itself
        self.bare = None  # the transformers model, inside peft and any wrapper
        self.optimizer = None
        self.max_grad_norm = 0.0
        self._gathered: dict[str, Any] = {}

    def load(self, source: str, quantization: str, cache_dir: Path) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if quantization != "none":
            if self.device.type != "cuda":
                raise quantization_error(quantization)
            try:
                import bitsandbytes  # noqa: F401
                from transformers import BitsAndBytesConfig
            except ImportError as error:
                raise TrainingError(f"base_model.quantization {quantization} needs bitsandbytes: "
                                    "pip install bitsandbytes") from error
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=quantization == "q4", load_in_8bit=quantization == "q8",
                bnb_4bit_compute_dtype=torch.bfloat16)
            kwargs["device_map"] = {"": self.device}  # each rank its own GPU
        if self.device.type == "cuda" and (self.precision == "auto" or "quantization_config" in kwargs):
            kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:  # float32 whatever the checkpoint holds: on a CPU, for float32, and as autocast's master weights
            kwargs["dtype"] = torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = self.bare = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if "quantization_config" not in kwargs:
            self.model.to(self.device)
        self.model.config.use_cache = False
        return {"source": source, "architecture": self.model.config.model_type,
                "layers": self.model.config.num_hidden_layers, "device": str(self.device),
                "dtype": str(next(self.model.parameters()).dtype),
                "precision": "bf16 autocast" if self.precision == "bf16" else "the weights' dtype"}

    def add_adapters(self, lora: LoraSection, gradient_checkpointing: bool, init_from: Optional[Path]) -> int:
        layers = self.model.config.num_hidden_layers
        last = None if lora.num_layers == -1 else list(range(max(0, layers - lora.num_layers), layers))
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, use_dora=lora.use_dora,
                            target_modules=lora.target_modules, layers_to_transform=last, task_type="CAUSAL_LM")
        if gradient_checkpointing:
            self._checkpointing()
            self.model.enable_input_require_grads()  # the frozen embedding's output needs them
        try:
            self.model = self.peft = get_peft_model(self.model, config)
        except ValueError as error:
            raise TrainingError(f"lora.target_modules {lora.target_modules}: {error}") from error
        if init_from is not None:
            self._load_adapter_weights(init_from)
        self.model.train()
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _checkpointing(self) -> None:
        options = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # its name since transformers 5
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

    def train_all(self, gradient_checkpointing: bool) -> int:
        self.full = True
        self.model.requires_grad_(True)
        if gradient_checkpointing:
            self._checkpointing()
        self.model.train()
        return sum(p.numel() for p in self.model.parameters())  # tied weights count once

    def _load_adapter_weights(self, folder: Path) -> None:
        """Into the bare peft model, before any wrapper (stage 2 starting from stage 1)."""
        weights = {k: v.to(self.device) for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
        result = set_peft_model_state_dict(self.peft, weights)
        if getattr(result, "unexpected_keys", None):
            raise TrainingError(f"the adapter in {folder} does not fit this model: {result.unexpected_keys[:5]}")

    def setup_optimizer(self, training: TrainingSection) -> None:
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=training.weight_decay)
        self.max_grad_norm = training.max_grad_norm
        if self.accelerator is not None:
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)

    @property
    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it

    def _options(self) -> StateDictOptions:
        """Full (unsharded) state dicts, on rank 0's CPU when distributed."""
        distributed = self.accelerator is not None
        return StateDictOptions(full_state_dict=distributed, cpu_offload=distributed, ignore_frozen_params=True,
                                strict=False)

    def _token_ce(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy at each of the batch's target positions (Batch.select; 0 for padding),
        and their weights. The output layer runs on those positions only, in chunks
        (target_loss), unless the check at the start found that this model's logits are more
        than its output layer (then on all of them)."""
        ids = torch.from_numpy(batch.ids).long().to(self.device)
        select = torch.from_numpy(batch.select).long().to(self.device)
        labels = torch.from_numpy(batch.labels).long().to(self.device)
        weights = torch.from_numpy(batch.weights).to(self.device)
        # Right padding under causal attention never reaches a real token, so no mask is needed
        # (as in mlx-lm). Packed rows restart their position ids, from which transformers builds
        # attention that stays inside each row.
        kwargs = {"input_ids": ids[:, :-1]}
        if batch.positions is not None:
            kwargs["position_ids"] = torch.from_numpy(batch.positions[:, :-1]).long().to(self.device)
        with self._autocast():
            return self._token_ce_of(kwargs, select, labels, weights)

    def _autocast(self):
        """training.precision bf16: matmuls in bfloat16, weights, gradients and the loss in float32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _token_ce_of(self, kwargs: dict[str, torch.Tensor], select: torch.Tensor, labels: torch.Tensor,
                     weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.target_only:
            logits = self.model(**kwargs).logits
            flat = logits.reshape(-1, logits.shape[-1]).index_select(0, select)
            return F.cross_entropy(flat.float(), labels, reduction="none") * weights, weights
        head = self._base().get_output_embeddings()
        seen: dict[str, torch.Tensor] = {}

        def grab(module, args):  # what the output layer would see; it computes nothing (no positions)
            seen["hidden"] = args[0]
            return (args[0][:, :0],)

        handle = head.register_forward_pre_hook(grab)
        try:
            self.model(**kwargs)
        finally:
            handle.remove()
        hidden = seen["hidden"]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, select)
        return target_loss(head, hidden, labels, weights, self.chunk), weights

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the batch's target positions, and their count."""
        ce, weights = self._token_ce(batch)
        return ce.sum(), weights.sum()

    def _preference(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """Summed pair losses and NLL of a preference batch (trainer.engines.preference), and its statistics."""
        ce, weights = self._token_ce(batch)
        owners = torch.from_numpy(batch.owners).long().to(self.device)
        logps, counts = -row_sums(ce, owners, batch.rows), row_sums(weights, owners, batch.rows)
        mask = torch.from_numpy(preference.nll_rows(self.method, batch)).to(self.device)
        reference = None if batch.reference is None else torch.from_numpy(batch.reference).to(self.device)
        pair_loss, nll, stats = preference.objective(OPS, self.method, self.beta, batch.pairs, reference, logps,
                                                     counts, ce, mask)
        return pair_loss, nll, {k: float(v) for k, v in stats.items()}

    @torch.no_grad()
    def row_logps(self, batch: Batch) -> list[float]:
        training = self.model.training
        self.model.eval()
        ce, _ = self._token_ce(batch)
        sums = row_sums(ce, torch.from_numpy(batch.owners).long().to(self.device), batch.rows)
        self.model.train(training)
        return (-sums).tolist()

    def step(self, batch: Batch, learning_rate: float, accumulation: int, update: bool,
             denominator: Any = None) -> float:
        if self.method == "sft":
            total, count = self._loss(batch)
            loss = total / (count if denominator is None else denominator)
        else:
            pairs, tokens = denominator or (max(batch.pairs, 1), 1.0)
            pair_loss, nll, stats = self._preference(batch)
            loss = pair_loss / pairs + nll / tokens
            self.stats = stats | {"pairs": batch.pairs}
        if self.accelerator is None:
            (loss / accumulation).backward()
        elif update:
            self.accelerator.backward(loss / accumulation)  # gradients are averaged over the ranks here
        else:
            with self.accelerator.no_sync(self.model):
                self.accelerator.backward(loss / accumulation)
        if update:
            params = [p for p in self.model.parameters() if p.requires_grad]
            if self.max_grad_norm > 0 and self.accelerator is not None:
                self.accelerator.clip_grad_norm_(params, self.max_grad_norm)  # the global norm, also under FSDP
            elif self.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach().item())

    @torch.no_grad()
    def preference_values(self, batches: list[Batch]) -> list[dict[str, float]]:
        training = self.model.training
        self.model.eval()
        found = []
        for batch in batches:
            pair_loss, nll, stats = self._preference(batch)
            found.append({**stats, "pair_loss": float(pair_loss), "nll": float(nll)})
        self.model.train(training)
        return found

    @torch.no_grad()
    def loss_sums(self, batches: list[Batch]) -> tuple[float, int]:
        training = self.model.training  # during training it goes back to training; after, it stays in eval
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches:
            loss_sum, tokens = self._loss(batch)
            total += float(loss_sum.item())
            count += int(tokens.item())
        self.model.train(training)
        return total, count

    def eval_mode(self) -> None:
        self.model.eval()

    def _base(self) -> torch.nn.Module:
        """The transformers model itself: inside peft's wrapper once adapters are added."""
        return self.peft.get_base_model() if self.peft is not None else self.bare

    def vocabulary(self) -> int:
        return min(len(self.tokenizer), self._base().get_input_embeddings().num_embeddings)

    def tolerance(self) -> float:
        return 1e-4 if next(self._base().parameters()).dtype == torch.float32 else 2e-2

    def target_only_blocked(self) -> Optional[str]:
        head = self._base().get_output_embeddings()
        if head is None:
            return "the model has no output layer transformers can name"
        if any(type(p).__name__ == "DTensor" for p in head.parameters()):
            return "FSDP shards the output layer, which runs inside the model's forward only"
        return None

    @torch.no_grad()
    def generate(self, prompts: list[str], max_tokens: int, temperature: float, top_p: float) -> list[str]:
        self.model.eval()  # dropout off: greedy generation is the same every time
        outputs = []
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False}
        ends = self.end_ids(self.model.generation_config.eos_token_id)  # once, not per prompt: it reads the vocab
        for prompt in prompts:
            ids = torch.tensor([self.prompt_ids(prompt)], device=self.device)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      eos_token_id=ends, pad_token_id=self.pad_id,
                                      use_cache=True, **sampling)
            outputs.append(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        return outputs

    def gather(self) -> None:
        """Adapter weights and optimizer state as full state dicts (a collective under DDP/FSDP:
        every rank calls it; rank 0 then writes them). Kept until the next gather: the final
        adapter is the last checkpoint's."""
        options = self._options()
        self._gathered = {"model": get_model_state_dict(self.model, options=options),
                          "optimizer": get_optimizer_state_dict(self.model, self._inner_optimizer, options=options)}

    def save_adapter(self, folder: Path) -> None:
        state = self._gathered.get("model")
        self.peft.save_pretrained(str(folder), state_dict=state)

    def save_model(self, folder: Path) -> None:
        self.bare.save_pretrained(str(folder), state_dict=self._gathered.get("model"), safe_serialization=True)
        self.tokenizer.save_pretrained(str(folder))
        write_mlx_fields(folder)  # so mlx-lm loads it with its real RoPE

    def save_state(self, folder: Path) -> None:
        optimizer = self._gathered.get("optimizer") or get_optimizer_state_dict(self.model, self._inner_optimizer,
                                                                                 options=self._options())
        state = {"optimizer": optimizer, "rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, folder / "optimizer.pt")

    def load_state(self, folder: Path) -> None:
        """Every rank reads the checkpoint (the run folder is shared) and loads it whole."""
        for module in self.model.modules():  # FSDP2 leaves the root's weights gathered after a no-grad forward
            if isinstance(module, FSDPModule):  # (the start-up checks): shard them again before loading
                module.reshard()
        if self.full:  # save_pretrained's names are the parameters' own (a tied output layer is left out)
            weights = {}
            for file in sorted((folder / "model").glob("*.safetensors")):
                weights.update(load_file(str(file)))
            names = {k: k for k in self.bare.state_dict()}
        else:
            weights = load_file(str(folder / "adapter" / "adapter_model.safetensors"))
            adapter = self.peft.active_adapter
            # peft saves X.lora_A.weight for X.lora_A.<adapter>.weight, and DoRA's X.lora_magnitude_vector
            # for X.lora_magnitude_vector.<adapter>.weight
            names = {k.replace(f".{adapter}.", ".").replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): k
                     for k, p in self.peft.named_parameters() if p.requires_grad}
        model_state = {names[k]: v.to(self.device) for k, v in weights.items() if k in names}
        every = {k for k, _ in self.bare.named_parameters()} if self.full else set()  # a tied one once
        if not weights or len(model_state) != len(weights) or not every <= set(model_state):
            raise TrainingError(f"the checkpoint weights in {folder} do not fit this model")
        set_model_state_dict(self.model, model_state, options=self._options())
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
        if all(isinstance(key, int) for key in state["optimizer"]["state"]):  # written before name-keyed state
            self._inner_optimizer.load_state_dict(state["optimizer"])
        else:
            set_optimizer_state_dict(self.model, self._inner_optimizer, state["optimizer"], options=self._options())
        torch.set_rng_state(state["rng"].cpu())
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def peak_memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 1e9
        return process_peak_memory_gb()

    def versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {name: version(name) for name in ("torch", "transformers", "peft")}
