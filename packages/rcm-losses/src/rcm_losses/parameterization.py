"""Time coordinates and the TrigFlow view of a rectified-flow velocity network (docs/losses.md, parameterization).

Three equivalent descriptions of the same forward process (sigma_data = 1):

* EDM noise level ``sigma`` in ``[0, inf)``;
* rectified-flow (RF) time ``s`` in ``[0, 1]``: ``x_s = (1 - s) x0 + s eps``; the Wan network predicts
  ``v = eps - x0`` from ``(x_s, 1000 s)``;
* TrigFlow time ``t`` in ``[0, pi/2]``: ``x_t = cos t x0 + sin t eps``, with ``x_s = x_t / (cos t + sin t)``.

Conversions are one-liners. The adapter :class:`TrigFlowAdapter` turns an RF velocity network into a
TrigFlow *denoiser*: a callable ``(x_t, t, cond) -> TrigFlowPrediction(x0, F)`` (docs/losses.md, parameterization), and gives
the forward-mode derivative ``(F, dF)`` that the sCM objective needs.

Shapes: ``x_t`` is ``[B, ...]`` (video latents ``[B, C, T, H, W]``); ``t`` is ``[B]`` (one time per sample),
``[B, 1]`` (same) or ``[B, T]`` (one time per latent frame, only with 5-D ``x_t``; used by causal models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "RF_TIMESTEP_SCALE",
    "TrigFlowPrediction",
    "TrigFlowScalings",
    "TrigFlowAdapter",
    "Denoiser",
    "DenoiserJVP",
    "VelocityFn",
    "VelocityJVP",
    "sigma_to_rf",
    "rf_to_sigma",
    "sigma_to_trig",
    "trig_to_sigma",
    "rf_to_trig",
    "trig_to_rf",
    "shift_rf",
    "unshift_rf",
    "add_noise",
    "cfg_denoise",
    "expand_time",
    "round_timestep",
    "trigflow_scalings",
    "trigflow_scalings_jvp",
    "trigflow_denoise",
    "trigflow_jvp",
    "velocity_jvp_via_func",
    "denoiser_jvp_via_func",
]

RF_TIMESTEP_SCALE = 1000.0
"""Wan's timestep is ``1000 * s`` (``rectified_flow_t_scaling_factor``)."""


class TrigFlowPrediction(NamedTuple):
    """What a TrigFlow denoiser returns; both fields have the shape of ``x_t`` (float64 from the adapter).

    ``x0``: the clean-sample estimate. ``F``: the TrigFlow velocity, ``F = (cos t x_t - x0) / sin t``
    (equivalently ``x0 = cos t x_t - sin t F``; the target for data ``x0`` and noise ``eps`` is
    ``cos t eps - sin t x0``).
    """

    x0: Tensor
    F: Tensor


class TrigFlowScalings(NamedTuple):
    """Coefficients of the RF -> TrigFlow wrapping (docs/losses.md, parameterization); each has the shape of ``t``.

    ``x_in = c_in x_t`` is the RF sample, ``c_noise = 1000 s`` the Wan timestep, and
    ``x0 = c_skip x_t + c_out v`` the RF reconstruction ``x_s - s v``.
    """

    c_in: Tensor
    c_noise: Tensor
    c_skip: Tensor
    c_out: Tensor


