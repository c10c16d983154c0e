"""Causal training objectives: teacher-forcing sCM / dCM, flow matching with per-frame times (teacher or
diffusion forcing), and the ODE-pair regression initialization (docs/causal_training.md).

Legend: B batch, C channels, T latent frames, H x W latent grid, K steps; times TrigFlow float64.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from rcm_losses.causal.blocks import FrameBlocks
from rcm_losses.causal.teacher_forcing import (
    _generated,
    _per_frame,
    teacher_forcing_adapter,
)
from rcm_losses.consistency import dcm_objective, scm_objective
from rcm_losses.parameterization import (
    RF_TIMESTEP_SCALE,
    Denoiser,
    VelocityFn,
    VelocityJVP,
    expand_time,
    round_timestep,
    trig_to_rf,
)

_F64 = torch.float64


def tf_scm_objective(
    student_packed: VelocityFn,
    teacher_packed: VelocityFn,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    cond: Any,
    uncond: Any = None,
    *,
    student_packed_jvp: VelocityJVP | None = None,
    student_context_time: float | Tensor = 0.0,
    context_eps: Tensor | None = None,
    given_frames: int = 0,
    guidance: float = 3.0,
    r: float = 1.0,
    loss_scale: float = 100.0,
    input_dtype: torch.dtype | None = torch.bfloat16,
    timestep_dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Teacher-forcing sCM (docs/causal_training.md ``tf_scm``): :func:`rcm_losses.scm_objective` on the generated
    frames, with per-block times ``t`` ``[B, T]`` (or ``[B]``), the causal teacher (CFG) on the clean context
    and the student on its (clean or noisy) context. The JVP tangent of the context is zero in ``x`` and
    ``t``; since noisy block i sees only context blocks < i and itself, the joint JVP gives every block its
    own ``cos t_i sin t_i dF_i/dt_i``. ``x0``, ``eps`` ``[B, C, T, H, W]`` cover the whole video (given frames
    included; their entries are ignored). Returns ``(loss [B], diag)``.
    """
    kw = dict(given_frames=given_frames, input_dtype=input_dtype, timestep_dtype=timestep_dtype)
    student = teacher_forcing_adapter(
        student_packed,
        x0,
        context_time=student_context_time,
        context_eps=context_eps,
        packed_jvp=student_packed_jvp,
        **kw,
    )
    teacher = teacher_forcing_adapter(teacher_packed, x0, **kw)
    x0_g, t_g = _generated(x0, t, given_frames)
    return scm_objective(
        student,
        student.jvp,
        teacher,
        x0_g,
        eps[:, :, given_frames:],
        t_g,
        cond,
        uncond,
        guidance=guidance,
        r=r,
        loss_scale=loss_scale,
    )


