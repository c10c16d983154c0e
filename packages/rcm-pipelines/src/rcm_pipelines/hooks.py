"""Periodic sample hooks of training runs: ``(iteration, models) -> {"samples": uint8 video [3, T, H, W]} | None``.

The training driver calls a hook on every rank (FSDP / context-parallel network calls are collective); rank 0
decodes and returns the video grid (rows: networks and step counts, columns: the fixed sample prompts, the same
noise everywhere), the other ranks return ``None``. :class:`SampleHook` draws a bidirectional student with the
rCM few-step sampler (and optionally the teacher with UniPC + CFG); :class:`CausalSampleHook` streams a causal
student block by block with its KV cache, exactly as inference does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from pydantic import Field
from torch import Tensor, nn

from rcm_kernels.blockmask import BlockLayout
from rcm_losses.meanflow import MeanFlowAdapter, meanflow_sample
from rcm_nets.wan.causal import video_kv_cache

from .components import VAESpec, load_vae
from .config import PipelineConfig
from .generation import rcm_generate, teacher_generate, velocity_fn
from .streaming import stream_generate
from .video import grid_video, to_uint8

__all__ = ["SampleConfig", "SampleHook", "MeanFlowSampleHook", "CausalSampleHook", "decode_preview"]


class SampleConfig(PipelineConfig):
    """Periodic samples of the student (and its EMA) during training, written as mp4 by the logger."""

    every: int = Field(500, ge=0)
    """Sample every this many iterations (also before the first one); 0 disables sampling."""
    num_prompts: int = Field(4, ge=1)
    """Prompts (the first samples of the data: embeddings, prompts and latent shape) per video."""
    steps: list[int] = [1, 2, 4]
    """Student step counts to draw (bidirectional students)."""
    ema: bool = True
    """Also draw the EMA student."""
    teacher_steps: int = Field(0, ge=0)
    """Bidirectional runs: also draw the teacher with this many UniPC steps and CFG (0: no teacher row).
    Causal runs: the Euler steps per block of a causal teacher being trained."""
    sigma_max: float = Field(80.0, gt=0)
    """Initial noise level of the few-step sampler (1.3B 80, 14B 200)."""
    mid_t: list[float] = [1.5, 1.4, 1.0]
    """Intermediate TrigFlow times of the 2-4 step samplers."""
    seed: int = 1
    """Noise seed of the samples (fixed, so videos are comparable over training)."""
    vae: VAESpec | None = VAESpec()
    """VAE that decodes the samples; None: show latent channels 0-2 instead."""


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


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


def _vae(cfg: SampleConfig, device: torch.device):
    return load_vae(cfg.vae, device, torch.float32, field="sample.vae.path") \
        if cfg.vae is not None and _rank0() else None


def _grid(vae, rows: list[Tensor], labels: list[str], iteration: int) -> dict[str, Tensor] | None:
    if not _rank0():
        return None
    print(f"samples at iteration {iteration}: rows {labels}", flush=True)
    return {"samples": to_uint8(grid_video(torch.stack([decode_preview(vae, x) for x in rows])))}


class SampleHook:
    """Bidirectional students: rows student (and EMA) at each of ``cfg.steps`` rCM steps, then the teacher
    (UniPC + CFG with ``negative``) when ``cfg.teacher_steps``; ``samples`` from ``rcm_train.data.first_samples``."""

    def __init__(self, cfg: SampleConfig, samples: Mapping[str, Any], *, device: torch.device,
                 input_dtype: torch.dtype, negative: Tensor | None, guidance: float):
        self.cfg, self.device, self.input_dtype = cfg, device, input_dtype
        self.context = samples["embed"].to(device)
        self.noise = torch.randn(samples["latent"].shape,
                                 generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        self.negative, self.guidance = negative, guidance
        self.vae = _vae(cfg, device)

    def __call__(self, iteration: int, models: Mapping[str, nn.Module]) -> dict[str, Tensor] | None:
        cfg, labels, rows = self.cfg, [], []
        for name in ["student"] + (["student_ema"] if cfg.ema and "student_ema" in models else []):
            vel = velocity_fn(models[name])
            for steps in cfg.steps:
                g = torch.Generator().manual_seed(cfg.seed + 1)
                rows.append(rcm_generate(vel, self.noise, self.context, generator=g, num_steps=steps,
                                         sigma_max=cfg.sigma_max, mid_t=cfg.mid_t, input_dtype=self.input_dtype))
                labels.append(f"{name} {steps} step")
        if cfg.teacher_steps:
            unc = None if self.negative is None else self.negative[None].expand(len(self.noise), -1, -1)
            rows.append(teacher_generate(velocity_fn(models["teacher"]), self.noise, self.context, unc,
                                         sampler="unipc", num_steps=cfg.teacher_steps, guidance=self.guidance,
                                         sigma_max=cfg.sigma_max, input_dtype=self.input_dtype))
            labels.append(f"teacher {cfg.teacher_steps} step")
        return _grid(self.vae, rows, labels, iteration)


class MeanFlowSampleHook(SampleHook):
    """MeanFlow students (a network taking ``r=``): rows student (and EMA) at each of ``cfg.steps`` uniform
    MeanFlow steps ``z_r = z_t − (t − r) u(z_t, r, t)`` from pure noise (``t = 1``)."""

    def __call__(self, iteration: int, models: Mapping[str, nn.Module]) -> dict[str, Tensor] | None:
        labels, rows = [], []
        for name in ["student"] + (["student_ema"] if self.cfg.ema and "student_ema" in models else []):
            net = models[name]
            u = MeanFlowAdapter(lambda x, t, r, c, net=net: net(x, t, c, r=r), input_dtype=self.input_dtype)
            for steps in self.cfg.steps:
                with torch.no_grad():
                    rows.append(meanflow_sample(u, self.noise, self.context,
                                                times=[1 - k / steps for k in range(steps + 1)]).float())
                labels.append(f"{name} {steps} step")
        return _grid(self.vae, rows, labels, iteration)


class CausalSampleHook:
    """Causal students: the student (and its EMA) streamed block by block (KV cache, context refresh) on the
    fixed prompts and noise; ``times`` are the RF times of each block's steps, ``initial`` the given first
    block of causal I2V (taken from the samples' latents)."""

    def __init__(self, cfg: SampleConfig, samples: Mapping[str, Any], layout: BlockLayout, *,
                 device: torch.device, times, context_noise: float, i2v: bool, kv_dtype: str):
        self.cfg, self.layout, self.device = cfg, layout, device
        self.times, self.context_noise, self.kv_dtype = times, context_noise, kv_dtype
        self.context = samples["embed"].to(device)
        self.initial = samples["latent"][:, :, : layout.first].to(device) if i2v else None
        self.shape = tuple(samples["latent"].shape)
        self.vae = _vae(cfg, device)

    def _stream(self, net: nn.Module) -> Tensor:
        n, c, t, h, w = self.shape
        cache = video_kv_cache(net, self.shape, self.device, layout=self.layout, kv_dtype=self.kv_dtype)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        out = stream_generate(net, self.context, cache, num_frames=t, layout=self.layout, latent_shape=(n, c, h, w),
                              generator=g, times=self.times, context_noise=self.context_noise,
                              initial_latent=self.initial)
        return torch.cat([blk.x0 for blk in out], dim=2)

    def __call__(self, iteration: int, models: Mapping[str, nn.Module]) -> dict[str, Tensor] | None:
        names = ["student"] + (["student_ema"] if self.cfg.ema and "student_ema" in models else [])
        rows = [self._stream(models[name]) for name in names]  # every rank: FSDP calls are collective
        return _grid(self.vae, rows, names, iteration)
