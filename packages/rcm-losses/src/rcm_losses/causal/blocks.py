"""Frame blocks and per-block times of causal (block-autoregressive) training.

Legend: B batch, T latent frames, N frame blocks, K steps. Times are TrigFlow ``t`` in float64; per-frame
times are ``[B, T]``, constant inside a block. The video is a sequence of frame blocks (:class:`FrameBlocks`:
a first block of ``first_block_frames``, then blocks of ``frames_per_block``); docs/causal_training.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rcm_losses.timesteps import TimeSampler, dcm_times, sample_dcm_u

_F64 = torch.float64


# ------------------------------------------------------------------------------------------ blocks / times
@dataclass(frozen=True)
class FrameBlocks:
    """``num_frames`` latent frames as blocks ``[first | fpb | fpb | ...]`` (``c3-3``: ``FrameBlocks(21, 3)``;
    ``c1-4``: ``FrameBlocks(21, 4, 1)``). ``first_block_frames=None`` means ``frames_per_block``."""

    num_frames: int
    frames_per_block: int
    first_block_frames: int | None = None

    def __post_init__(self) -> None:
        first, fpb, t = self.first, self.frames_per_block, self.num_frames
        if fpb < 1 or first < 1 or t < first or (t - first) % fpb:
            raise ValueError(
                f"{t} frames do not split into a first block of {first} and blocks of {fpb} "
                "frames: need num_frames >= first_block_frames and (num_frames - first) % "
                "frames_per_block == 0"
            )

    @property
    def first(self) -> int:
        return self.frames_per_block if self.first_block_frames is None else self.first_block_frames

    @property
    def num_blocks(self) -> int:
        return 1 + (self.num_frames - self.first) // self.frames_per_block

    @property
    def sizes(self) -> tuple[int, ...]:
        """Frames of each block."""
        return (self.first,) + (self.frames_per_block,) * (self.num_blocks - 1)

    @property
    def slices(self) -> tuple[slice, ...]:
        """Frame slice of each block."""
        starts = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        return tuple(slice(a, b) for a, b in zip(starts[:-1], starts[1:]))

    def frames_before(self, block: int) -> int:
        """Frames in blocks ``< block`` (the temporal offset of ``block``)."""
        return 0 if block <= 0 else self.first + (block - 1) * self.frames_per_block

    def expand(self, t_bn: Tensor) -> Tensor:
        """Per-block values ``[..., N]`` -> per-frame ``[..., T]`` (repeated inside each block)."""
        if t_bn.shape[-1] != self.num_blocks:
            raise ValueError(f"expected {self.num_blocks} per-block values, got shape {tuple(t_bn.shape)}")
        sizes = torch.tensor(self.sizes, device=t_bn.device)
        return t_bn.repeat_interleave(sizes, dim=-1)


def sample_block_times(
    sampler: TimeSampler,
    batch: int,
    blocks: FrameBlocks,
    *,
    generator: torch.Generator,
    strategy: Literal["random", "same"] = "random",
) -> Tensor:
    """Per-frame TrigFlow times ``[B, T]`` float64, constant inside each block.

    ``random`` (diffusion forcing, docs/causal_training.md): an independent draw per block (``sampler(B * N)``,
    sample-major); ``same``: one draw per sample shared by all blocks (``sampler(B)``).
    """
    n = blocks.num_blocks
    if strategy == "random":
        t_bn = sampler(batch * n, generator=generator).reshape(batch, n)
    elif strategy == "same":
        t_bn = sampler(batch, generator=generator)[:, None].expand(batch, n)
    else:
        raise ValueError(f"block time strategy must be 'random' or 'same', got {strategy!r}")
    return blocks.expand(t_bn)


def sample_block_dcm_times(
    batch: int,
    blocks: FrameBlocks,
    *,
    generator: torch.Generator,
    total_steps: int = 48,
    skip_steps: int = 1,
    shift: float = 5.0,
    strategy: Literal["random", "same"] = "random",
) -> Tensor:
    """dCM grids per block (docs/losses.md, consistency with one offset ``u`` per block, or per sample for ``same``):
    ``[K + 1, B, T]`` float64, strictly decreasing along K, constant inside each block."""
    n = blocks.num_blocks
    count = batch * n if strategy == "random" else batch
    if strategy not in ("random", "same"):
        raise ValueError(f"block time strategy must be 'random' or 'same', got {strategy!r}")
    u = sample_dcm_u(count, generator=generator, total_steps=total_steps, skip_steps=skip_steps)
    t = dcm_times(u, total_steps=total_steps, skip_steps=skip_steps, shift=shift)  # [K+1, count]
    t_kbn = t.reshape(-1, batch, n) if strategy == "random" else t[:, :, None].expand(-1, batch, n)
    return blocks.expand(t_kbn)