Denoiser = Callable[[Tensor, Tensor, Any], TrigFlowPrediction]
"""``(x_t [B, ...], t [B] TrigFlow time, cond) -> TrigFlowPrediction``."""
DenoiserJVP = Callable[[Tensor, Tensor, Any, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(x_t, t, cond, tx, tt) -> (F, dF)``: TrigFlow velocity and its JVP along ``(tx, tt)`` w.r.t. ``(x_t, t)``."""
VelocityFn = Callable[[Tensor, Tensor, Any], Tensor]
"""``(x_s, timestep [B] or [B, T] on Wan's 0..1000 scale, cond) -> v = eps - x0`` (e.g. ``WanDiT.forward``)."""
VelocityJVP = Callable[[Tensor, Tensor, Any, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(x_s, timestep, cond, tx_s, ttimestep) -> (v, dv)`` (the ``WanDiT.forward_jvp`` contract)."""


# ---------------------------------------------------------------------------------------------------------
# conversions (docs/losses.md, parameterization). All are elementwise and keep the input dtype.


def sigma_to_rf(sigma: Tensor) -> Tensor:
    """EDM ``sigma`` -> RF time ``s = sigma / (sigma + 1)``."""
    return sigma / (sigma + 1)


def rf_to_sigma(s: Tensor) -> Tensor:
    """RF time -> ``sigma = s / (1 - s)``, with ``s`` first clamped to ``[0, 1 - eps(dtype)]`` (finite result)."""
    s = s.clamp(0.0, 1.0 - torch.finfo(s.dtype).eps)
    return s / (1 - s)


def sigma_to_trig(sigma: Tensor) -> Tensor:
    """EDM ``sigma`` -> TrigFlow ``t = atan(sigma)``."""
    return torch.atan(sigma)


def trig_to_sigma(t: Tensor) -> Tensor:
    """TrigFlow ``t`` -> ``sigma = tan t``."""
    return torch.tan(t)


def rf_to_trig(s: Tensor) -> Tensor:
    """RF ``s`` -> TrigFlow ``t = atan(s / (1 - s))``, computed as ``atan2(s, 1 - s)`` so that ``s = 1`` maps
    to exactly ``pi / 2`` (the reference clamps ``s`` first; the two agree to rounding elsewhere)."""
    return torch.atan2(s, 1 - s)


def trig_to_rf(t: Tensor) -> Tensor:
    """TrigFlow ``t`` -> RF ``s = sin t / (sin t + cos t)``."""
    sin, cos = torch.sin(t), torch.cos(t)
    return sin / (sin + cos)


def shift_rf(u: Tensor, shift: float) -> Tensor:
    """Wan/SD3 time shift ``a u / (1 + (a - 1) u)``; identity for ``shift <= 0``."""
    if shift <= 0:
        return u
    return shift * u / (1 + (shift - 1) * u)


def unshift_rf(s: Tensor, shift: float) -> Tensor:
    """Inverse of :func:`shift_rf`: ``u = s / (a - (a - 1) s)``; identity for ``shift <= 0``."""
    if shift <= 0:
        return s
    return s / (shift - (shift - 1) * s)


def add_noise(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """TrigFlow forward process ``x_t = cos t x0 + sin t eps``; ``t`` as in the module docstring.

    Promotes to ``t``'s dtype (float64 times give a float64 ``x_t``, as in the reference).
    """
    tb = expand_time(t, x0)
    return torch.cos(tb) * x0 + torch.sin(tb) * eps


def cfg_denoise(denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Any, uncond: Any = None,
                guidance: float = 1.0) -> TrigFlowPrediction:
    """Classifier-free guidance ``u + w (c - u)`` applied to both ``x0`` and ``F`` (both are affine in the
    network output with the same coefficients, so this equals guiding the raw velocity).

    As in the reference (docs/losses.md, consistency), the unconditional call is skipped when ``uncond is None``
    or ``guidance <= 1`` and the conditional prediction is returned unchanged.
    """
    pc = denoiser(x_t, t, cond)
    if uncond is None or guidance <= 1:
        return pc
    pu = denoiser(x_t, t, uncond)
    return TrigFlowPrediction(x0=pu.x0 + guidance * (pc.x0 - pu.x0), F=pu.F + guidance * (pc.F - pu.F))


def expand_time(t: Tensor, x: Tensor) -> Tensor:
    """Reshape ``t`` (``[B]``, ``[B, 1]`` or ``[B, T]``) to broadcast against ``x`` (``[B, C, T, ...]``)."""
    if t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1):
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"time has batch {t.shape[0]} but the sample has batch {x.shape[0]}")
        return t.reshape(x.shape[0], *([1] * (x.ndim - 1)))
    if t.ndim == 2 and x.ndim == 5 and t.shape == (x.shape[0], x.shape[2]):
        return t[:, None, :, None, None]  # per-frame times [B, T] -> [B, 1, T, 1, 1]
    raise ValueError(f"time of shape {tuple(t.shape)} does not fit a sample of shape {tuple(x.shape)}; "
                     "expected [B], [B, 1] or (for [B, C, T, H, W] samples) [B, T]")


def _net_time(t: Tensor) -> Tensor:
    """Time as the network receives it: ``[B]`` for per-sample times, ``[B, T]`` for per-frame times."""
    return t[:, 0] if t.ndim == 2 and t.shape[1] == 1 else t


def round_timestep(timestep: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Round a Wan timestep through ``dtype`` (the reference feeds bf16: 933.78 -> 932, 987.65 -> 988,
    999.3 -> 1000) and return it in float64; ``dtype=None`` keeps it exact."""
    if dtype is None:
        return timestep.to(torch.float64)
    return timestep.to(dtype).to(torch.float64)


# ---------------------------------------------------------------------------------------------------------
# the RF -> TrigFlow wrapper (docs/losses.md, parameterization)


def trigflow_scalings(t: Tensor) -> TrigFlowScalings:
    """Scalings of the RF wrapper at TrigFlow time ``t`` (computed in float64; shape of ``t``)."""
    t = t.to(torch.float64)
    sin, cos = torch.sin(t), torch.cos(t)
    d = cos + sin
    return TrigFlowScalings(c_in=1 / d, c_noise=RF_TIMESTEP_SCALE * sin / d, c_skip=1 / d, c_out=-sin / d)


def trigflow_scalings_jvp(t: Tensor, dt: Tensor) -> tuple[TrigFlowScalings, TrigFlowScalings]:
    """Scalings and their directional derivatives ``(dc/dt) * dt`` (float64, closed form).

    With ``D = cos t + sin t``: ``d(1/D)/dt = (sin t - cos t) / D^2`` and ``d(sin t / D)/dt = 1 / D^2``, so
    ``dc_noise = 1000 dt / D^2`` (for the sCM tangent ``dt = cos t sin t`` this is the reference's
    ``1000 cos t sin t / D^2``) and ``dc_out = -dt / D^2``.
    """
    t, dt = t.to(torch.float64), dt.to(torch.float64)
    c = trigflow_scalings(t)
    sin, cos = torch.sin(t), torch.cos(t)
    inv_d2 = 1 / (cos + sin) ** 2
    dc_in = (sin - cos) * inv_d2 * dt
    dc = TrigFlowScalings(c_in=dc_in, c_noise=RF_TIMESTEP_SCALE * inv_d2 * dt, c_skip=dc_in, c_out=-inv_d2 * dt)
    return c, dc


def trigflow_denoise(
    velocity: VelocityFn,
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    *,
    input_dtype: torch.dtype | None = torch.bfloat16,
    timestep_dtype: torch.dtype | None = torch.bfloat16,
) -> TrigFlowPrediction:
    """Evaluate an RF velocity network as a TrigFlow denoiser (docs/losses.md, parameterization).

    Calls ``velocity((c_in x_t).to(input_dtype), round_timestep(1000 s, timestep_dtype), cond)`` with
    ``s = sin t / (sin t + cos t)``; the timestep is ``[B]`` float64 (``[B, T]`` for per-frame times).
    Returns float64 ``x0 = c_skip x_t + c_out v`` (= ``x_s - s v``) and ``F = (cos t x_t - x0) / sin t``.
    ``input_dtype=None`` passes ``c_in x_t`` in its own (float64) dtype; ``timestep_dtype=None`` disables
    the bf16 timestep rounding. Defaults reproduce the reference (bf16 input and timestep).
    """
    c = trigflow_scalings(t)
    tb = expand_time(t.to(torch.float64), x_t)
    c_in, c_skip, c_out = (expand_time(v, x_t) for v in (c.c_in, c.c_skip, c.c_out))
    x_in = x_t * c_in
    if input_dtype is not None:
        x_in = x_in.to(input_dtype)
    v = velocity(x_in, round_timestep(_net_time(c.c_noise), timestep_dtype), cond).to(torch.float64)
    x0 = c_skip * x_t + c_out * v
    return TrigFlowPrediction(x0=x0, F=(torch.cos(tb) * x_t - x0) / torch.sin(tb))


def trigflow_jvp(
    velocity_jvp: VelocityJVP,
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    tx: Tensor,
    tt: Tensor,
    *,
    input_dtype: torch.dtype | None = torch.bfloat16,
    timestep_dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[Tensor, Tensor]:
    """TrigFlow velocity ``F(x_t, t)`` and its JVP along ``(tx, tt)``, built from an RF network's JVP.

    ``velocity_jvp`` follows the ``WanDiT.forward_jvp(x, t, ctx, tx, tt) -> (out, tangent_out)`` contract
    (timestep on Wan's 0..1000 scale). The composition is docs/losses.md, consistency: scalings and their tangents in
    float64 (:func:`trigflow_scalings_jvp`); network input ``c_in x_t`` with tangent
    ``c_in tx + dc_in x_t`` and timestep ``c_noise`` with tangent ``dc_noise``, all cast/rounded to
    ``input_dtype`` / ``timestep_dtype`` (the reference feeds bf16 primals and tangents); then the output
    composition ``F = (cos t x_t - c_skip x_t - c_out v) / sin t`` differentiated exactly in float64.

    Shapes: ``tx`` like ``x_t``, ``tt`` like ``t``. Returns float64 ``(F, dF)``, both shaped like ``x_t``;
    ``dF`` is not part of any autograd graph when called under ``torch.no_grad()`` (as the sCM step does).
    """
    c, dc = trigflow_scalings_jvp(t, tt)
    tb, ttb = expand_time(t.to(torch.float64), x_t), expand_time(tt.to(torch.float64), x_t)
    e = lambda v: expand_time(v, x_t)
    x_in, tx_in = x_t * e(c.c_in), tx * e(c.c_in) + x_t * e(dc.c_in)
    if input_dtype is not None:
        x_in, tx_in = x_in.to(input_dtype), tx_in.to(input_dtype)
    ts, tts = (round_timestep(_net_time(v), timestep_dtype) for v in (c.c_noise, dc.c_noise))
    v, dv = velocity_jvp(x_in, ts, cond, tx_in, tts)
    v, dv = v.to(torch.float64), dv.to(torch.float64)
    x0 = e(c.c_skip) * x_t + e(c.c_out) * v
    dx0 = e(dc.c_skip) * x_t + e(c.c_skip) * tx + e(dc.c_out) * v + e(c.c_out) * dv
    sin, cos = torch.sin(tb), torch.cos(tb)
    F = (cos * x_t - x0) / sin
    dF = (cos * tx - sin * ttb * x_t - dx0 - cos * ttb * F) / sin
    return F, dF


def velocity_jvp_via_func(velocity: VelocityFn) -> VelocityJVP:
    """Wrap a plain velocity network into the ``forward_jvp`` contract with ``torch.func.jvp``.

    The fallback for networks without a hand-written JVP path: the JVP is taken w.r.t. ``(x, timestep)``
    with ``cond`` held fixed (zero tangent), parameters are not differentiated. The tangent output is
    detached.
    """

    def jvp(x: Tensor, timestep: Tensor, cond: Any, tx: Tensor, ttimestep: Tensor) -> tuple[Tensor, Tensor]:
        out, tout = torch.func.jvp(lambda x_, ts_: velocity(x_, ts_, cond), (x, timestep),
                                   (tx.to(x.dtype), ttimestep.to(timestep.dtype)))
        return out, tout.detach()

    return jvp


def denoiser_jvp_via_func(denoiser: Denoiser) -> DenoiserJVP:
    """JVP of any TrigFlow denoiser's ``F`` w.r.t. ``(x_t, t)`` via ``torch.func.jvp`` (generic fallback).

    Casts/roundings inside the denoiser pass tangents straight through (forward AD of ``.to``), so on a
    :class:`TrigFlowAdapter` this agrees with :func:`trigflow_jvp` up to the rounding of the tangents.
    """

    def jvp(x_t: Tensor, t: Tensor, cond: Any, tx: Tensor, tt: Tensor) -> tuple[Tensor, Tensor]:
        t64 = t.to(torch.float64)
        F, dF = torch.func.jvp(lambda x_, t_: denoiser(x_, t_, cond).F, (x_t, t64),
                               (tx.to(x_t.dtype), tt.to(torch.float64)))
        return F, dF.detach()

    return jvp


@dataclass(frozen=True)
class TrigFlowAdapter:
    """A rectified-flow velocity network seen as a TrigFlow denoiser (stateless; holds only callables).

    ``adapter(x_t, t, cond) -> TrigFlowPrediction(x0, F)`` (float64) is :func:`trigflow_denoise`;
    ``adapter.jvp(x_t, t, cond, tx, tt) -> (F, dF)`` is :func:`trigflow_jvp` with ``velocity_jvp`` (e.g.
    ``WanDiT.forward_jvp``), or the ``torch.func.jvp`` fallback :func:`velocity_jvp_via_func` when
    ``velocity_jvp`` is None. ``input_dtype`` / ``timestep_dtype``: see :func:`trigflow_denoise`
    (``None`` disables the cast / the bf16 timestep rounding).
    """

    velocity: VelocityFn
    velocity_jvp: VelocityJVP | None = None
    input_dtype: torch.dtype | None = torch.bfloat16
    timestep_dtype: torch.dtype | None = torch.bfloat16

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> TrigFlowPrediction:
        return trigflow_denoise(self.velocity, x_t, t, cond, input_dtype=self.input_dtype,
                                timestep_dtype=self.timestep_dtype)

    def jvp(self, x_t: Tensor, t: Tensor, cond: Any, tx: Tensor, tt: Tensor) -> tuple[Tensor, Tensor]:
        vjp = self.velocity_jvp if self.velocity_jvp is not None else velocity_jvp_via_func(self.velocity)
        return trigflow_jvp(vjp, x_t, t, cond, tx, tt, input_dtype=self.input_dtype,
                            timestep_dtype=self.timestep_dtype)

