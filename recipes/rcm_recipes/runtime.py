"""Process-level helpers shared by the recipes: rank-0 printing, the launch rank / world and device (training
runs, ``build_dataset``, ``eval_vbench``), export dtypes, sample decoding and the per-stage ``student`` /
``student_ema`` exports.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rcm_pipelines.components import resolve_device
from rcm_train.checkpoint import Checkpointer, export_module, export_part
from rcm_train.logging import MetricsLogger
from rcm_train.parallel import init_distributed

__all__ = ["DTYPES", "is_rank0", "print0", "launch_rank_world", "local_device", "train_device", "process_group",
           "decode_preview", "stage_exports", "export_students", "export_finished", "finish_stage"]

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


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


def local_device(name: str) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; anything else as
    `loaders.resolve_device` takes it (``cpu``, ``cuda:1``, ...)."""
    if name == "auto" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return resolve_device(name)


def train_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (``cuda:LOCAL_RANK``) or ``auto`` (CUDA when available, else CPU)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available (use --device=cpu)")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


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


def decode_preview(vae, x0: Tensor) -> Tensor:
    """Latents ``[N, C, T, h, w]`` -> video ``[N, 3, T', H, W]`` in [-1, 1] on CPU: decoded by ``vae`` in
    float32, or without one a latent preview (channels 0-2, per-video min-max to [-1, 1], 8x nearest)."""
    if vae is None:
        z = x0[:, :3].float()
        lo, hi = z.amin(dim=(1, 2, 3, 4), keepdim=True), z.amax(dim=(1, 2, 3, 4), keepdim=True)
        z = (z - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
        return z.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4).cpu()
    with torch.no_grad():
        return vae.decode(x0.float()).float().cpu()


def stage_exports(stage_dir: Path) -> dict[str, Path]:
    """Where a stage's ``student`` and ``student_ema`` weights are exported."""
    return {"student": stage_dir / "student.safetensors", "student_ema": stage_dir / "student_ema.safetensors"}


def export_students(models: Mapping[str, nn.Module], stage_dir: Path, dtype: torch.dtype) -> dict[str, Path]:
    """Export ``models["student"]`` and ``models["student_ema"]`` (collective under FSDP: every rank calls)."""
    paths = stage_exports(stage_dir)
    for name, path in paths.items():
        export_module(models[name], path, dtype=dtype)
    return paths


def export_finished(ckpt: Path, stage_dir: Path, dtype: torch.dtype) -> dict[str, Path]:
    """A finished stage's exports, written from checkpoint ``ckpt`` on rank 0 where missing (then a barrier)."""
    paths = stage_exports(stage_dir)
    if is_rank0():
        for name, path in paths.items():
            if not path.exists():
                export_part(ckpt, name, path, dtype=dtype)
    if dist.is_initialized():
        dist.barrier()
    return paths


def finish_stage(iteration: int, models: Mapping[str, nn.Module], *, hook, logger: MetricsLogger,
                 ckpt: Checkpointer, stage_dir: Path, dtype: torch.dtype) -> dict:
    """End of a trained stage: last samples through ``hook`` (if any) into ``logger``, then the exports of
    ``models["student"]`` / ``models["student_ema"]``; returns ``{"iteration", "checkpoint", "student",
    "student_ema"}``."""
    if hook is not None:
        media = hook(iteration, models)
        if media:
            logger.log_media(iteration, media)
    paths = export_students(models, stage_dir, dtype)
    return {"iteration": iteration, "checkpoint": ckpt.latest(), **paths}
