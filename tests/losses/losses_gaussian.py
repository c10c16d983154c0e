"""Closed-form references for Gaussian data ``x0 ~ N(mu, diag(std^2))`` (float64), used by the loss tests.

TrigFlow marginal: ``x_t ~ N(cos t mu, V_t)`` with ``V_t = cos^2 t std^2 + sin^2 t`` per element, so

* posterior mean ``E[x0 | x_t] = mu + cos t std^2 (x_t - cos t mu) / V_t``;
* PF-ODE velocity ``F*(x_t, t) = (cos t x_t - E[x0 | x_t]) / sin t``;
* consistency function (ODE endpoint) ``f(x_t, t) = mu + std (x_t - cos t mu) / sqrt(V_t)``.

The RF "networks" below take ``(x_s, timestep = 1000 s, cond)`` like ``WanDiT.forward`` and return the
velocity ``v = (x_s - x0_hat) / s`` whose RF reconstruction ``x_s - s v`` is the wanted ``x0_hat``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def bt(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast per-sample ``t [B]`` against ``x [B, ...]``."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass
class GaussianData:
    mu: Tensor  # sample shape, float64
    std: Tensor  # sample shape, float64

    def sample(self, n: int, gen: torch.Generator) -> Tensor:
        e = torch.randn((n, *self.mu.shape), generator=gen, dtype=torch.float64)
        return self.mu + self.std * e

    def var_t(self, t: Tensor, x: Tensor) -> Tensor:
        c, s = torch.cos(bt(t, x)), torch.sin(bt(t, x))
        return c**2 * self.std**2 + s**2

    def posterior_x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        c = torch.cos(bt(t, x_t))
        return self.mu + c * self.std**2 * (x_t - c * self.mu) / self.var_t(t, x_t)

    def velocity(self, x_t: Tensor, t: Tensor) -> Tensor:
        c, s = torch.cos(bt(t, x_t)), torch.sin(bt(t, x_t))
        return (c * x_t - self.posterior_x0(x_t, t)) / s

    def consistency(self, x_t: Tensor, t: Tensor) -> Tensor:
        c = torch.cos(bt(t, x_t))
        return self.mu + self.std * (x_t - c * self.mu) / torch.sqrt(self.var_t(t, x_t))

    # --- RF networks (Wan's contract) ---------------------------------------------------------------
    def _rf_to_trig(self, x_s: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s = timestep.to(torch.float64) / 1000
        t = torch.atan2(s, 1 - s)
        x_t = x_s.to(torch.float64) * bt(torch.cos(t) + torch.sin(t), x_s)
        return s, t, x_t

    def rf_teacher(self, x_s: Tensor, timestep: Tensor, cond=None) -> Tensor:
        """Exact RF velocity ``E[eps - x0 | x_s]``."""
        s, t, x_t = self._rf_to_trig(x_s, timestep)
        return (x_s - self.posterior_x0(x_t, t)) / bt(s, x_s)

    def rf_student(self, x_s: Tensor, timestep: Tensor, cond=None, delta: float = 0.0) -> Tensor:
        """RF net whose TrigFlow x0 is the exact consistency function, plus a smooth perturbation."""
        s, t, x_t = self._rf_to_trig(x_s, timestep)
        v = (x_s - self.consistency(x_t, t)) / bt(s, x_s)
        sb = bt(s, x_s)
        return v + delta * (torch.sin(3 * x_s) * sb + 0.7 * sb**2 * x_s)


def forward_jvp_of(net):
    """Emulate ``WanDiT.forward_jvp(x, t, ctx, tx, tt) -> (out, tangent_out)`` with torch.func.jvp."""

    def forward_jvp(x, timestep, cond, tx, tt):
        return torch.func.jvp(lambda a, b: net(a, b, cond), (x, timestep), (tx, tt))

    return forward_jvp


def standard_case(shape=(2, 3, 2, 2)) -> GaussianData:
    """A fixed, non-trivial Gaussian (built without RNG so it does not depend on seeds)."""
    n = math.prod(shape)
    k = torch.arange(n, dtype=torch.float64).reshape(shape)
    return GaussianData(mu=0.8 * torch.sin(1.7 * k + 0.3), std=0.4 + 0.5 * (0.5 + 0.5 * torch.cos(0.9 * k)))
