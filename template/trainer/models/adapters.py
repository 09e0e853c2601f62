"""LoRA adapters in either engine's format, and conversion between them.

peft (transformers) and mlx-lm store the same update, W' = W + scale * B @ A, differently:

    peft:   adapter_model.safetensors  base_model.model.<path>.lora_A.weight  (rank, in)
                                       base_model.model.<path>.lora_B.weight  (out, rank)
            adapter_config.json        r, lora_alpha (scale = alpha / r), target_modules, ...
    mlx-lm: adapters.safetensors       <path>.lora_a  (in, rank)
                                       <path>.lora_b  (rank, out)
            adapter_config.json        num_layers, lora_parameters {rank, scale, dropout, keys}

where <path> is the layer's module path in the Hugging Face model (model.layers.3.self_attn.q_proj).
DoRA adds a magnitude per output feature, the same vector in both: peft's
<path>.lora_magnitude_vector (use_dora in its config), mlx-lm's <path>.m (fine_tune_type dora).
Reading and writing need only numpy, so either engine's install can convert.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import ProjectError

PEFT_WEIGHTS, MLX_WEIGHTS, CONFIG = "adapter_model.safetensors", "adapters.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."
LAYER = re.compile(r"^(.*?)layers\.(\d+)\.(.+)$")  # prefix, block index, path inside the block
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class AdapterError(ProjectError):
    kind = "adapter_error"


@dataclass
class LoraWeights:
    """An adapter independent of engine: for each adapted layer's module path, A (rank x in)
    and B (out x rank) in float32, and the scale of the update."""

    layers: dict[str, tuple[np.ndarray, np.ndarray]]
    rank: int
    scale: float
    dropout: float
    source_format: str
    magnitudes: dict[str, np.ndarray] = field(default_factory=dict)  # DoRA's, per adapted layer (else empty)

    def block_keys(self) -> list[str]:
        """Module paths inside a transformer block (self_attn.q_proj), as mlx-lm's `keys`."""
        return sorted({LAYER.match(path).group(3) for path in self.layers})

    def layer_indices(self) -> list[int]:
        return sorted({int(LAYER.match(path).group(2)) for path in self.layers})


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file as numpy float32 (bf16 widened), with no engine installed."""
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in DTYPES:
            raise AdapterError(f"{path}: tensor {name} has dtype {info['dtype']}; adapters must be float")
        start, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        array = np.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + size + start)
        array = array.reshape(info["shape"])
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array.astype(np.float32)
    return tensors


def detect(folder: Path) -> str:
    if (folder / PEFT_WEIGHTS).is_file():
        return "peft"
    if (folder / MLX_WEIGHTS).is_file():
        return "mlx"
    raise AdapterError(f"no adapter in {folder}: expected {PEFT_WEIGHTS} (peft) or {MLX_WEIGHTS} (mlx-lm)")


def read(folder: Path) -> LoraWeights:
    kind = detect(folder)
    config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    layers: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if kind == "peft":
        tensors = read_safetensors(folder / PEFT_WEIGHTS)
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            path = name.split(".lora_A.")[0].removeprefix(PEFT_PREFIX)
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            layers[path] = (a, b)
        magnitudes = {name.split(".lora_magnitude_vector")[0].removeprefix(PEFT_PREFIX): m
                      for name, m in tensors.items() if ".lora_magnitude_vector" in name}
        rank = int(config["r"])
        alpha = float(config["lora_alpha"])
        scale = alpha / (rank ** 0.5) if config.get("use_rslora") else alpha / rank
        dropout = float(config.get("lora_dropout", 0.0))
    else:
        tensors = read_safetensors(folder / MLX_WEIGHTS)
        for name, a in tensors.items():
            if not name.endswith(".lora_a"):
                continue
            path = name.removesuffix(".lora_a")
            layers[path] = (a.T.copy(), tensors[path + ".lora_b"].T.copy())
        magnitudes = {name.removesuffix(".m"): m for name, m in tensors.items() if name.endswith(".m")}
        parameters = config["lora_parameters"]
        rank, scale = int(parameters["rank"]), float(parameters["scale"])
        dropout = float(parameters.get("dropout", 0.0))
    if not layers:
        raise AdapterError(f"{folder} holds no LoRA weights")
    outside = [path for path in layers if not LAYER.match(path)]
    if outside:
        raise AdapterError(f"{folder}: adapted layers outside the transformer blocks are not supported: {outside[:3]}")
    if magnitudes and set(magnitudes) != set(layers):
        raise AdapterError(f"{folder}: DoRA magnitudes for {len(magnitudes)} of {len(layers)} adapted layers")
    return LoraWeights(layers, rank, scale, dropout, kind, magnitudes)


def _save(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(path))


def write_peft(weights: LoraWeights, folder: Path, base_model: str) -> None:
    """peft's format; the scale is kept exactly by writing lora_alpha = scale * rank."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, (a, b) in weights.layers.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
    for path, m in weights.magnitudes.items():
        tensors[f"{PEFT_PREFIX}{path}.lora_magnitude_vector"] = m
    _save(tensors, folder / PEFT_WEIGHTS)
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": weights.rank, "lora_alpha": weights.scale * weights.rank, "lora_dropout": weights.dropout,
        "target_modules": sorted({key.split(".")[-1] for key in weights.block_keys()}),
        "layers_to_transform": weights.layer_indices(), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": bool(weights.magnitudes), "inference_mode": True,
    }
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_mlx(weights: LoraWeights, folder: Path, total_layers: int) -> None:
    """mlx-lm's format. mlx-lm adapts the last `num_layers` blocks, the same keys in each,
    so the adapter must cover a contiguous run of final blocks."""
    indices = weights.layer_indices()
    if indices != list(range(total_layers - len(indices), total_layers)):
        raise AdapterError(f"mlx-lm adapts the last N blocks; this adapter covers blocks {indices} "
                           f"of {total_layers}")
    keys = weights.block_keys()
    prefixes = {LAYER.match(path).group(1) for path in weights.layers}
    expected = {f"{prefix}layers.{i}.{k}" for prefix in prefixes for i in indices for k in keys}
    if set(weights.layers) != expected:
        raise AdapterError("mlx-lm adapts the same layers in every block; this adapter does not")
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for path, (a, b) in weights.layers.items():
        tensors[f"{path}.lora_a"] = a.T
        tensors[f"{path}.lora_b"] = b.T
    for path, m in weights.magnitudes.items():
        tensors[f"{path}.m"] = m
    _save(tensors, folder / MLX_WEIGHTS)
    config = {"fine_tune_type": "dora" if weights.magnitudes else "lora", "num_layers": len(indices),
              "lora_parameters": {"rank": weights.rank, "scale": weights.scale, "dropout": weights.dropout,
                                  "keys": keys}}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def convert(source: Path, target: Path, to: str, base_model: str, total_layers: int) -> str:
    """Write the adapter in `source` to `target` in format `to` ('peft' or 'mlx'); returns the source format."""
    weights = read(source)
    if to == "peft":
        write_peft(weights, target, base_model)
    elif to == "mlx":
        write_mlx(weights, target, total_layers)
    else:
        raise AdapterError(f"unknown adapter format {to!r}; use peft or mlx")
    return weights.source_format
