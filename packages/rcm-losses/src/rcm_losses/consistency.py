"""Consistency-model student objectives: sCM (continuous time, JVP based; docs/losses.md, consistency) and dCM.

The sCM step, as a training loop runs it (each stage is also a public function)::

    t = LogNormal(0.7, 1.6)(B, generator=g)                   # [B] float64
    x_t = add_noise(x0, eps, t)                               # float64
    with torch.no_grad():
        F_T = cfg_denoise(teacher, x_t, t, cond, uncond, 5.0).F   # teacher PF-ODE velocity
        t_F = scm_student_tangent(student.jvp, x_t, t, cond, F_T)  # cos t sin t dF_theta/dt
    F_theta = student(x_t, t, cond).F                         # with grad
    loss, diag = scm_loss(F_theta, F_T, t_F, x_t, t, r=tangent_warmup_ratio(it, W))
    loss.sum().backward()                                     # sum over the batch, no mean

or all at once with :func:`scm_objective`. ``student.jvp`` is any :data:`DenoiserJVP`, e.g.
``TrigFlowAdapter(net, net.forward_jvp).jvp`` or ``denoiser_jvp_via_func(student)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rcm_losses.parameterization import (
    Denoiser,
    DenoiserJVP,
    add_noise,
    cfg_denoise,
    denoiser_jvp_via_func,
    expand_time,
)

__all__ = [
    "tangent_warmup_ratio",
    "scm_tangent",
    "scm_student_tangent",
    "scm_g",
    "scm_loss",
    "scm_objective",
    "dcm_objective",
]


def _sum_per_sample(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def _nan_per_sample(x: Tensor) -> Tensor:
    return torch.isnan(x).flatten(1).any(1)


def tangent_warmup_ratio(iteration: int, warmup: int) -> float:
    """``r = 1`` if ``warmup == 0`` else ``min(1, iteration / warmup)`` (raw trainer iteration)."""
    if warmup < 0 or iteration < 0:
        raise ValueError(f"iteration and tangent warmup must be >= 0, got {iteration} and {warmup}")
    return 1.0 if warmup == 0 else min(1.0, iteration / warmup)


def scm_tangent(F_teacher: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The scaled JVP tangent ``(cos t sin t F_T, cos t sin t)`` for ``(x_t, t)``, float64.

    ``F_teacher`` ``[B, ...]``, ``t`` ``[B]``; returns ``tx`` shaped like ``F_teacher`` and ``tt`` like ``t``.
    """
    t = t.to(torch.float64)
    cs = torch.cos(t) * torch.sin(t)
    return expand_time(cs, F_teacher) * F_teacher, cs


def scm_student_tangent(
    student_jvp: DenoiserJVP,
    x_t: Tensor,
    t: Tensor,
    cond: Any,
    F_teacher: Tensor,
    *,
    fd_type: int = 0,
    fd_size: float = 1e-4,
    student: Denoiser | None = None,
) -> Tensor:
    """``t_F ~= cos t sin t dF_theta/dt`` along the teacher ODE; call it under ``torch.no_grad()``.

    * ``fd_type=0`` (default): ``student_jvp(x_t, t, cond, *scm_tangent(F_T, t))[1]``.
    * ``fd_type=1`` (semi-continuous): JVP with zero time tangent, plus
      ``cos t sin t (cos h F(x_t, t) - F(x_t, t - h)) / sin h`` (``F(x_t, t)`` is the JVP primal).
    * ``fd_type=2`` (discrete): ``x' = cos h x_t - sin h F_T`` and
      ``cos t sin t (cos h F(x_t, t) - F(x', t - h)) / sin h``; needs no JVP.

    ``h = fd_size``; ``student`` (a denoiser) is required for ``fd_type`` 1 and 2. Returns float64 ``[B, ...]``.
    """
    tx, tt = scm_tangent(F_teacher, t)
    if fd_type == 0:
        return student_jvp(x_t, t, cond, tx, tt)[1].to(torch.float64)
    if fd_type not in (1, 2):
        raise ValueError(f"fd_type must be 0 (JVP), 1 (semi-continuous) or 2 (discrete), got {fd_type}")
    if student is None:
        raise ValueError(f"fd_type={fd_type} needs the student denoiser (argument student=)")
    if not fd_size > 0:
        raise ValueError(f"fd_size must be > 0, got {fd_size}")
    t64 = t.to(torch.float64)
    cs, h = expand_time(tt, x_t), torch.tensor(fd_size, dtype=torch.float64)
    if fd_type == 1:
        F_now, t_F = student_jvp(x_t, t, cond, tx, torch.zeros_like(tt))
        F_prev = student(x_t, t64 - fd_size, cond).F
        return t_F.to(torch.float64) + cs * (torch.cos(h) * F_now.to(torch.float64) - F_prev) / torch.sin(h)
    F_now = student(x_t, t64, cond).F
    x_prev = torch.cos(h) * x_t - torch.sin(h) * F_teacher
    F_prev = student(x_prev, t64 - fd_size, cond).F
    return cs * (torch.cos(h) * F_now - F_prev) / torch.sin(h)


def scm_g(F_sg: Tensor, F_teacher: Tensor, t_F: Tensor, x_t: Tensor, t: Tensor, r: float = 1.0) -> Tensor:
    """The raw sCM direction ``g`` (float64, before NaN masking and normalization)::

        g = -cos t sqrt(1 - r^2 sin^2 t) (F_sg - F_T) - (r cos t sin t x_t + t_F)

    At ``r = 1`` this is ``cos t df/dt`` for the consistency function ``f = cos t x_t - sin t F_theta``
    along the teacher ODE; the warmup ratio ``r`` scales only the ``x_t`` term and the first coefficient.
    """
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"tangent warmup ratio r must lie in [0, 1], got {r}")
    tb = expand_time(t.to(torch.float64), x_t)
    sin, cos = torch.sin(tb), torch.cos(tb)
    d = F_sg.to(torch.float64) - F_teacher.to(torch.float64)
    return -cos * torch.sqrt(1 - r**2 * sin**2) * d - (r * cos * sin * x_t.to(torch.float64) + t_F)


