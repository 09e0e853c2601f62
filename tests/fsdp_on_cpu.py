"""Trains one run of a generated project under FSDP2 on this machine's CPU; started by
torchrun from tests/test_distributed.py:

    torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py PROJECT RUN_ID [--resume]

accelerate shards with FSDP only on accelerators (CUDA and the like); on a CPU it falls back
to DDP. FullyShardOnCPUAccelerator is the real Accelerator except for the two calls that
differ under FSDP2: `prepare` applies torch's own `fully_shard` to every decoder layer and
the root and points the optimizer at the sharded parameters (as accelerate's FSDP2 path
does on GPUs), and `no_sync` pauses gradient sync the FSDP2 way. Everything else (the
project's backend, its full-state-dict checkpoints, the loop, rank-0-only writes) runs as is.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.distributed.fsdp import fully_shard

project, run_id = Path(sys.argv[1]), sys.argv[2]
os.chdir(project)
sys.path.insert(0, str(project))

from trainer.config import load_config  # noqa: E402
from trainer.engines import distributed, pipeline  # noqa: E402


class FullyShardOnCPUAccelerator(Accelerator):
    def prepare(self, model, optimizer):
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module)
        fully_shard(model)
        sharded = dict(model.named_parameters())
        optimizer.param_groups[0]["params"] = [sharded[name] for name in trainable]
        assert all(type(p).__name__ == "DTensor" for p in optimizer.param_groups[0]["params"])
        return model, optimizer

    @contextlib.contextmanager
    def no_sync(self, model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


world = distributed.TorchWorld(FullyShardOnCPUAccelerator(cpu=True))
distributed.world_for = lambda backend: world
result = pipeline.train_run(load_config(), run_id, resume="--resume" in sys.argv, quiet=True)
if world.main:
    print(json.dumps(result))
torch.distributed.destroy_process_group()
