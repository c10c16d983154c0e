"""Process-level helpers of training and of multi-process jobs: rank-0 printing, the launch rank / world, the
default process group."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .parallel import init_distributed

__all__ = ["is_rank0", "print0", "launch_rank_world", "process_group"]


def is_rank0() -> bool:
    """True on rank 0 of the default process group, or when no group is initialized."""
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args) -> None:
    """``print`` (flushed) on rank 0 only."""
    if is_rank0():
        print(*args, flush=True)


def launch_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of an initialized process group, else torchrun's RANK / WORLD_SIZE (no group
    is needed; a single process is rank 0 of 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world})")
    return rank, world


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """The default process group from torchrun's environment (or a world of one; NCCL on CUDA, else gloo)
    for the ``with`` block, torn down at the end if this opened it."""
    own_group = not dist.is_initialized()
    init_distributed("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()