def scm_loss(
    F_student: Tensor,
    F_teacher: Tensor,
    t_F: Tensor,
    x_t: Tensor,
    t: Tensor,
    *,
    r: float = 1.0,
    loss_scale: float = 100.0,
    norm_eps: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """sCM student loss per sample, float64.

    ``F_student`` ``[B, ...]`` carries the gradient; ``F_teacher`` (CFG teacher velocity), ``t_F``
    (:func:`scm_student_tangent`), ``x_t`` and ``t`` ``[B]`` are constants. Steps: ``g`` from :func:`scm_g`
    with ``F_sg = F_student.detach()``; samples with a NaN in ``g`` or in ``F_student`` get ``g = F = F_sg = 0``
    (no gradient); ``g <- g / (||g||_2 + norm_eps)`` per sample over all non-batch elements;
    ``loss = loss_scale * sum((F - F_sg - g)^2)``. The gradient w.r.t. ``F_student`` is
    ``-2 loss_scale g``. Returns ``(loss [B], diag)`` with detached ``t``, ``nan`` (bool), ``g_norm``
    (norm of the raw ``g``) and ``loss``.
    """
    F = F_student.to(torch.float64)
    F_sg = F.detach()
    g = scm_g(F_sg, F_teacher, t_F, x_t, t, r)
    nan = _nan_per_sample(g) | _nan_per_sample(F_sg)
    keep = expand_time(~nan, g)
    g, F, F_sg = (torch.where(keep, v, torch.zeros_like(v)) for v in (g, F, F_sg))
    g_norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    g = g / (expand_time(g_norm, g) + norm_eps)
    loss = loss_scale * _sum_per_sample((F - F_sg - g) ** 2)
    diag = {"t": t.detach(), "nan": nan, "g_norm": g_norm, "loss": loss.detach()}
    return loss, diag


def scm_objective(
    student: Denoiser,
    student_jvp: DenoiserJVP | None,
    teacher: Denoiser,
    x0: Tensor,
    eps: Tensor,
    t: Tensor,
    cond: Any,
    uncond: Any = None,
    *,
    guidance: float = 5.0,
    r: float = 1.0,
    loss_scale: float = 100.0,
    fd_type: int = 0,
    fd_size: float = 1e-4,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One sCM student objective: teacher CFG velocity and student tangent without grad, then the
    student forward with grad, then :func:`scm_loss`. ``x0``, ``eps`` ``[B, ...]``, ``t`` ``[B]``
    (from ``LogNormal``). ``student_jvp=None`` uses ``student.jvp`` (a :class:`TrigFlowAdapter`) if present,
    else the ``torch.func.jvp`` fallback. Returns ``(loss [B], diag)``; ``loss.sum()`` is what the reference
    backpropagates.
    """
    if student_jvp is None:
        student_jvp = getattr(student, "jvp", None) or denoiser_jvp_via_func(student)
    x_t = add_noise(x0, eps, t.to(torch.float64))
    with torch.no_grad():
        F_T = cfg_denoise(teacher, x_t, t, cond, uncond, guidance).F
        t_F = scm_student_tangent(student_jvp, x_t, t, cond, F_T, fd_type=fd_type, fd_size=fd_size,
                                  student=student)
    F_theta = student(x_t, t, cond).F
    return scm_loss(F_theta, F_T, t_F, x_t, t, r=r, loss_scale=loss_scale)


def dcm_objective(
    student: Denoiser,
    teacher: Denoiser,
    x0: Tensor,
    eps: Tensor,
    times: Tensor,
    cond: Any,
    uncond: Any = None,
    *,
    guidance: float = 5.0,
    loss_scale: float = 100.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Discrete-time CM objective. ``times`` ``[K+1, B]`` from :func:`rcm_losses.timesteps.dcm_times`,
    or per-frame ``[K+1, B, T]`` for ``[B, C, T, H, W]`` samples (causal students, frame-wise step sizes).

    Prediction with grad ``x0_hat = student(x_{t_0}, t_0).x0``; no grad: ``K`` TrigFlow-Euler teacher steps
    with CFG ``x_{k+1} = x_k - (t_k - t_{k+1}) F_T(x_k, t_k)`` and the target ``student(x_K, t_K).x0`` (same
    online student, stop-grad). Loss ``loss_scale * sum((x0_hat - target)^2)`` per sample, float64, no NaN
    masking (the reference has none here; ``diag['nan']`` reports it).
    """
    if times.ndim not in (2, 3) or times.shape[0] < 2 or times.shape[1] != x0.shape[0]:
        raise ValueError(f"dCM times must be [K+1 >= 2, B={x0.shape[0]}(, T)], got {tuple(times.shape)}")
    times = times.to(torch.float64)
    x = add_noise(x0, eps, times[0])
    x0_hat = student(x, times[0], cond).x0
    with torch.no_grad():
        for k in range(times.shape[0] - 1):
            F_T = cfg_denoise(teacher, x, times[k], cond, uncond, guidance).F
            x = x - expand_time(times[k] - times[k + 1], x) * F_T
        target = student(x, times[-1], cond).x0
    loss = loss_scale * _sum_per_sample((x0_hat.to(torch.float64) - target) ** 2)
    return loss, {"t": times[0], "nan": torch.isnan(loss), "loss": loss.detach()}