def causal_dcm_objective(
    student: Denoiser,
    teacher: Denoiser,
    x0: Tensor,
    eps: Tensor,
    times: Tensor,
    cond: Any,
    uncond: Any = None,
    *,
    guidance: float = 3.0,
    loss_scale: float = 100.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """dCM (docs/losses.md, consistency) with per-frame times ``times`` ``[K + 1, B, T]`` (or ``[K + 1, B]``):
    :func:`rcm_losses.consistency.dcm_objective` with Causal-rCM's default ``guidance = 3``.

    With grad ``x0_hat = student(x_{t_0}, t_0).x0``; no grad: ``K`` CFG teacher Euler steps
    ``x <- x - (t_k - t_{k+1}) F_T`` (frame-wise step sizes) and the target ``student(x_K, t_K).x0`` (same
    online student, stop-grad); ``loss = loss_scale * sum((x0_hat - target)^2)`` per sample, float64.
    """
    return dcm_objective(student, teacher, x0, eps, times, cond, uncond, guidance=guidance, loss_scale=loss_scale)


def tf_dcm_objective(
    student_packed: VelocityFn,
    teacher_packed: VelocityFn,
    x0: Tensor,
    eps: Tensor,
    times: Tensor,
    cond: Any,
    uncond: Any = None,
    *,
    student_context_time: float | Tensor = 0.0,
    context_eps: Tensor | None = None,
    given_frames: int = 0,
    guidance: float = 3.0,
    loss_scale: float = 100.0,
    input_dtype: torch.dtype | None = torch.bfloat16,
    timestep_dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Teacher-forcing dCM (docs/causal_training.md ``tf_dcm``): :func:`causal_dcm_objective` on the generated frames
    with per-block grids ``times`` ``[K + 1, B, T]`` (:func:`sample_block_dcm_times`); the causal teacher runs
    on the clean context, the student on its (clean or noisy) context. ``x0``, ``eps`` as in
    :func:`tf_scm_objective`."""
    kw = dict(given_frames=given_frames, input_dtype=input_dtype, timestep_dtype=timestep_dtype)
    student = teacher_forcing_adapter(
        student_packed, x0, context_time=student_context_time, context_eps=context_eps, **kw
    )
    teacher = teacher_forcing_adapter(teacher_packed, x0, **kw)
    if times.ndim == 3 and times.shape[2] == x0.shape[2]:
        times = times[:, :, given_frames:]
    return causal_dcm_objective(
        student,
        teacher,
        x0[:, :, given_frames:],
        eps[:, :, given_frames:],
        times,
        cond,
        uncond,
        guidance=guidance,
        loss_scale=loss_scale,
    )


def flow_matching_objective(
    velocity: VelocityFn,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    cond: Any,
    *,
    weighting: Literal["none", "bell"] = "none",
    loss_scale: float = 100.0,
    input_dtype: torch.dtype | None = torch.bfloat16,
    timestep_dtype: torch.dtype | None = torch.bfloat16,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow matching of a (causal) velocity network with per-frame times (docs/causal_training.md ``tf`` / ``df``).

    ``t`` TrigFlow ``[B, T]`` (or ``[B]``) -> RF ``s``; ``x_s = (1 - s) x0 + s eps`` enters
    ``velocity(x_s, round(1000 s), cond)``; target ``eps - x0``. Per sample
    ``loss_scale * sum_frames w(s_f) mean_{C,H,W} (v - (eps - x0))^2`` with ``w = 1`` (``none``, diffusion
    forcing) or the Gaussian bell ``w(s) = exp(-2 (s - 1/2)^2) - exp(-1/2)`` (``bell``, teacher forcing).
    Frames at ``t = 0`` (clean context inside the sequence, e.g. a given I2V frame) carry no loss: their
    velocity target is not identifiable from ``x_s = x0``.
    ``velocity`` is the network with a block-causal mask (``df``) or a :class:`TeacherForcingVelocity` with
    a clean context (``tf``).
    """
    t = _per_frame(t.to(_F64), x0.shape[2])
    s = trig_to_rf(t)  # [B, T]
    x0, eps = x0.to(_F64), eps.to(_F64)
    x_s = x0 + expand_time(s, x0) * (eps - x0)
    x_in = x_s if input_dtype is None else x_s.to(input_dtype)
    v = velocity(x_in, round_timestep(RF_TIMESTEP_SCALE * s, timestep_dtype), cond).to(_F64)
    per_frame = (v - (eps - x0)).pow(2).mean(dim=(1, 3, 4))  # [B, T]
    if weighting == "bell":
        w = torch.exp(-2 * (s - 0.5) ** 2) - math.exp(-0.5)
    elif weighting == "none":
        w = torch.ones_like(s)
    else:
        raise ValueError(f"flow-matching weighting must be 'none' or 'bell', got {weighting!r}")
    loss = loss_scale * (torch.where(s > 0, w, 0.0) * per_frame).sum(1)
    return loss, {"t": t.detach(), "loss": loss.detach()}


def ode_regression_objective(
    student: Denoiser,
    trajectory: Tensor,
    times: Tensor,
    cond: Any,
    blocks: FrameBlocks,
    *,
    generator: torch.Generator,
    loss_scale: float = 1.0,
    include_clean: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ODE-pair initialization (docs/causal_training.md): regress the causal student's ``x0`` onto the endpoint of a
    teacher ODE trajectory, each block at its own random trajectory state.

    ``trajectory`` ``[K + 1, B, C, T, H, W]``: TrigFlow samples at ``times`` ``[K + 1, B]`` (decreasing,
    ``times[-1] = 0`` so ``trajectory[-1]`` is the target). Per sample and block an index in ``[0, K]``
    (``[0, K - 1]`` without ``include_clean``) is drawn from ``generator``; ``student`` (the causal network
    with a block-causal mask over the whole video, a :data:`Denoiser` taking per-frame times) sees the mixed
    video; ``loss = loss_scale * sum over frames with t > 0 of (x0_hat - x_end)^2``.
    """
    k1 = trajectory.shape[0]
    if k1 < 2 or times.shape != trajectory.shape[:2] or trajectory.ndim != 6:
        raise ValueError(
            f"trajectory must be [K+1 >= 2, B, C, T, H, W] with times [K+1, B], got "
            f"{tuple(trajectory.shape)} and {tuple(times.shape)}"
        )
    if bool((times[-1] != 0).any()):
        raise ValueError("the last trajectory time must be 0 (the ODE endpoint is the regression target)")
    b, n = trajectory.shape[1], blocks.num_blocks
    high = k1 if include_clean else k1 - 1
    idx = blocks.expand(
        torch.randint(high, (b, n), generator=generator, device=generator.device).to(trajectory.device)
    )  # [B, T]
    x_t = torch.gather(trajectory, 0, idx[None, :, None, :, None, None].expand(1, b, *trajectory.shape[2:]))[
        0
    ]
    t = times.to(_F64).T.gather(1, idx)  # [B, T]
    x0_hat = student(x_t, t, cond).x0.to(_F64)
    noisy = expand_time(t > 0, x0_hat)
    diff = torch.where(noisy, x0_hat - trajectory[-1].to(_F64), torch.zeros_like(x0_hat))
    loss = loss_scale * diff.pow(2).flatten(1).sum(1)
    return loss, {"t": t.detach(), "loss": loss.detach()}
