"""Multi-process training with ``torchrun``: DistributedDataParallel, one process per GPU (or CPU slot).

``torchrun --nproc_per_node 4 -m medseg train CONFIG`` starts four processes; each reads
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set by torchrun, joins the process group (NCCL on
CUDA, gloo on CPU), trains on its own shard of the cases (``DistributedSampler``) and
averages gradients with the others. Only rank 0 validates, logs and writes checkpoints.
Several machines: run the same torchrun line on each with ``--nnodes N --node_rank I
--rdzv_endpoint HOST:PORT``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from medseg.core.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext":
        """What torchrun passes to each process (a plain run is a world of one)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local = int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError as exc:
            raise ConfigError("bad torchrun environment", expected="integer WORLD_SIZE, RANK and LOCAL_RANK",
                              found=str(exc), fix="start distributed training with torchrun") from None
        return cls(world, rank, local)


def setup(ctx: DistContext, device_pref: str) -> torch.device:
    """Join the process group; returns this process's device."""
    import torch.distributed as dist

    from medseg.core.runtime import resolve_device

    device = resolve_device(device_pref)
    if not ctx.enabled:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def wrap(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sampler(dataset, ctx: DistContext, seed: int):
    if not ctx.enabled:
        return None
    from torch.utils.data.distributed import DistributedSampler

    return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def teardown(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
