"""Training-time samplers (docs/losses.md, timesteps). Every draw takes a ``torch.Generator``.

Samplers are frozen dataclasses with ``sampler(batch, *, generator) -> t [batch]``: TrigFlow times in
float64 on the generator's device. Random numbers are drawn in float32 and then cast to float64 (as the
reference does), the RF time is clamped to ``[0, 1]`` and mapped to TrigFlow with ``rf_to_trig``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from rcm_losses.parameterization import rf_to_trig, shift_rf, sigma_to_rf

__all__ = [
    "TimeSampler",
    "LogNormal",
    "UniformShift",
    "fixed_times",
    "sample_dcm_u",
    "dcm_times",
]


class TimeSampler(Protocol):
    """``(batch, *, generator) -> t [batch]`` float64 TrigFlow times on ``generator.device``."""

    def __call__(self, batch: int, *, generator: torch.Generator) -> Tensor: ...


def _check_batch(batch: int) -> None:
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")


def _rf_to_trig_clamped(s: Tensor) -> Tensor:
    return rf_to_trig(s.clamp(0.0, 1.0))


@dataclass(frozen=True)
class LogNormal:
    """``log sigma ~ N(p_mean, p_std^2)``, ``t = atan(sigma)`` (via ``s = sigma / (sigma + 1)``).

    ``p_G`` of the sCM step; recipe values LogNormal(0.7, 1.6) (1.3B) and LogNormal(1.5, 1.6) (14B).
    """

    p_mean: float
    p_std: float

    def __post_init__(self) -> None:
        if not self.p_std >= 0:
            raise ValueError(f"LogNormal p_std must be >= 0, got {self.p_std}")

    def __call__(self, batch: int, *, generator: torch.Generator) -> Tensor:
        _check_batch(batch)
        n = torch.randn(batch, generator=generator, device=generator.device, dtype=torch.float32)
        sigma = torch.exp(self.p_mean + self.p_std * n.to(torch.float64))
        return _rf_to_trig_clamped(sigma_to_rf(sigma))


@dataclass(frozen=True)
class UniformShift:
    """``u ~ U[0, 1)``, RF ``s = shift(u; shift)`` (identity for ``shift <= 0``), ``t = rf_to_trig(s)``.

    ``p_D`` of the DMD / critic steps and of the backward simulation; recipe value UniformShift(5.0).
    """

    shift: float

    def __call__(self, batch: int, *, generator: torch.Generator) -> Tensor:
        _check_batch(batch)
        u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float32)
        return _rf_to_trig_clamped(shift_rf(u.to(torch.float64), self.shift))


def fixed_times(values: Sequence[float], batch: int, *, device: torch.device | str | None = None) -> Tensor:
    """Fixed TrigFlow times (e.g. ``backward_timesteps = [1.5, 1.4, 1.0]``) as ``[len(values), batch]`` float64.

    Raises if a value lies outside ``[0, pi/2]``.
    """
    _check_batch(batch)
    t = torch.as_tensor(list(values), dtype=torch.float64, device=device)
    if t.ndim != 1:
        raise ValueError(f"fixed times must be a flat sequence of floats, got shape {tuple(t.shape)}")
    if ((t < 0) | (t > torch.pi / 2)).any():
        raise ValueError(f"fixed TrigFlow times must lie in [0, pi/2], got {list(values)}")
    return t[:, None].expand(len(t), batch).contiguous()


def sample_dcm_u(batch: int, *, generator: torch.Generator, total_steps: int = 48,
                 skip_steps: int = 1) -> Tensor:
    """dCM grid offset ``u ~ U[0, 1 - K/N)`` per sample (float32 draw, returned float64; docs/losses.md, consistency)."""
    _check_batch(batch)
    if not 1 <= skip_steps < total_steps:
        raise ValueError(f"dCM needs 1 <= skip_steps < total_steps, got {skip_steps} and {total_steps}")
    u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float32)
    return (u * (1 - skip_steps / total_steps)).to(torch.float64)


def dcm_times(u: Tensor, *, total_steps: int = 48, skip_steps: int = 1, shift: float = 5.0) -> Tensor:
    """dCM times ``t_k = rf_to_trig(shift(1 - (u + k/N); a))`` for ``k = 0..K`` as ``[K+1, B]`` float64.

    ``t_0 > t_1 > ... > t_K`` (docs/losses.md, consistency).
    """
    if not 1 <= skip_steps < total_steps:
        raise ValueError(f"dCM needs 1 <= skip_steps < total_steps, got {skip_steps} and {total_steps}")
    if ((u < 0) | (u > 1 - skip_steps / total_steps)).any():
        raise ValueError(f"dCM offsets u must lie in [0, 1 - skip_steps/total_steps] = "
                         f"[0, {1 - skip_steps / total_steps:.4f}] so that every t_k > 0")
    k = torch.arange(skip_steps + 1, dtype=torch.float64, device=u.device)[:, None]
    s = 1 - (u.to(torch.float64)[None, :] + k / total_steps)
    return _rf_to_trig_clamped(shift_rf(s, shift))
