"""Streaming (block-autoregressive) generation with a causal WanDiT and a KV cache (docs/causal.md).

The video is a sequence of frame blocks (``rcm_kernels.blockmask.BlockLayout``: a first block of
``first_block_frames`` latent frames, then blocks of ``frames_per_block``). :func:`stream_generate` yields one
finished block at a time: for block i it draws noise, denoises it in a few steps that read the cache
(rectified-flow time ``t``, ``x_t = (1 − t)·x0 + t·ε``, the net predicts ``v = ε − x0``, so ``x0 = x_t − t·v``;
fresh noise between steps), then re-runs the denoised block at ``t = context_noise`` (0 by default) to write
its k/v into the cache (the "context refresh": one extra forward per block), and commits it. With
``refresh="last_step"`` the last denoising step writes instead (Causal-rCM's noisy context, no extra forward;
the model must have been trained for it). ``solver="euler"`` takes plain ODE steps instead of re-noising (a
multi-step causal teacher), and a negative prompt with its own cache adds classifier-free guidance (both
caches are written by every cache-writing pass). Causal I2V: the given first block (e.g. the image's latent)
is written to the cache at ``t = 0`` and generation starts at block 1. The batch may hold several prompts,
each with its own noise generator. :mod:`rcm_pipelines.stream_session` loads the networks, decodes and
writes the video around this loop; :mod:`rcm_pipelines.stream_spec` is its configuration.

With a rolling cache (sink frames + the most recent ``window_frames``) the memory is fixed for any number of
blocks; RoPE positions are computed on the fly. ``rcm_nets.wan.vae.StreamingDecoder`` decodes each finished
block with the VAE's causal feature cache, so pixels come out block by block and equal a whole-video decode.

CUDA graphs (``cuda_graph``, :class:`StepGraphs`): each DiT call of a step (and the cache-writing pass) is
captured once per static shape: which cache (conditional / CFG's unconditional), visible cache frames F,
block frames n, write or not. F grows while the window fills, then stays constant, so a video has a handful
of shapes (c3-3 with 3 sink + 15 window frames: F = 0, 3, ..., 18). The first call of a shape runs eager
(warm-up: kernel compilation, library handles), the second captures and replays; graphs share one memory
pool. The per-block inputs (visible slots, RoPE positions, write slots) live in fixed device buffers of the
cache (``KVCache.use_static_indices``), the latents, times and prompt k/v in static buffers of the graph,
so a replay reads the current block's values and writes the cache in place.

Layout legend: B batch, C latent channels, n frames of a block, H x W latent size.
"""

from __future__ import annotations

import logging
import math
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

__all__ = ["DEFAULT_STREAM_TIMES", "StepGraphs", "StreamBlock", "stream_generate", "wan_timestep"]

