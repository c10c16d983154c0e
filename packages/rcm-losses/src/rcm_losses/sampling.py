"""Samplers: the rCM few-step sampler (docs/losses.md, sampling) and the teacher flow samplers Euler and UniPC.

All samplers take the initial noise as an argument, compute in float64 and return the final ``x0``
(float64, shape of the noise). ``callback``, if given, is called after every step with a dict
``{"step", "num_steps", "t" or "s", "x" (state after the step), "x0" (current clean estimate)}``.

* :func:`rcm_sample` uses a TrigFlow denoiser (e.g. a :class:`TrigFlowAdapter` around the distilled student).
* :func:`flow_euler_sample` / :func:`flow_unipc_sample` use an RF velocity network
  ``(x_s, timestep = 1000 s [B], cond) -> v`` (``WanDiT.forward``) with classifier-free guidance, the Wan
  time shift and ``sigma_max``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rcm_losses.parameterization import (
    RF_TIMESTEP_SCALE,
    Denoiser,
    VelocityFn,
    add_noise,
    round_timestep,
    shift_rf,
    unshift_rf,
)
from rcm_losses.schedules import check_schedule

__all__ = [
    "DEFAULT_MID_T",
    "rcm_sample_times",
    "rcm_sample",
    "flow_sigmas",
    "flow_euler_sample",
    "flow_unipc_sample",
]

DEFAULT_MID_T = (1.5, 1.4, 1.0)
"""Intermediate TrigFlow times of the rCM sampler (= the recipe's ``backward_timesteps``)."""

Callback = Callable[[dict[str, Any]], None]


def _sigma_max_to_rf(sigma_max: float | None) -> float:
    if sigma_max is None or math.isinf(sigma_max):
        return 1.0
    if not sigma_max > 0:
        raise ValueError(f"sigma_max must be > 0 (or None for pure noise), got {sigma_max}")
    return sigma_max / (sigma_max + 1)


def rcm_sample_times(num_steps: int, *, sigma_max: float | None = 80.0,
                     mid_t: Sequence[float] = DEFAULT_MID_T) -> list[float]:
    """TrigFlow schedule ``[atan(sigma_max), *mid_t[:num_steps - 1], 0]`` (``sigma_max=None`` -> ``pi/2``).

    Raises unless the schedule is strictly decreasing and ``mid_t`` has ``num_steps - 1`` entries.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if len(mid_t) < num_steps - 1:
        raise ValueError(f"{num_steps} steps need {num_steps - 1} intermediate times, got mid_t={list(mid_t)}")
    _sigma_max_to_rf(sigma_max)  # validates
    t0 = math.pi / 2 if sigma_max is None or math.isinf(sigma_max) else math.atan(sigma_max)
    return check_schedule([t0, *mid_t[: num_steps - 1], 0.0], low=0.0, high=math.pi / 2, include_low=True,
                          what="rCM schedule (check sigma_max and mid_t)")


def rcm_sample(
    denoiser: Denoiser,
    noise: Tensor,
    cond: Any,
    *,
    generator: torch.Generator,
    num_steps: int = 4,
    sigma_max: float | None = 80.0,
    mid_t: Sequence[float] = DEFAULT_MID_T,
    callback: Callback | None = None,
) -> Tensor:
    """rCM few-step sampling (no CFG: guidance is distilled). Runs under ``torch.no_grad()``.

    Starts at ``t_0 = atan(sigma_max)`` from ``x = sin t_0 noise`` (the TrigFlow form of the reference's RF
    start ``x_s = s_0 noise``); each step ``x0 = denoiser(x, t_i, cond).x0`` then, unless ``t_{i+1} = 0``,
    ``x = cos t_{i+1} x0 + sin t_{i+1} eps`` with fresh float32 ``eps`` from ``generator``.
    ``noise`` ``[B, ...]``; returns ``x0`` float64.
    """
    times = rcm_sample_times(num_steps, sigma_max=sigma_max, mid_t=mid_t)
    b = noise.shape[0]
    with torch.no_grad():
        x = math.sin(times[0]) * noise.to(torch.float64)
        for i in range(num_steps):
            t = torch.full((b,), times[i], dtype=torch.float64, device=noise.device)
            x0 = denoiser(x, t, cond).x0.to(torch.float64)
            if times[i + 1] > 0:
                eps = torch.randn(noise.shape, generator=generator, device=generator.device,
                                  dtype=torch.float32).to(noise.device)
                x = add_noise(x0, eps, torch.full_like(t, times[i + 1]))
            else:
                x = x0
            if callback is not None:
                callback({"step": i, "num_steps": num_steps, "t": times[i], "x": x, "x0": x0})
    return x0


# ---------------------------------------------------------------------------------------------------------
# teacher flow samplers


def flow_sigmas(num_steps: int, *, shift: float = 5.0, sigma_max: float | None = 5000.0) -> Tensor:
    """RF times ``[num_steps + 1]`` (float64, decreasing, last = 0) of the teacher samplers.

    ``s_max = sigma_max / (sigma_max + 1)`` (``None`` -> 1), unshifted ``u_max = unshift(s_max; shift)``,
    ``u = linspace(u_max, 0, N + 1)[:-1]``, ``s_i = shift(u_i; shift)``, then a final 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s_max = torch.tensor(_sigma_max_to_rf(sigma_max), dtype=torch.float64)
    u_max = unshift_rf(s_max, shift)
    u = torch.linspace(float(u_max), 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_rf(u, shift), torch.zeros(1, dtype=torch.float64)])


