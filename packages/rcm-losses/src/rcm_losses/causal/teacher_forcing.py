"""Teacher forcing: one network pass over ``[context ; noisy]`` frames seen as a velocity of the noisy frames.

The caller binds the network, its teacher-forcing mask and its RoPE positions into a *packed velocity*
``(x_packed [B, C, 2T, H, W], timestep [B, 2T], cond) -> v``; :class:`TeacherForcingVelocity` turns it into an
ordinary velocity of the noisy frames alone, so the rCM objectives and :class:`TrigFlowAdapter` apply unchanged
with per-block times (docs/causal_training.md, "Teacher forcing").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rcm_losses.parameterization import (
    RF_TIMESTEP_SCALE,
    TrigFlowAdapter,
    VelocityFn,
    VelocityJVP,
    expand_time,
    round_timestep,
    trig_to_rf,
    trigflow_scalings,
)

_F64 = torch.float64


# ------------------------------------------------------------------------------------------ teacher forcing
def network_input(
    x_t: Tensor,
    t: Tensor,
    *,
    input_dtype: torch.dtype | None = torch.bfloat16,
    timestep_dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[Tensor, Tensor]:
    """What an RF network receives for the TrigFlow sample ``x_t`` at ``t`` (``[B]`` or ``[B, T]``): the RF
    sample ``c_in x_t`` cast to ``input_dtype`` and the Wan timestep ``1000 s`` rounded through
    ``timestep_dtype``, computed with :func:`rcm_losses.parameterization.trigflow_scalings` exactly as
    :func:`rcm_losses.parameterization.trigflow_denoise` does (identical values); for cache writes."""
    c = trigflow_scalings(t)
    x_in = x_t * expand_time(c.c_in, x_t)
    return x_in if input_dtype is None else x_in.to(input_dtype), round_timestep(c.c_noise, timestep_dtype)


def _per_frame(timestep: Tensor, frames: int) -> Tensor:
    """``[B]`` / ``[B, 1]`` / ``[B, T]`` timestep -> ``[B, frames]``."""
    if timestep.ndim == 1:
        timestep = timestep[:, None]
    return timestep.expand(timestep.shape[0], frames) if timestep.shape[1] == 1 else timestep


@dataclass(frozen=True)
class TeacherForcingVelocity:
    """The velocity of the noisy frames of a teacher-forcing pass, seen as a function of those frames alone.

    ``packed`` runs the network on ``[context ; noisy]`` (``[B, C, 2T, H, W]``, timestep ``[B, 2T]`` on Wan's
    scale) with the teacher-forcing mask and RoPE positions repeated for both halves, and returns the velocity
    of all ``2T`` frames. ``context`` ``[B, C, T, H, W]`` is the network input of the context half (RF sample,
    already in the input dtype) at ``context_timestep`` ``[B, T]``. The first ``given`` frames of the noisy
    half are not generated (causal I2V: the image block): they are copies of the context frames at the context
    timestep and are neither inputs nor outputs here.
    ``__call__(x_s [B, C, T - given, H, W], timestep, cond)``
    returns ``v`` of the generated frames; ``jvp`` does the same for the ``VelocityJVP`` contract with zero
    tangents for the context (``packed_jvp`` is the packed network's JVP).
    """

    packed: VelocityFn
    context: Tensor
    context_timestep: Tensor
    given: int = 0
    packed_jvp: VelocityJVP | None = None

    def _pack(self, x_s: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor]:
        t_all, g = self.context.shape[2], self.given
        if x_s.shape[2] + g != t_all or x_s.shape[:2] != self.context.shape[:2]:
            raise ValueError(
                f"noisy frames {tuple(x_s.shape)} plus {g} given frames do not match the context "
                f"{tuple(self.context.shape)}"
            )
        ctx = self.context.to(x_s.dtype)
        x = torch.cat([ctx, ctx[:, :, :g], x_s], dim=2)
        ts_ctx = self.context_timestep.to(timestep.dtype)
        ts = torch.cat([ts_ctx, ts_ctx[:, :g], _per_frame(timestep, x_s.shape[2])], dim=1)
        return x, ts

    def _noisy(self, out: Tensor) -> Tensor:
        return out[:, :, self.context.shape[2] + self.given :]

    def __call__(self, x_s: Tensor, timestep: Tensor, cond: Any) -> Tensor:
        x, ts = self._pack(x_s, timestep)
        return self._noisy(self.packed(x, ts, cond))

    def jvp(self, x_s: Tensor, timestep: Tensor, cond: Any, tx: Tensor, tt: Tensor) -> tuple[Tensor, Tensor]:
        if self.packed_jvp is None:
            raise ValueError("TeacherForcingVelocity.jvp needs packed_jvp (the packed network's forward_jvp)")
        x, ts = self._pack(x_s, timestep)
        zx = torch.zeros_like(x[:, :, : x.shape[2] - x_s.shape[2]])
        txp = torch.cat([zx, tx.to(x.dtype)], dim=2)
        ttp = torch.cat(
            [
                torch.zeros_like(ts[:, : ts.shape[1] - x_s.shape[2]]),
                _per_frame(tt, x_s.shape[2]).to(ts.dtype),
            ],
            dim=1,
        )
        v, dv = self.packed_jvp(x, ts, cond, txp, ttp)
        return self._noisy(v), self._noisy(dv)


def _context_time(context_time: float | Tensor, x0: Tensor) -> Tensor:
    t = torch.as_tensor(context_time, dtype=_F64, device=x0.device)
    return t.expand(x0.shape[0], x0.shape[2]) if t.ndim == 0 else t.to(_F64)


def teacher_forcing_velocity(
    packed: VelocityFn,
    x0: Tensor,
    *,
    context_time: float | Tensor = 0.0,
    context_eps: Tensor | None = None,
    given_frames: int = 0,
    packed_jvp: VelocityJVP | None = None,
    input_dtype: torch.dtype | None = torch.bfloat16,
    timestep_dtype: torch.dtype | None = torch.bfloat16,
) -> TeacherForcingVelocity:
    """A :class:`TeacherForcingVelocity` whose context is ``x0`` ``[B, C, T, H, W]`` (clean at
    ``context_time = 0``) or ``x0`` re-noised to TrigFlow ``context_time`` (scalar or ``[B, T]``) with
    ``context_eps`` (Causal-rCM's noisy context, docs/causal.md, streaming: the context the cache holds when the last
    denoising step is committed). The context enters the network as the RF sample
    ``(1 - s_c) x0 + s_c eps`` at timestep ``1000 s_c`` (rounded through ``timestep_dtype`` like every
    timestep) cast to ``input_dtype``; it carries no gradient.
    """
    t_c = _context_time(context_time, x0)
    if t_c.shape != (x0.shape[0], x0.shape[2]):
        raise ValueError(
            f"context_time must be a scalar or [B, T] = {(x0.shape[0], x0.shape[2])}, got {tuple(t_c.shape)}"
        )
    if not 0 <= given_frames < x0.shape[2]:
        raise ValueError(f"given_frames must lie in [0, {x0.shape[2]}), got {given_frames}")
    s_c = trig_to_rf(t_c)
    ctx = x0.detach().to(_F64)
    if bool((t_c > 0).any()):
        if context_eps is None:
            raise ValueError("a noisy context (context_time > 0) needs context_eps")
        ctx = ctx + expand_time(s_c, ctx) * (context_eps.detach().to(_F64) - ctx)
    if input_dtype is not None:
        ctx = ctx.to(input_dtype)
    ts = round_timestep(RF_TIMESTEP_SCALE * s_c, timestep_dtype)
    return TeacherForcingVelocity(packed, ctx, ts, given_frames, packed_jvp)


def teacher_forcing_adapter(
    packed: VelocityFn,
    x0: Tensor,
    *,
    context_time: float | Tensor = 0.0,
    context_eps: Tensor | None = None,
    given_frames: int = 0,
    packed_jvp: VelocityJVP | None = None,
    input_dtype: torch.dtype | None = torch.bfloat16,
    timestep_dtype: torch.dtype | None = torch.bfloat16,
) -> TrigFlowAdapter:
    """The TrigFlow denoiser of the generated frames ``x0[:, :, given_frames:]`` under teacher forcing
    (:func:`teacher_forcing_velocity` wrapped in :class:`TrigFlowAdapter`; ``.jvp`` uses ``packed_jvp``, or
    ``torch.func.jvp`` through the packed network when it is None)."""
    v = teacher_forcing_velocity(
        packed,
        x0,
        context_time=context_time,
        context_eps=context_eps,
        given_frames=given_frames,
        packed_jvp=packed_jvp,
        input_dtype=input_dtype,
        timestep_dtype=timestep_dtype,
    )
    return TrigFlowAdapter(
        v, v.jvp if packed_jvp is not None else None, input_dtype=input_dtype, timestep_dtype=timestep_dtype
    )


def _generated(x: Tensor, t: Tensor, given: int) -> tuple[Tensor, Tensor]:
    """Drop the given (I2V) frames from a video and from per-frame times."""
    if t.ndim == 2 and t.shape[1] == x.shape[2]:
        t = t[:, given:]
    return x[:, :, given:], t
