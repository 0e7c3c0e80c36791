"""Data parallelism with torch.distributed, launched by `torchrun`; a no-op in a single process.

Each rank samples its share of the step's prompts with its own engine; gradients of the (tiny)
trainable parameters are summed across ranks; rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> Dist:
    """Join the process group torchrun set up (nccl on CUDA, gloo on CPU), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_sum(ctx: Dist, value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (in place; returned for chaining)."""
    if ctx.active:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather(ctx: Dist, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not ctx.active:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Dist) -> None:
    if ctx.active:
        dist.barrier()


def shutdown(ctx: Dist) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()