def _flow_velocity(velocity: VelocityFn, x: Tensor, s: float, cond: Any, uncond: Any, guidance: float,
                   input_dtype: torch.dtype | None, timestep_dtype: torch.dtype | None) -> Tensor:
    """CFG velocity ``v_u + w (v_c - v_u)`` in float64 (unconditional call skipped if ``uncond is None``
    or ``w <= 1``)."""
    timestep = round_timestep(torch.full((x.shape[0],), RF_TIMESTEP_SCALE * s, dtype=torch.float64,
                                         device=x.device), timestep_dtype)
    x_in = x if input_dtype is None else x.to(input_dtype)
    v = velocity(x_in, timestep, cond).to(torch.float64)
    if uncond is None or guidance <= 1:
        return v
    v_u = velocity(x_in, timestep, uncond).to(torch.float64)
    return v_u + guidance * (v - v_u)


def flow_euler_sample(
    velocity: VelocityFn,
    noise: Tensor,
    cond: Any,
    uncond: Any = None,
    *,
    guidance: float = 5.0,
    num_steps: int = 50,
    shift: float = 5.0,
    sigma_max: float | None = 5000.0,
    input_dtype: torch.dtype | None = torch.bfloat16,
    timestep_dtype: torch.dtype | None = torch.bfloat16,
    callback: Callback | None = None,
) -> Tensor:
    """Flow Euler sampler: ``x <- x + v (s_{i+1} - s_i)`` on :func:`flow_sigmas`, from
    ``x = s_0 noise``. Velocity with CFG (``guidance``, ``uncond``); the network sees ``x`` cast to
    ``input_dtype`` and the timestep ``1000 s`` rounded through ``timestep_dtype`` (``None``: no cast /
    no rounding). Runs under ``torch.no_grad()``; returns float64 ``[B, ...]``.
    """
    sig = flow_sigmas(num_steps, shift=shift, sigma_max=sigma_max).tolist()
    with torch.no_grad():
        x = sig[0] * noise.to(torch.float64)
        for i in range(num_steps):
            v = _flow_velocity(velocity, x, sig[i], cond, uncond, guidance, input_dtype, timestep_dtype)
            x0 = x - sig[i] * v
            x = x + (sig[i + 1] - sig[i]) * v
            if callback is not None:
                callback({"step": i, "num_steps": num_steps, "s": sig[i], "x": x, "x0": x0})
    return x


def _lambda(s: float) -> float:
    """Half log-SNR ``log(alpha / sigma)`` of the RF schedule (``alpha = 1 - s``), with the limits +-inf."""
    if s <= 0:
        return math.inf
    if s >= 1:
        return -math.inf
    return math.log1p(-s) - math.log(s)


