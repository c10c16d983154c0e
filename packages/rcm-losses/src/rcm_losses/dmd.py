"""Distribution-matching objectives: the DMD generator loss (docs/losses.md, dmd) and the fake-score critic.

Generator step, as a training loop runs it::

    G = backward_simulation(student, cond, shape, n_steps=n, generator=g, time_sampler=p_D).x0  # grad via last call
    loss, diag = dmd_objective(G, p_D(B, generator=g), eps, fake_score, teacher, cond, uncond)
    loss.sum().backward()

Critic step: ``fake_score_objective(G_no_grad, t_D, eps, fake_score, cond)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rcm_losses.parameterization import Denoiser, add_noise, cfg_denoise, expand_time

__all__ = ["dmd_loss", "dmd_objective", "fake_score_loss", "fake_score_objective"]


def dmd_loss(
    generated: Tensor,
    x0_fake: Tensor,
    x0_real: Tensor,
    *,
    loss_scale: float = 1.0,
    min_norm: float = 1e-5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DMD generator loss per sample, float64.

    ``generated`` ``G [B, ...]`` carries the gradient; ``x0_fake`` (fake score, no CFG) and ``x0_real``
    (teacher with CFG) are constants. ``w_n = mean |G - x0_real|`` per sample, clipped below at
    ``min_norm``; ``grad = (x0_fake - x0_real) / w_n``; ``loss = loss_scale * sum((G - sg(G - grad))^2)``,
    whose gradient w.r.t. ``G`` is ``2 loss_scale grad``. A sample with a NaN anywhere (in ``G`` or the
    gradient) contributes 0 and no gradient. Returns ``(loss [B], diag)`` with ``nan``, ``w_n`` and
    ``grad_norm`` (L2 norm of ``grad``).
    """
    G = generated.to(torch.float64)
    with torch.no_grad():
        x0_fake, x0_real = x0_fake.to(torch.float64), x0_real.to(torch.float64)
        w_n = (G - x0_real).abs().flatten(1).mean(1).clamp_min(min_norm)
        grad = (x0_fake - x0_real) / expand_time(w_n, G)
        target = G - grad
    diff = G - target
    nan = torch.isnan(diff).flatten(1).any(1)
    # mask before squaring: where() after a NaN-producing op would still send 0 * NaN = NaN gradients
    diff = torch.where(expand_time(~nan, diff), diff, torch.zeros_like(diff))
    loss = loss_scale * diff.pow(2).flatten(1).sum(1)
    grad_norm = torch.linalg.vector_norm(grad.flatten(1), dim=1)
    return loss, {"nan": nan, "w_n": w_n, "grad_norm": grad_norm, "loss": loss.detach()}


def dmd_objective(
    generated: Tensor,
    t: Tensor,
    eps: Tensor,
    fake_score: Denoiser,
    teacher: Denoiser,
    cond: Any,
    uncond: Any = None,
    *,
    guidance: float = 5.0,
    loss_scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DMD generator objective: re-noise ``G`` at ``t`` ``[B]`` (``x_D = cos t G + sin t eps``,
    differentiable through ``G``), denoise without grad with the fake score (conditional only) and the
    CFG teacher ("real score"), then :func:`dmd_loss`. Returns ``(loss [B], diag)`` (+ ``t``).
    """
    x_d = add_noise(generated, eps, t.to(torch.float64))
    with torch.no_grad():
        x_in = x_d.detach()
        x0_fake = fake_score(x_in, t, cond).x0
        x0_real = cfg_denoise(teacher, x_in, t, cond, uncond, guidance).x0
    loss, diag = dmd_loss(generated, x0_fake, x0_real, loss_scale=loss_scale)
    diag["t"] = t.detach()
    return loss, diag


def fake_score_loss(generated: Tensor, x0_fake: Tensor, t: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic loss per sample ``sum((G - x0_fake)^2) / sin^2 t``, float64, no extra scale.

    ``x0_fake`` carries the gradient (fake-score parameters); ``generated`` is a constant. At fixed
    ``x_t`` this equals unit-weighted TrigFlow velocity matching ``sum((F_hat - F*)^2)``.
    """
    sin2 = torch.sin(t.to(torch.float64)) ** 2
    diff = generated.detach().to(torch.float64) - x0_fake.to(torch.float64)
    loss = diff.pow(2).flatten(1).sum(1) / sin2
    return loss, {"t": t.detach(), "loss": loss.detach()}


def fake_score_objective(
    generated: Tensor, t: Tensor, eps: Tensor, fake_score: Denoiser, cond: Any
) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic objective: ``x_D = cos t sg(G) + sin t eps``, ``x0_fake = fake_score(x_D, t, cond).x0``
    with grad, then :func:`fake_score_loss`. ``G`` comes from a no-grad backward simulation."""
    G = generated.detach()
    x0_fake = fake_score(add_noise(G, eps, t.to(torch.float64)), t, cond).x0
    return fake_score_loss(G, x0_fake, t)