log = logging.getLogger(__name__)

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
    ``seconds``: DiT time of the block (CUDA-synchronized), refresh pass included; ``nan`` when the generator
    runs without host syncs (``synchronize=False`` on CUDA): then :meth:`dit_seconds` reads the block's CUDA
    events. With ``record=True``: ``steps[k] = (x_in, t_rf, v)`` of each denoising step (``v`` the guided
    velocity under CFG, whose parts are ``guidance_parts[k] = (v_cond, v_uncond)``) and ``context = (x_in,
    t_rf)`` of the cache-writing pass (``None`` when the last step wrote), to replay the block against a
    full-sequence pass.
    """

    index: int
    first_frame: int
    x0: Tensor
    seconds: float
    prefill: bool = False
    steps: list[tuple[Tensor, float, Tensor]] | None = None
    context: tuple[Tensor, float] | None = None
    guidance_parts: list[tuple[Tensor, Tensor]] | None = None
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None

    def dit_seconds(self) -> float:
        """DiT time of the block: ``seconds``, or the elapsed time between its CUDA events (waits for the end
        event only, not for the whole device)."""
        if self.events is None:
            return self.seconds
        start, end = self.events
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class _Timer:
    """Per-block DiT time: host clock after a device sync (``sync``), or CUDA events (no host sync)."""

    def __init__(self, device: torch.device, sync: bool):
        self.device, self.events = device, device.type == "cuda" and not sync

    def start(self):
        if self.events:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def stop(self, start) -> tuple[float, tuple | None]:
        if self.events:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return math.nan, (start, end)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start, None


class _Graph:
    """One captured DiT call: static inputs ``x``, ``t``, the output ``out``."""

    def __init__(self, graph: torch.cuda.CUDAGraph, x: Tensor, t: Tensor, out: Tensor):
        self.graph, self.x, self.t, self.out = graph, x, t, out


def _tensors(prompt: PromptKV | Tensor) -> list[Tensor]:
    return [x for kv in prompt.layers for x in kv] if isinstance(prompt, PromptKV) else [prompt]


def _clone_prompt(prompt: PromptKV | Tensor) -> PromptKV | Tensor:
    if isinstance(prompt, PromptKV):
        return PromptKV(tuple(tuple(x.clone() for x in kv) for kv in prompt.layers))
    return prompt.clone()


class StepGraphs:
    """CUDA graphs of the DiT calls of streaming steps, one per static shape, kept across videos.

    Key of a graph: ``(branch, F, n, write, x shape)`` with branch 0 the conditional cache, 1 CFG's
    unconditional one, F the visible cache frames, n the block's frames. The first call of a key runs eager
    (warm-up), the second captures (``torch.cuda.graph``, one shared pool) and replays; later calls copy
    ``x`` and ``t`` into the static inputs and replay on the current stream. Cache writes inside a graph
    go to the cache's fixed storage at slots read from its device index buffer, so the cache stays
    correct; :meth:`rcm_kernels.kv_cache.KVCache.mark_written` then records the write.

    Every cache storage format is captured (int8/fp8/int4 quantize on write inside the graph; key smoothing's
    factors are set by block 0, whose cache length 0 is its own graph). Eager instead (said once in the log):
    not on CUDA, autograd enabled, or a capture that failed.
    """

    def __init__(self, net: WanDiT):
        self.net = net
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: set[tuple] = set()
        self._bound: tuple | None = None
        self._prompts: list[PromptKV | Tensor] = []
        self._said: set[str] = set()
        self.off_reason: str | None = None
        self._pool = None
        self.captures = self.replays = 0

    def _say(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            log.warning("cuda_graph: %s", msg)

    @staticmethod
    def unsupported(device: torch.device, caches: Sequence[KVCache]) -> str | None:
        """Why a run on ``device`` with ``caches`` cannot be captured (``None``: it can)."""
        if device.type != "cuda":
            return f"needs a CUDA device, the net is on {device.type}; running eager"
        if any(kv.storage()[0].device != device for kv in caches):
            return "the KV cache is not on the net's device; running eager"
        if torch.is_grad_enabled():
            return "autograd is enabled; running eager"
        return None

    def bind(self, caches: Sequence[KVCache], prompts: Sequence[PromptKV | Tensor]) -> bool:
        """Prepare a video: returns whether graphs are used. Graphs captured for other caches or prompt shapes
        are dropped; the prompts are copied into the static prompt buffers."""
        device = next(self.net.parameters()).device
        reason = self.off_reason or self.unsupported(device, caches)
        if reason:
            self._say(reason)
            return False
        key = (tuple(id(kv) for kv in caches), tuple(kv.storage()[0].data_ptr() for kv in caches),
               tuple(tuple((tuple(x.shape), x.dtype) for x in _tensors(p)) for p in prompts))
        if key != self._bound:
            self._graphs.clear()
            self._seen.clear()
            self._prompts = [_clone_prompt(p) for p in prompts]
            self._bound = key
        else:
            for dst, src in zip(self._prompts, prompts):
                for a, b in zip(_tensors(dst), _tensors(src)):
                    a.copy_(b)
        for kv in caches:
            kv.use_static_indices()
        return True

    def __call__(self, branch: int, x: Tensor, t: Tensor, cache: KVCache, block, write: bool) -> Tensor:
        """The DiT velocity of ``x`` at network times ``t`` for ``block`` (a fresh tensor, not a static buffer)."""
        key = (branch, cache.num_cached_frames, block.num_frames, write, tuple(x.shape), x.dtype)
        g = self._graphs.get(key)
        if g is None and key in self._seen and self.off_reason is None:
            g = self._capture(key, branch, x, t, cache, block, write)
        if g is None:
            self._seen.add(key)
            return self.net.forward_block(x, t, self._prompts[branch], cache=cache, block=block, write=write)
        g.x.copy_(x)
        g.t.copy_(t)
        g.graph.replay()
        self.replays += 1
        if write:
            cache.mark_written(block)
        return g.out.clone()

    def _capture(self, key, branch, x, t, cache, block, write) -> _Graph | None:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        sx, st = x.clone(), t.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.net.forward_block(sx, st, self._prompts[branch], cache=cache, block=block, write=write)
        except RuntimeError as err:  # e.g. an op that syncs the host; eager from now on
            self.off_reason = f"capture failed ({str(err).splitlines()[0]}); running eager"
            self._say(self.off_reason)
            self._graphs.clear()
            return None
        self.captures += 1
        self._graphs[key] = g = _Graph(graph, sx, st, out)
        return g


def _noise_fn(generator: torch.Generator | Sequence[torch.Generator], shape: tuple[int, int, int, int],
              device: torch.device):
    """``noise(n) -> [B, C, n, H, W]`` on ``device``: one generator draws the whole batch; a list of B generators
    draws sample b from generator b (a sample's noise then does not depend on its batch). CPU draws reach a
    CUDA device through pinned memory without blocking the host."""
    b, c, h, w = shape
    per_sample = not isinstance(generator, torch.Generator)
    gens = list(generator) if per_sample else [generator]
    if per_sample and len(gens) != b:
        raise ValueError(f"generator: give one torch.Generator or one per sample ({b}), got {len(gens)}")

    def noise(n: int) -> Tensor:
        if per_sample:
            parts = [torch.randn((1, c, n, h, w), generator=g, device=g.device) for g in gens]
            x = torch.cat([p.to(parts[0].device) for p in parts]) if len(parts) > 1 else parts[0]
        else:
            x = torch.randn((b, c, n, h, w), generator=gens[0], device=gens[0].device)
        if x.device.type == "cpu" and device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True)
        return x.to(device)

    return noise


@torch.no_grad()
def stream_generate(net: WanDiT, prompt: PromptKV | Tensor, cache: KVCache, *, num_frames: int,
                    layout: BlockLayout, latent_shape: tuple[int, int, int, int],
                    generator: torch.Generator | Sequence[torch.Generator],
                    times: Sequence[float] | Sequence[Sequence[float]] = DEFAULT_STREAM_TIMES,
                    context_noise: float = 0.0, refresh: Literal["clean", "last_step"] = "clean",
                    clean_refresh_blocks: int = 0, solver: Literal["renoise", "euler"] = "renoise",
                    negative: PromptKV | Tensor | None = None, uncond_cache: KVCache | None = None,
                    guidance: float = 1.0, initial_latent: Tensor | None = None,
                    timestep_dtype: torch.dtype | None = None, record: bool = False,
                    synchronize: bool = True, cuda_graph: bool | StepGraphs = False) -> Iterator[StreamBlock]:
    """Generate ``num_frames`` latent frames block by block, yielding each finished :class:`StreamBlock`.

    Args:
        net: a causal-capable ``WanDiT`` (t2v).
        prompt: :meth:`WanDiT.encode_prompt` output (text k/v computed once) or raw embeddings ``[B, L, D]``.
        cache: an empty ``KVCache`` of the net's geometry (:func:`rcm_nets.wan.causal.make_kv_cache`); reset here.
        num_frames: latent frames to produce; must be covered exactly by whole blocks of ``layout``.
        latent_shape: ``(B, C, H, W)`` of a latent frame.
        generator: noise source (initial noise of each block, then fresh noise per step): one generator for
            the batch, or one per sample (sample b's noise then equals a batch-1 run with generator b); the
            noise is drawn on the generators' device, the latents live on the net's device.
        times: RF times of the denoising steps (strictly decreasing in (0, 1]); or one list per block, the
            last one repeating (e.g. 4 steps for block 0, then 2).
        context_noise: RF time of the cache-writing re-run (0 = clean context).
        refresh: ``"clean"`` (extra pass at ``context_noise``) or ``"last_step"`` (the last step writes).
        clean_refresh_blocks: with ``refresh="last_step"``, the first blocks (indices ``< clean_refresh_blocks``)
            still write with the clean pass (Causal-rCM's noisy-context preset keeps block 0 clean: 1).
        solver: ``"renoise"`` (few-step student: ``x0 = x − t·v``, fresh noise to the next time) or ``"euler"``
            (multi-step teacher: the ODE step ``x ← x − (t_k − t_{k+1})·v``, no noise after the start).
        negative: CFG: the negative prompt (same form as ``prompt``, batch B); needs ``uncond_cache`` (an
            empty cache like ``cache``). Every step then runs the net twice, ``v = v_u + guidance·(v_c − v_u)``,
            and every cache-writing pass writes both caches.
        guidance: CFG scale (used when ``negative`` is given; 1 reproduces the conditional velocity).
        initial_latent: causal I2V, ``[B, C, first_block_frames, H, W]``: block 0 is given (written to the
            cache(s) at ``t = 0`` and yielded with ``prefill=True``), generation starts at block 1.
        timestep_dtype: round ``1000·t`` through this dtype (bf16 as rcm) or feed it exactly (None).
        record: keep every step's input and velocity in the yielded blocks (tests, debugging).
        synchronize: time each block with a device sync (default); ``False`` on CUDA records CUDA events
            instead and never blocks the host, so a consumer can overlap other work (the streaming decode).
        cuda_graph: replay CUDA graphs of the DiT calls (:class:`StepGraphs`; pass one to keep its graphs
            across videos, ``True`` makes one for this call); eager where capture is impossible (logged once).
    """
    if not layout.covers_exactly(num_frames):
        raise ValueError(f"num_frames={num_frames} is not a whole number of blocks of {layout} "
                         f"(nearest: {layout.block_start(layout.num_blocks(num_frames))})")
    if refresh not in ("clean", "last_step"):
        raise ValueError(f"refresh must be 'clean' or 'last_step', got {refresh!r}")
    if solver not in ("renoise", "euler"):
        raise ValueError(f"solver must be 'renoise' or 'euler', got {solver!r}")
    if not 0 <= context_noise < 1:
        raise ValueError(f"context_noise must be in [0, 1), got {context_noise}")
    if (negative is None) != (uncond_cache is None):
        raise ValueError("CFG needs both negative and uncond_cache (or neither)")
    b, c, h, w = latent_shape
    device = next(net.parameters()).device
    caches = [cache] if uncond_cache is None else [cache, uncond_cache]
    for kv in caches:
        kv.reset()
    if initial_latent is not None and tuple(initial_latent.shape) != (b, c, layout.first, h, w):
        raise ValueError(f"initial_latent has shape {tuple(initial_latent.shape)}, expected the first block "
                         f"{(b, c, layout.first, h, w)}")
    noise = _noise_fn(generator, latent_shape, device)
    timer = _Timer(device, synchronize)
    graphs = (StepGraphs(net) if cuda_graph is True else cuda_graph) or None
    prompts = [prompt] if negative is None else [prompt, negative]
    if graphs is not None and not graphs.bind(caches, prompts):
        graphs = None

    def dit(j: int, x: Tensor, ts: Tensor, blk, write: bool) -> Tensor:
        if graphs is not None:
            return graphs(j, x, ts, caches[j], blk, write)
        return net.forward_block(x, ts, prompts[j], cache=caches[j], block=blk, write=write)

    def run(x: Tensor, t: float, blks, write: bool) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        ts = wan_timestep(t, b, device, timestep_dtype)
        v = dit(0, x, ts, blks[0], write).float()
        if negative is None:
            return v, None
        v_u = dit(1, x, ts, blks[1], write).float()
        return v_u + guidance * (v - v_u), (v, v_u)

    for i in range(layout.num_blocks(num_frames)):
        n, start = layout.block_frames(i), layout.block_start(i)
        tic = timer.start()
        blks = [kv.begin_block(n) for kv in caches]
        if i == 0 and initial_latent is not None:
            x0 = initial_latent.to(device=device, dtype=torch.float32)
            run(x0, 0.0, blks, write=True)
            for kv, blk in zip(caches, blks):
                kv.commit(blk)
            seconds, events = timer.stop(tic)
            yield StreamBlock(i, start, x0, seconds, prefill=True, context=(x0, 0.0) if record else None,
                              events=events)
            continue
        ts = check_schedule(block_schedule(times, i), low=0.0, high=1.0, what="denoising times (RF)")
        write_last = refresh == "last_step" and i >= clean_refresh_blocks
        steps, parts = ([], []) if record else (None, None)
        x = ts[0] * noise(n)  # (1 − t0)·0 + t0·ε: the sampler's start at t0 < 1 (rcm)
        for k, tk in enumerate(ts):
            last = k == len(ts) - 1
            v, vp = run(x, tk, blks, write=last and write_last)
            if record:
                steps.append((x, tk, v))
                parts.append(vp)
            x0 = x - tk * v
            if not last:
                t_next = ts[k + 1]
                x = x - (tk - t_next) * v if solver == "euler" else (1 - t_next) * x0 + t_next * noise(n)
        ctx = None
        if not write_last:
            xc = x0 if context_noise == 0 else (1 - context_noise) * x0 + context_noise * noise(n)
            run(xc, context_noise, blks, write=True)
            ctx = (xc, context_noise) if record else None
        for kv, blk in zip(caches, blks):
            kv.commit(blk)
        seconds, events = timer.stop(tic)
        yield StreamBlock(i, start, x0, seconds, steps=steps, context=ctx,
                          guidance_parts=parts if negative is not None else None, events=events)
