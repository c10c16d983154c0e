"""Few-step backward simulation of the student (docs/losses.md, rollout), as used by the DMD and critic steps.

Built from two pieces so that other rollouts reuse them:

* :func:`rollout_times` — the time grid ``[n + 1, B]``: exactly ``pi/2`` first, then a running minimum of
  ``p_D`` draws (or fixed times), then ``0``;
* :func:`denoise_chain` — one chain of "denoise, re-noise with fresh noise" steps over such a grid, gradient
  only through the last denoiser call.

:func:`backward_simulation` composes them for the bidirectional student. A causal self-forcing rollout
(docs/causal_training.md) is a loop over frame blocks around the same two pieces: for block ``i``, bind the
student to the KV cache / block offset in a denoiser closure, run :func:`denoise_chain` on that block's
noise slice (passing the pre-drawn per-step noise slices via ``noises=``, as the reference draws noise
once for the whole video), then refresh the cache under ``no_grad``. Nothing here assumes one block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rcm_losses.parameterization import Denoiser, add_noise
from rcm_losses.timesteps import TimeSampler, fixed_times

__all__ = ["Rollout", "simulation_steps", "rollout_times", "denoise_chain", "backward_simulation"]


class Rollout(NamedTuple):
    """Result of a rollout.

    ``x0``: the last student prediction ``[B, ...]`` (``out_dtype``, float32 by default), differentiable
    through the last denoiser call only (when grad was on). ``times``: ``[n + 1, B]`` float64 with
    ``times[0] = pi/2`` (for :func:`backward_simulation`) and ``times[-1] = 0``. ``inputs[i]`` /
    ``predictions[i]``: the (detached) sample fed to step ``i`` and its ``x0`` prediction.
    """

    x0: Tensor
    times: Tensor
    inputs: list[Tensor]
    predictions: list[Tensor]


def simulation_steps(effective_iteration: int, max_steps: int = 4) -> int:
    """Number of simulation steps ``n = effective_iteration % max_steps + 1`` (cycles 1..max)."""
    if max_steps < 1 or effective_iteration < 0:
        raise ValueError(f"need max_steps >= 1 and effective_iteration >= 0, got {max_steps}, {effective_iteration}")
    return effective_iteration % max_steps + 1


def rollout_times(
    n_steps: int,
    batch: int,
    *,
    generator: torch.Generator | None = None,
    time_sampler: TimeSampler | None = None,
    fixed: Sequence[float] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Time grid ``[n_steps + 1, batch]`` float64 of a backward simulation.

    ``t_0 = pi/2`` exactly; for ``i = 0..n-2``: ``t_{i+1} = min(time_sampler(batch), t_i)`` (running minimum
    of fresh draws, so non-increasing per sample) or ``t_{i+1} = fixed[i]``; finally ``t_n = 0``. Give
    exactly one of ``time_sampler`` (with ``generator``) and ``fixed`` (at least ``n_steps - 1`` values).
    The device is the generator's for random times, else ``device``.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if (time_sampler is None) == (fixed is None):
        raise ValueError("give exactly one of time_sampler= (random times) and fixed= (fixed times)")
    if time_sampler is not None and generator is None:
        raise ValueError("random rollout times need generator=")
    if fixed is not None and len(fixed) < n_steps - 1:
        raise ValueError(f"{n_steps} steps need {n_steps - 1} fixed times, got {list(fixed)}")
    if time_sampler is not None:
        device = generator.device
    times = [torch.full((batch,), math.pi / 2, dtype=torch.float64, device=device)]
    if fixed is not None:
        times.extend(fixed_times(list(fixed)[: n_steps - 1], batch, device=device))  # [0, B] for one step
    else:
        for _ in range(n_steps - 1):
            times.append(torch.minimum(time_sampler(batch, generator=generator).to(times[-1]), times[-1]))
    times.append(torch.zeros(batch, dtype=torch.float64, device=device))
    return torch.stack(times)


def denoise_chain(
    denoiser: Denoiser,
    x_init: Tensor,
    times: Tensor,
    cond: Any,
    *,
    generator: torch.Generator | None = None,
    noises: Sequence[Tensor] | None = None,
    with_grad: bool = True,
    out_dtype: torch.dtype = torch.float32,
) -> Rollout:
    """Run ``n = len(times) - 1`` steps: ``x0_hat = denoiser(x, t_i, cond).x0``, then (except after the last
    step) re-noise ``x = cos t_{i+1} x0_hat + sin t_{i+1} eps_i`` with fresh noise ``eps_i``.

    ``x_init`` ``[B, ...]`` is the sample at ``times[0]``; ``times`` ``[n + 1, B]``. Noise ``eps_i`` comes from
    ``noises[i]`` if given (``n - 1`` tensors like ``x_init``), else is drawn (float32) from ``generator``.
    Only the last denoiser call runs with grad, and only if ``with_grad``; all earlier calls run under
    ``torch.no_grad()``.
    """
    n = times.shape[0] - 1
    if n < 1 or times.ndim != 2 or times.shape[1] != x_init.shape[0]:
        raise ValueError(f"times must be [n + 1 >= 2, B={x_init.shape[0]}], got {tuple(times.shape)}")
    if noises is None and n > 1 and generator is None:
        raise ValueError("re-noising needs generator= (or pre-drawn noises=)")
    if noises is not None and len(noises) < n - 1:
        raise ValueError(f"{n} steps need {n - 1} noise tensors, got {len(noises)}")
    x, inputs, preds = x_init, [], []
    for i in range(n):
        last = i == n - 1
        inputs.append(x.detach())
        with torch.set_grad_enabled(with_grad and last):
            x0_hat = denoiser(x, times[i], cond).x0.to(out_dtype)
        preds.append(x0_hat.detach())
        if not last:
            eps = noises[i] if noises is not None else _randn_like(x_init, generator)
            x = add_noise(x0_hat, eps, times[i + 1])
    return Rollout(x0=x0_hat, times=times, inputs=inputs, predictions=preds)


def _randn_like(x: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32).to(x.device)


def backward_simulation(
    denoiser: Denoiser,
    cond: Any,
    shape: Sequence[int],
    *,
    n_steps: int,
    generator: torch.Generator,
    time_sampler: TimeSampler | None = None,
    fixed: Sequence[float] | None = None,
    with_grad: bool = True,
) -> Rollout:
    """Student few-step generation from pure noise; a pure function of the denoiser and ``generator``.

    Draws, in this order from ``generator``: ``x = eps_0 [shape]`` (float32; the sample at ``t = pi/2``), the
    ``n_steps - 1`` random times (if ``time_sampler``), then one fresh noise per re-noise. Use
    ``time_sampler=UniformShift(5.0)`` (``p_D``) or ``fixed=(1.5, 1.4, 1.0)`` (``dmd_fix_timesteps``).
    Returns a :class:`Rollout` (``x0`` float32, grad only through the last call when ``with_grad``).
    """
    x = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    times = rollout_times(n_steps, x.shape[0], generator=generator, time_sampler=time_sampler, fixed=fixed,
                          device=generator.device)
    return denoise_chain(denoiser, x, times, cond, generator=generator, with_grad=with_grad)
