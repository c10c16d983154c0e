"""Streaming (block-autoregressive) generation with a causal WanDiT and a KV cache (docs/causal.md).

The video is a sequence of frame blocks (``rcm_kernels.blockmask.BlockLayout``: a first block of
``first_block_frames`` latent frames, then blocks of ``frames_per_block``). :func:`stream_generate` yields one
finished block at a time: for block i it draws noise, denoises it in a few steps that read the cache
(rectified-flow time ``t``, ``x_t = (1 − t)·x0 + t·ε``, the net predicts ``v = ε − x0``, so ``x0 = x_t − t·v``;
fresh noise between steps), then re-runs the denoised block at ``t = context_noise`` (0 by default) to write
its k/v into the cache (the "context refresh": one extra forward per block), and commits it. With
``refresh="last_step"`` the last denoising step writes instead (Causal-rCM's noisy context, no extra forward;
the model must have been trained for it). Causal I2V: the given first block (e.g. the image's latent) is
written to the cache at ``t = 0`` and generation starts at block 1.

With a rolling cache (sink frames + the most recent ``window_frames``) the memory is fixed for any number of
blocks; RoPE positions are computed on the fly. ``rcm_nets.wan.vae.StreamingDecoder`` decodes each finished
block with the VAE's causal feature cache, so pixels come out block by block and equal a whole-video decode.

Layout legend: B batch, C latent channels, n frames of a block, H x W latent size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rcm_kernels.blockmask import BlockLayout
from rcm_kernels.kv_cache import KVCache
from rcm_losses.schedules import block_schedule, check_schedule
from rcm_nets.wan.dit import PromptKV, WanDiT

__all__ = ["DEFAULT_STREAM_TIMES", "StreamBlock", "stream_generate", "wan_timestep"]

DEFAULT_STREAM_TIMES: tuple[float, ...] = (1600 / 1601, 15 / 16, 5 / 6, 5 / 8)
"""RF times of the 4 denoising steps of a block (the Causal-rCM / Self-Forcing schedule; first =
σmax/(σmax+1), σmax = 1600)."""


def wan_timestep(t: float, batch: int, device, dtype: torch.dtype | None = None) -> Tensor:
    """Wan's network time ``1000·t`` as ``[B]`` float64, rounded through ``dtype`` when given (rcm feeds bf16:
    999.38 -> 1000, 937.5 -> 936; docs/causal.md)."""
    x = torch.full((batch,), 1000.0 * t, dtype=torch.float64, device=device)
    return x if dtype is None else x.to(dtype).to(torch.float64)


@dataclass
class StreamBlock:
    """One finished block.

    ``x0 [B, C, n, H, W]`` float32: the denoised latents (the given latents for an I2V prefill block).
    ``seconds``: DiT time of the block (CUDA-synchronized), refresh pass included. With ``record=True``:
    ``steps[k] = (x_in, t_rf, v)`` of each denoising step and ``context = (x_in, t_rf)`` of the cache-writing
    pass (``None`` with ``refresh="last_step"``), to replay the block against a full-sequence pass.
    """

    index: int
    first_frame: int
    x0: Tensor
    seconds: float
    prefill: bool = False
    steps: list[tuple[Tensor, float, Tensor]] | None = None
    context: tuple[Tensor, float] | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def stream_generate(net: WanDiT, prompt: PromptKV | Tensor, cache: KVCache, *, num_frames: int,
                    layout: BlockLayout, latent_shape: tuple[int, int, int, int], generator: torch.Generator,
                    times: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_STREAM_TIMES,
                    context_noise: float = 0.0, refresh: Literal["clean", "last_step"] = "clean",
                    initial_latent: Tensor | None = None, timestep_dtype: torch.dtype | None = None,
                    record: bool = False) -> Iterator[StreamBlock]:
    """Generate ``num_frames`` latent frames block by block, yielding each finished :class:`StreamBlock`.

    Args:
        net: a causal-capable ``WanDiT`` (t2v).
        prompt: :meth:`WanDiT.encode_prompt` output (text k/v computed once) or raw embeddings ``[B, L, D]``.
        cache: an empty ``KVCache`` of the net's geometry (:func:`rcm_nets.wan.causal.make_kv_cache`); reset here.
        num_frames: latent frames to produce; must be covered exactly by whole blocks of ``layout``.
        latent_shape: ``(B, C, H, W)`` of a latent frame.
        generator: noise source (initial noise of each block, then fresh noise per step); its device is
            where the noise is drawn, the latents live on the net's device.
        times: RF times of the denoising steps (strictly decreasing in (0, 1]); or one list per block, the
            last one repeating (e.g. 4 steps for block 0, then 2).
        context_noise: RF time of the cache-writing re-run (0 = clean context).
        refresh: ``"clean"`` (extra pass at ``context_noise``) or ``"last_step"`` (the last step writes).
        initial_latent: causal I2V, ``[B, C, first_block_frames, H, W]``: block 0 is given (written to the
            cache at ``t = 0`` and yielded with ``prefill=True``), generation starts at block 1.
        timestep_dtype: round ``1000·t`` through this dtype (bf16 as rcm) or feed it exactly (None).
        record: keep every step's input and velocity in the yielded blocks (tests, debugging).
    """
    if not layout.covers_exactly(num_frames):
        raise ValueError(f"num_frames={num_frames} is not a whole number of blocks of {layout} "
                         f"(nearest: {layout.block_start(layout.num_blocks(num_frames))})")
    if refresh not in ("clean", "last_step"):
        raise ValueError(f"refresh must be 'clean' or 'last_step', got {refresh!r}")
    if not 0 <= context_noise < 1:
        raise ValueError(f"context_noise must be in [0, 1), got {context_noise}")
    b, c, h, w = latent_shape
    device = next(net.parameters()).device
    cache.reset()
    if initial_latent is not None and tuple(initial_latent.shape) != (b, c, layout.first, h, w):
        raise ValueError(f"initial_latent has shape {tuple(initial_latent.shape)}, expected the first block "
                         f"{(b, c, layout.first, h, w)}")

    def noise(n: int) -> Tensor:
        return torch.randn((b, c, n, h, w), generator=generator, device=generator.device).to(device)

    def run(x: Tensor, t: float, blk, write: bool) -> Tensor:
        return net.forward_block(x, wan_timestep(t, b, device, timestep_dtype), prompt, cache=cache, block=blk,
                                 write=write).float()

    for i in range(layout.num_blocks(num_frames)):
        n, start = layout.block_frames(i), layout.block_start(i)
        _sync(device)
        tic = time.perf_counter()
        blk = cache.begin_block(n)
        if i == 0 and initial_latent is not None:
            x0 = initial_latent.to(device=device, dtype=torch.float32)
            run(x0, 0.0, blk, write=True)
            cache.commit(blk)
            _sync(device)
            yield StreamBlock(i, start, x0, time.perf_counter() - tic, prefill=True,
                              context=(x0, 0.0) if record else None)
            continue
        ts = check_schedule(block_schedule(times, i), low=0.0, high=1.0, what="denoising times (RF)")
        steps = [] if record else None
        x = ts[0] * noise(n)  # (1 − t0)·0 + t0·ε: the sampler's start at t0 < 1 (rcm)
        for k, tk in enumerate(ts):
            last = k == len(ts) - 1
            v = run(x, tk, blk, write=last and refresh == "last_step")
            if record:
                steps.append((x, tk, v))
            x0 = x - tk * v
            if not last:
                x = (1 - ts[k + 1]) * x0 + ts[k + 1] * noise(n)
        ctx = None
        if refresh == "clean":
            xc = x0 if context_noise == 0 else (1 - context_noise) * x0 + context_noise * noise(n)
            run(xc, context_noise, blk, write=True)
            ctx = (xc, context_noise) if record else None
        cache.commit(blk)
        _sync(device)
        yield StreamBlock(i, start, x0, time.perf_counter() - tic, steps=steps, context=ctx)
