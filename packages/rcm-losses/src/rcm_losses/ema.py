"""EDM2 power-function EMA of the student weights (docs/losses.md, ema; Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", §3.1 / App. C).

The EMA with profile exponent ``gamma`` has relative standard deviation
``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))``; given the rate ``sigma_rel = s`` the exponent is
the largest real root of ``x^3 + 7 x^2 + (16 - s^-2) x + (12 - s^-2)`` (``s = 0.1`` -> ``gamma ~ 6.9372``).
At step ``k`` the decay is ``beta(k) = (1 - 1/(k + 1))^(gamma + 1)`` and ``beta = 0`` for ``k < 1``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["ema_gamma", "ema_beta", "ema_update_"]


def ema_gamma(rate: float) -> float:
    """Exponent ``gamma`` of the power EMA with relative width ``rate`` (largest real root of the cubic).

    Valid for ``0 < rate < sqrt(1/12)`` (``gamma > 0``; ``rate -> sqrt(1/12)`` gives ``gamma -> 0``).
    """
    if not 0 < rate < (1 / 12) ** 0.5:
        raise ValueError(f"EMA rate must lie in (0, sqrt(1/12) ~ 0.2887), got {rate}")
    q = rate**-2
    coeffs = torch.tensor([1.0, 7.0, 16.0 - q, 12.0 - q], dtype=torch.float64)
    companion = torch.zeros(3, 3, dtype=torch.float64)
    companion[0] = -coeffs[1:]
    companion[1, 0] = companion[2, 1] = 1.0
    roots = torch.linalg.eigvals(companion)
    real = roots.real[roots.imag.abs() < 1e-9]
    x = float(real.max())
    for _ in range(3):  # polish with Newton steps on the cubic
        p = ((x + 7) * x + 16 - q) * x + 12 - q
        dp = (3 * x + 14) * x + 16 - q
        x -= p / dp
    return x


def ema_beta(step: int, rate: float = 0.1) -> float:
    """Decay ``beta(k) = (1 - 1/(k + 1))^(gamma + 1)`` at ``k = step`` (the effective iteration plus any
    shift), ``0`` for ``k < 1``. ``rate=0.1``: beta(1)=0.004, beta(10)=0.469, beta(100)=0.924,
    beta(1000)=0.9921, beta(10^4)=0.99921."""
    if step < 1:
        return 0.0
    return (1 - 1 / (step + 1)) ** (ema_gamma(rate) + 1)


@torch.no_grad()
def ema_update_(ema: Iterable[Tensor], params: Iterable[Tensor], beta: float) -> None:
    """In place ``ema <- beta ema + (1 - beta) param`` for paired tensors (the EMA may be a higher precision
    copy, e.g. fp32 EMA of bf16 parameters; values are cast to the EMA dtype)."""
    ema, params = list(ema), list(params)
    if len(ema) != len(params):
        raise ValueError(f"EMA has {len(ema)} tensors but the model has {len(params)}")
    for e, p in zip(ema, params):
        if e.shape != p.shape:
            raise ValueError(f"EMA tensor of shape {tuple(e.shape)} paired with a parameter of {tuple(p.shape)}")
        e.lerp_(p.to(e.dtype), 1 - beta)
