"""Data-parallel training across processes: who this process is, and the two collectives
the training loop needs (sum a few floats, wait for everyone).

Launchers, not the config, decide the world:
- transformers: `accelerate launch` (or `torchrun`) sets WORLD_SIZE/RANK; the backend then
  trains under an `accelerate.Accelerator` (DDP or FSDP, from the accelerate config).
- mlx: `mlx.launch` sets MLX_RANK and the ring/MPI hosts; `mx.distributed.init()` joins them.

Every rank draws the same global batch from the sampler and trains on its share of the rows
(rank::size); losses are normalised by the global batch's target count, so averaging the
gradients over ranks gives exactly the single-process gradient. Rank 0 alone writes the
run's files; the others only read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

from trainer.errors import ProjectError


class DistributedError(ProjectError):
    kind = "distributed_error"


@dataclass
class World:
    """One process: the single-process world unless a launcher started several."""

    rank: int = 0
    size: int = 1
    launcher: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (every rank gets the result)."""
        return list(values)

    def barrier(self) -> None:
        """Returns when every rank has reached it."""

    def shard(self, rows):
        """This rank's share of a global batch's rows."""
        return rows[self.rank::self.size]

    def describe(self) -> dict[str, Any]:
        return {"processes": self.size, "launcher": self.launcher}


class TorchWorld(World):
    """Ranks of `accelerate launch` / `torchrun`; gloo on CPU, nccl on CUDA."""

    def __init__(self, accelerator: Any):
        super().__init__(accelerator.process_index, accelerator.num_processes, "accelerate")
        self.accelerator = accelerator

    def sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"distributed_type": str(self.accelerator.distributed_type).split(".")[-1]}


class MLXWorld(World):
    """Ranks of `mlx.launch` (ring over TCP, or MPI)."""

    def __init__(self, group: Any):
        super().__init__(group.rank(), group.size(), "mlx.launch")
        self.group = group

    def sum(self, values: list[float]) -> list[float]:
        import mlx.core as mx

        total = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=self.group, stream=mx.cpu)
        return [float(v) for v in total.tolist()]

    def barrier(self) -> None:
        self.sum([0.0])


def torch_launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def mlx_launched() -> bool:
    return "MLX_RANK" in os.environ


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return torch_launched() or mlx_launched()


@cache
def world_for(backend: str) -> World:
    """The world of this process for `backend` (created once: it joins the process group)."""
    if backend == "transformers" and torch_launched():
        import torch
        from accelerate import Accelerator

        # without CUDA, accelerate only forms a (gloo) process group when told it runs on the CPU
        return TorchWorld(Accelerator(cpu=not torch.cuda.is_available()))
    if backend == "mlx" and mlx_launched():
        import mlx.core as mx

        group = mx.distributed.init()
        if group.size() > 1:
            return MLXWorld(group)
    if backend == "mlx" and torch_launched():
        raise DistributedError("this process was started by accelerate launch/torchrun, but the run trains with "
                               "mlx: launch mlx runs with mlx.launch (see the README, 'More than one process')")
    if backend == "transformers" and mlx_launched():
        raise DistributedError("this process was started by mlx.launch, but the run trains with transformers: "
                               "launch transformers runs with accelerate launch (see the README)")
    return World()


def check_batch(world: World, stage: int, batch_size: int) -> None:
    """Every rank needs at least one row of every global batch."""
    if batch_size < world.size:
        raise DistributedError(f"stage {stage}: batch_size {batch_size} is smaller than the {world.size} "
                               "processes; each process trains on batch_size / processes rows of a batch, "
                               "so raise the batch size or launch fewer processes",
                               details={"stage": stage, "batch_size": batch_size, "processes": world.size})
