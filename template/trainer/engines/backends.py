"""Which engine trains: what is installed, what the config asks for, and the backend object."""

from __future__ import annotations

import importlib.util
import platform
import sys

from trainer.config import FineTuningConfig
from trainer.engines.base_trainer import Backend, TrainingError
from trainer.engines.distributed import World


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
    cuda = has["transformers"] and cuda_available()
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


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def precision_error() -> TrainingError:
    """mlx and training.precision bf16: an mlx model computes in its weights' own dtype."""
    return TrainingError(
        "training.precision bf16 is mixed precision by torch's autocast (bfloat16 matmuls, float32 weights), "
        "which mlx does not have: mlx computes in the model's own dtype. Set training.precision: auto, or "
        "training.backend: transformers", details={"field": "training.precision", "backend": "mlx"})


def make_backend(name: str, seed: int, world: World | None = None, precision: str = "auto") -> Backend:
    if name == "mlx":
        if precision == "bf16":
            raise precision_error()
        from trainer.engines.mlx_trainer import MLXBackend

        backend: Backend = MLXBackend(seed, world)
    else:
        from trainer.engines.transformers_trainer import TransformersBackend

        backend = TransformersBackend(seed, world)
    backend.precision = precision
    return backend