def _unipc_b(h: float, order: int) -> list[float]:
    """Right-hand side ``b_k = k! phi_{k+1}(h) / B(h)`` (k = 0..order-1) of the UniPC order conditions, with
    ``B(h) = expm1(-h)`` ("bh2"). ``phi`` are the exponential-integrator functions of ``hh = -h``."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    out, fact = [], 1.0
    for k in range(1, order + 1):
        out.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return out


def flow_unipc_sample(
    velocity: VelocityFn,
    noise: Tensor,
    cond: Any,
    uncond: Any = None,
    *,
    guidance: float = 5.0,
    num_steps: int = 50,
    shift: float = 5.0,
    sigma_max: float = 5000.0,
    input_dtype: torch.dtype | None = torch.bfloat16,
    timestep_dtype: torch.dtype | None = torch.bfloat16,
    callback: Callback | None = None,
) -> Tensor:
    """UniPC multistep flow sampler: data prediction ``x0 = x - s v``, solver order 2 with the
    "bh2" ``B(h) = expm1(-h)``, predictor coefficient 0.5 at order 2, UniC corrector from the second step
    (re-using the model output of the new point, no extra evaluation) and lower-order final steps; in
    the RF schedule ``alpha = 1 - s``, ``sigma = s``, ``lambda = log(alpha / sigma)``.

    Same arguments as :func:`flow_euler_sample`; ``sigma_max`` must be finite (``lambda(1) = -inf``).
    """
    if sigma_max is None or math.isinf(sigma_max):
        raise ValueError("flow_unipc_sample needs a finite sigma_max (log-SNR is -inf at s = 1)")
    sig = flow_sigmas(num_steps, shift=shift, sigma_max=sigma_max).tolist()
    lam = [_lambda(s) for s in sig]
    with torch.no_grad():
        x = sig[0] * noise.to(torch.float64)
        ms: list[Tensor] = []  # data predictions at sig[0..i]
        x_last, order_last = x, 0
        for i in range(num_steps):
            v = _flow_velocity(velocity, x, sig[i], cond, uncond, guidance, input_dtype, timestep_dtype)
            m = x - sig[i] * v
            if i > 0:  # UniC: correct the sample at sig[i] with the new model output
                x = _unic(x_last, ms, m, sig, lam, i, order_last)
            ms.append(m)
            order = min(2, i + 1, num_steps - i)  # warm-up and lower_order_final
            x_last, order_last = x, order
            x = _unip(x, ms, sig, lam, i, order)
            if callback is not None:
                callback({"step": i, "num_steps": num_steps, "s": sig[i], "x": x, "x0": m})
            if len(ms) > 2:
                ms.pop(0)
    return x


def _unip(x: Tensor, ms: list[Tensor], sig: list[float], lam: list[float], i: int, order: int) -> Tensor:
    """UniP predictor from ``sig[i]`` to ``sig[i + 1]`` (order 1 or 2)."""
    s0, t = sig[i], sig[i + 1]
    m0 = ms[-1]
    if t == 0:  # lambda_t = inf: the exponential integrator lands on the data prediction
        return m0.clone()
    h = lam[i + 1] - lam[i]
    h_phi_1 = math.expm1(-h)
    x_t = (t / s0) * x - (1 - t) * h_phi_1 * m0
    if order == 2:
        r1 = (lam[i - 1] - lam[i]) / h
        d1 = (ms[-2] - m0) / r1
        x_t = x_t - (1 - t) * math.expm1(-h) * 0.5 * d1
    return x_t


def _unic(x_last: Tensor, ms: list[Tensor], m_t: Tensor, sig: list[float], lam: list[float], i: int,
          order: int) -> Tensor:
    """UniC corrector of the step ``sig[i-1] -> sig[i]`` of order ``order`` (1 or 2), using the model output
    ``m_t`` at ``sig[i]`` and the previous data predictions ``ms`` (``ms[-1]`` at ``sig[i-1]``)."""
    s0, t = sig[i - 1], sig[i]
    m0 = ms[-1]
    h = lam[i] - lam[i - 1]
    b_h = math.expm1(-h)
    x_t = (t / s0) * x_last - (1 - t) * b_h * m0
    d1_t = m_t - m0
    if order == 1:
        return x_t - (1 - t) * b_h * 0.5 * d1_t
    r1 = (lam[i - 2] - lam[i - 1]) / h
    d1 = (ms[-2] - m0) / r1
    b1, b2 = _unipc_b(h, 2)
    # solve [[1, 1], [r1, 1]] @ [rho_1, rho_t] = [b1, b2]
    rho_1 = (b1 - b2) / (1 - r1)
    rho_t = b1 - rho_1
    return x_t - (1 - t) * b_h * (rho_1 * d1 + rho_t * d1_t)
