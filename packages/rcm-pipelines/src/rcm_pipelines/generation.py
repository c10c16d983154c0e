"""Generation glue shared by `generate.py`, `build_dataset.py` and the distillation sampling hook.

* sizes: resolution / aspect presets (`video_size`), the I2V adaptive size, the latent shape;
* `velocity_fn`: a WanDiT as the RF velocity ``(x, timestep, context) -> v`` that `rcm_losses` samplers take,
  with the I2V conditioning bound in (Wan2.1 I2V: ``y`` and CLIP features as arguments; Wan2.2 I2V:
  ``[x; y]`` concatenated on channels); `ExpertSwitch` picks the high- or low-noise expert per call;
* samplers: `rcm_generate` (few-step student, stochastic or ODE) and `teacher_generate` (Euler / UniPC
  with CFG), both returning the clean latent;
* `i2v_condition`: the I2V ``y`` from an image.

Shape legend: B batch, C=16 latent channels, T latent frames, H x W latent pixels, L text rows, D text width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rcm_losses import TrigFlowAdapter, flow_euler_sample, flow_unipc_sample, rcm_sample
from rcm_losses.parameterization import RF_TIMESTEP_SCALE, round_timestep, trig_to_rf
from rcm_losses.sampling import rcm_sample_times
from rcm_nets.wan import WanDiT, WanVAE

__all__ = [
    "RESOLUTIONS",
    "video_size",
    "adaptive_size",
    "latent_shape",
    "velocity_fn",
    "ExpertSwitch",
    "rcm_generate",
    "teacher_generate",
    "i2v_condition",
]

RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (640, 640)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960)},
}
"""``(width, height)`` in pixels of each resolution / aspect preset (16:9 and 9:16 are Wan's sizes)."""

Velocity = Callable[[Tensor, Tensor, Any], Tensor]
"""``(x [B, C, T, H, W], timestep [B] on 0..1000, context [B, L, D]) -> v``."""


def video_size(resolution: str, aspect_ratio: str, size: Sequence[int] | None = None) -> tuple[int, int]:
    """``(width, height)``: ``size`` if given, else the preset. Both must be multiples of 16 (VAE x patch)."""
    if size is not None:
        w, h = (int(v) for v in size)
    else:
        if resolution not in RESOLUTIONS or aspect_ratio not in RESOLUTIONS[resolution]:
            raise ValueError(f"no size preset for resolution={resolution!r}, aspect_ratio={aspect_ratio!r}; "
                             f"presets: {RESOLUTIONS}")
        w, h = RESOLUTIONS[resolution][aspect_ratio]
    if w < 16 or h < 16 or w % 16 or h % 16:
        raise ValueError(f"video width x height {w}x{h} must be positive multiples of 16 (VAE 8 x patch 2)")
    return w, h


def adaptive_size(image_hw: Sequence[int], target_wh: Sequence[int]) -> tuple[int, int]:
    """I2V ``--adaptive_resolution``: the pixel area of ``target_wh`` with the image's aspect ratio, each
    side rounded to a multiple of 16 (at least 16). Returns ``(width, height)``."""
    ih, iw = image_hw
    area = target_wh[0] * target_wh[1]
    h = math.sqrt(area * ih / iw)
    w = area / h
    return max(16, round(w / 16) * 16), max(16, round(h / 16) * 16)


def latent_shape(num_frames: int, width: int, height: int, *, channels: int = 16) -> tuple[int, int, int, int]:
    """``(C, T, H, W)`` of the latent of ``num_frames = 1 + 4k`` frames of ``width x height`` pixels."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 1 + 4k (e.g. 77 or 81), got {num_frames}")
    return channels, 1 + (num_frames - 1) // 4, height // 8, width // 8


# ------------------------------------------------------------------------------------------ velocity
def velocity_fn(net: WanDiT, *, y: Tensor | None = None, clip_fea: Tensor | None = None) -> Velocity:
    """``net`` as an RF velocity with the I2V conditioning bound in (expanded to the call's batch).

    Wan2.1 I2V (``model_type='i2v'``) takes ``y`` and ``clip_fea``; a Wan2.2-style I2V network (a t2v network
    with ``in_dim > out_dim``) gets ``[x; y]``; a T2V network takes neither.
    """
    cfg = net.config
    concat = cfg.model_type == "t2v" and cfg.in_dim > cfg.out_dim
    if cfg.model_type == "i2v" and (y is None or clip_fea is None):
        raise ValueError("a Wan2.1 I2V network needs y (VAE image condition) and clip_fea (CLIP features)")
    if concat and y is None:
        raise ValueError(f"this network takes {cfg.in_dim} input channels: it needs the I2V condition y")
    if cfg.model_type == "t2v" and not concat and (y is not None or clip_fea is not None):
        raise ValueError("a T2V network takes no image condition (use an I2V config)")

    def _expand(v: Tensor | None, b: int) -> Tensor | None:
        return None if v is None else v.expand(b, *v.shape[1:])

    def velocity(x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        b = x.shape[0]
        yb = _expand(y, b)
        if concat:
            return net(torch.cat([x, yb.to(device=x.device, dtype=x.dtype)], dim=1), timestep, context)
        if cfg.model_type == "i2v":
            return net(x, timestep, context, y=yb, clip_fea=_expand(clip_fea, b))
        return net(x, timestep, context)

    return velocity


class ExpertSwitch:
    """Wan2.2 two-expert velocity: ``high`` while the timestep is ``>= 1000 * boundary`` (RF time >= 0.9 by
    default), ``low`` after. With ``offload``, the expert not in use waits on the CPU (``net``s are the
    modules the velocities call; they are moved, the velocities stay valid)."""

    def __init__(self, high: Velocity, low: Velocity, *, boundary: float = 0.9, nets: tuple | None = None,
                 device: torch.device | None = None, offload: bool = False):
        if not 0 < boundary < 1:
            raise ValueError(f"boundary must lie in (0, 1), got {boundary}")
        self.high, self.low, self.boundary = high, low, boundary
        self.nets, self.device, self.offload = nets, device, offload and nets is not None
        self.calls = {"high": 0, "low": 0}

    def __call__(self, x: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
        which = "high" if float(timestep.max()) >= RF_TIMESTEP_SCALE * self.boundary else "low"
        self.calls[which] += 1
        if self.offload:
            active, idle = self.nets if which == "high" else self.nets[::-1]
            idle.to("cpu")
            active.to(self.device)
        return (self.high if which == "high" else self.low)(x, timestep, context)


# ------------------------------------------------------------------------------------------ samplers
def rcm_generate(velocity: Velocity, noise: Tensor, context: Tensor, *, generator: torch.Generator,
                 num_steps: int = 4, sigma_max: float = 80.0, mid_t: Sequence[float] = (1.5, 1.4, 1.0),
                 input_dtype: torch.dtype = torch.bfloat16, ode: bool = False,
                 callback: Callable[[dict], None] | None = None) -> Tensor:
    """Few-step rCM sampling (docs/losses.md, sampling): TrigFlow schedule ``[atan(sigma_max), *mid_t, 0]``, no CFG.

    Stochastic (default): denoise, then re-noise with fresh noise from ``generator``
    (`rcm_losses.rcm_sample`). ``ode``: deterministic RF Euler ``x <- x - (s - s_next) v`` on the same times
. ``noise`` ``[B, C, T, H, W]``; returns the clean latent, float64.
    """
    if ode:
        return _rcm_ode(velocity, noise, context, num_steps, sigma_max, mid_t, input_dtype, callback)
    denoiser = TrigFlowAdapter(velocity, input_dtype=input_dtype)
    return rcm_sample(denoiser, noise, context, generator=generator, num_steps=num_steps, sigma_max=sigma_max,
                      mid_t=mid_t, callback=callback)


def _rcm_ode(velocity, noise, context, num_steps, sigma_max, mid_t, input_dtype, callback) -> Tensor:
    times = rcm_sample_times(num_steps, sigma_max=sigma_max, mid_t=mid_t)
    s = [float(trig_to_rf(torch.tensor(t, dtype=torch.float64))) for t in times]
    with torch.no_grad():
        x = s[0] * noise.to(torch.float64)
        for i in range(num_steps):
            ts = round_timestep(torch.full((x.shape[0],), RF_TIMESTEP_SCALE * s[i], dtype=torch.float64,
                                           device=x.device), torch.bfloat16)
            v = velocity(x.to(input_dtype), ts, context).to(torch.float64)
            x = x - (s[i] - s[i + 1]) * v
            if callback is not None:
                callback({"step": i, "num_steps": num_steps, "s": s[i], "x": x})
    return x


def teacher_generate(velocity: Velocity, noise: Tensor, context: Tensor, uncond: Tensor | None, *,
                     sampler: Literal["euler", "unipc"] = "unipc", num_steps: int = 50, guidance: float = 5.0,
                     shift: float = 5.0, sigma_max: float = 5000.0, input_dtype: torch.dtype = torch.bfloat16,
                     callback: Callable[[dict], None] | None = None) -> Tensor:
    """Teacher flow sampling with CFG against ``uncond`` (docs/losses.md, sampling); returns float64 latents.

    ``2 * num_steps`` network calls when ``uncond`` is given and ``guidance > 1``, else ``num_steps``.
    """
    fn = {"euler": flow_euler_sample, "unipc": flow_unipc_sample}[sampler]
    return fn(velocity, noise, context, uncond, guidance=guidance, num_steps=num_steps, shift=shift,
              sigma_max=sigma_max, input_dtype=input_dtype, callback=callback)


# ------------------------------------------------------------------------------------------ I2V
def i2v_condition(vae: WanVAE, image_chw: Tensor, num_frames: int, width: int, height: int) -> Tensor:
    """I2V ``y [1, 4 + 16, T, H/8, W/8]``: mask channels (1 on latent frame 0) then the VAE latent of the
    video ``[image, 0, ..., 0]``; the image (``[3, h, w]`` in [-1, 1]) is resized to ``height x width``
    with antialiasing first (docs/recipes_distill_generate.md, generate.py)."""
    if image_chw.dim() != 3 or image_chw.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got shape {tuple(image_chw.shape)}")
    p = next(vae.parameters())
    img = F.interpolate(image_chw[None].float(), size=(height, width), mode="bicubic", antialias=True,
                        align_corners=False).clamp(-1, 1)
    with torch.no_grad():
        return vae.encode_image_condition(img.to(device=p.device, dtype=p.dtype), num_frames)
