"""Causal (block-autoregressive) training objectives as pure functions (CAUSAL_SPEC §4).

Legend: B batch, C channels, T latent frames, N frame blocks, Tb frames of one block, H x W latent grid,
K steps. Times are TrigFlow ``t`` in float64 as everywhere in ``rcm_losses``; per-frame times are ``[B, T]``,
constant inside a block.

The video is a sequence of frame blocks (:class:`FrameBlocks`: a first block of ``first_block_frames``, then
blocks of ``frames_per_block``). Two ways to train a causal student, combined as in rCM:

* **Teacher forcing** (the consistency side, offline): one network pass over ``[context ; noisy]`` along T
  with a teacher-forcing mask (noisy block i sees context blocks < i and itself). The caller binds the
  network, its mask and its RoPE positions into a *packed velocity*
  ``(x_packed [B, C, 2T, H, W], timestep [B, 2T], cond) -> v``; :class:`TeacherForcingVelocity` turns it
  into an ordinary velocity of the noisy frames alone, so the rCM objectives and :class:`TrigFlowAdapter`
  apply unchanged with per-block times. :func:`tf_scm_objective`, :func:`tf_dcm_objective` and
  :func:`flow_matching_objective` (causal teacher by teacher / diffusion forcing) are the spec's objectives.
* **Self forcing** (the DMD side, on-policy): :func:`self_forcing_rollout` generates the video block by block
  through two callables, exactly as inference does: ``denoise_block`` (reads the KV cache) and
  ``commit_block`` (writes a block's context k/v). Each block runs its few-step chain up to an *exit step*;
  only the exit step carries grad, earlier steps and every cache write run without grad (context k/v
  detached). :func:`replay_backward` / :func:`replayed_video` give the same gradients while keeping one
  block's activations at a time.

:func:`ode_regression_objective` is the alternative initialization (regression onto ODE trajectories).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from rcm_losses.consistency import dcm_objective, scm_objective
from rcm_losses.parameterization import (
    RF_TIMESTEP_SCALE,
    Denoiser,
    TrigFlowAdapter,
    TrigFlowPrediction,
    VelocityFn,
    VelocityJVP,
    add_noise,
    expand_time,
    round_timestep,
    trig_to_rf,
    trigflow_scalings,
)
from rcm_losses.rollout import denoise_chain
from rcm_losses.timesteps import TimeSampler, dcm_times, sample_dcm_u

__all__ = [
    "FrameBlocks",
    "sample_block_times",
    "sample_block_dcm_times",
    "TeacherForcingVelocity",
    "teacher_forcing_velocity",
    "teacher_forcing_adapter",
    "tf_scm_objective",
    "tf_dcm_objective",
    "causal_dcm_objective",
    "flow_matching_objective",
    "ode_regression_objective",
    "BlockDenoiser",
    "BlockCommit",
    "SelfForcingRollout",
    "sample_exit_steps",
    "cycled_exit_steps",
    "self_forcing_rollout",
    "replayed_video",
    "replay_backward",
    "network_input",
]

_F64 = torch.float64


# ------------------------------------------------------------------------------------------ blocks / times
@dataclass(frozen=True)
class FrameBlocks:
    """``num_frames`` latent frames as blocks ``[first | fpb | fpb | ...]`` (``c3-3``: ``FrameBlocks(21, 3)``;
    ``c1-4``: ``FrameBlocks(21, 4, 1)``). ``first_block_frames=None`` means ``frames_per_block``."""

    num_frames: int
    frames_per_block: int
    first_block_frames: int | None = None

    def __post_init__(self) -> None:
        first, fpb, t = self.first, self.frames_per_block, self.num_frames
        if fpb < 1 or first < 1 or t < first or (t - first) % fpb:
            raise ValueError(
                f"{t} frames do not split into a first block of {first} and blocks of {fpb} "
                "frames: need num_frames >= first_block_frames and (num_frames - first) % "
                "frames_per_block == 0"
            )

    @property
    def first(self) -> int:
        return self.frames_per_block if self.first_block_frames is None else self.first_block_frames

    @property
    def num_blocks(self) -> int:
        return 1 + (self.num_frames - self.first) // self.frames_per_block

    @property
    def sizes(self) -> tuple[int, ...]:
        """Frames of each block."""
        return (self.first,) + (self.frames_per_block,) * (self.num_blocks - 1)

    @property
    def slices(self) -> tuple[slice, ...]:
        """Frame slice of each block."""
        starts = [0, *torch.tensor(self.sizes).cumsum(0).tolist()]
        return tuple(slice(a, b) for a, b in zip(starts[:-1], starts[1:]))

    def frames_before(self, block: int) -> int:
        """Frames in blocks ``< block`` (the temporal offset of ``block``)."""
        return 0 if block <= 0 else self.first + (block - 1) * self.frames_per_block

    def expand(self, t_bn: Tensor) -> Tensor:
        """Per-block values ``[..., N]`` -> per-frame ``[..., T]`` (repeated inside each block)."""
        if t_bn.shape[-1] != self.num_blocks:
            raise ValueError(f"expected {self.num_blocks} per-block values, got shape {tuple(t_bn.shape)}")
        sizes = torch.tensor(self.sizes, device=t_bn.device)
        return t_bn.repeat_interleave(sizes, dim=-1)


def sample_block_times(
    sampler: TimeSampler,
    batch: int,
    blocks: FrameBlocks,
    *,
    generator: torch.Generator,
    strategy: Literal["random", "same"] = "random",
) -> Tensor:
    """Per-frame TrigFlow times ``[B, T]`` float64, constant inside each block.

    ``random`` (diffusion forcing, CAUSAL_SPEC §4.1): an independent draw per block (``sampler(B * N)``,
    sample-major); ``same``: one draw per sample shared by all blocks (``sampler(B)``).
    """
    n = blocks.num_blocks
    if strategy == "random":
        t_bn = sampler(batch * n, generator=generator).reshape(batch, n)
    elif strategy == "same":
        t_bn = sampler(batch, generator=generator)[:, None].expand(batch, n)
    else:
        raise ValueError(f"block time strategy must be 'random' or 'same', got {strategy!r}")
    return blocks.expand(t_bn)


def sample_block_dcm_times(
    batch: int,
    blocks: FrameBlocks,
    *,
    generator: torch.Generator,
    total_steps: int = 48,
    skip_steps: int = 1,
    shift: float = 5.0,
    strategy: Literal["random", "same"] = "random",
) -> Tensor:
    """dCM grids per block (RCM_SPEC §3 with one offset ``u`` per block, or per sample for ``same``):
    ``[K + 1, B, T]`` float64, strictly decreasing along K, constant inside each block."""
    n = blocks.num_blocks
    count = batch * n if strategy == "random" else batch
    if strategy not in ("random", "same"):
        raise ValueError(f"block time strategy must be 'random' or 'same', got {strategy!r}")
    u = sample_dcm_u(count, generator=generator, total_steps=total_steps, skip_steps=skip_steps)
    t = dcm_times(u, total_steps=total_steps, skip_steps=skip_steps, shift=shift)  # [K+1, count]
    t_kbn = t.reshape(-1, batch, n) if strategy == "random" else t[:, :, None].expand(-1, batch, n)
    return blocks.expand(t_kbn)


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
    ``context_eps`` (Causal-rCM's noisy context, CAUSAL_SPEC §3.2: the context the cache holds when the last
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
    """Teacher-forcing sCM (CAUSAL_SPEC §4.2 ``tf_scm``): :func:`rcm_losses.scm_objective` on the generated
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
    """dCM (RCM_SPEC §3) with per-frame times ``times`` ``[K + 1, B, T]`` (or ``[K + 1, B]``):
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
    """Teacher-forcing dCM (CAUSAL_SPEC §4.2 ``tf_dcm``): :func:`causal_dcm_objective` on the generated frames
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
    """Flow matching of a (causal) velocity network with per-frame times (CAUSAL_SPEC §4.1 ``tf`` / ``df``).

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
    """ODE-pair initialization (CAUSAL_SPEC §4.5): regress the causal student's ``x0`` onto the endpoint of a
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


# ------------------------------------------------------------------------------------------ self forcing
BlockDenoiser = Callable[[Tensor, Tensor, int], TrigFlowPrediction]
"""``(x_t [B, C, Tb, H, W], t [B], block_index) -> TrigFlowPrediction``: the student on one block,
attending to the blocks committed so far (the cache is read, not written)."""
BlockCommit = Callable[[Tensor, Tensor, int], None]
"""``(x [B, C, Tb, H, W], t [B], block_index) -> None``: run the network on a finished block at (context) time
``t`` and write its k/v to the cache (the context of later blocks). Called under ``torch.no_grad()``."""


class SelfForcingRollout(NamedTuple):
    """Result of :func:`self_forcing_rollout`.

    ``x0`` ``[B, C, T, H, W]`` (``out_dtype``): the generated video; block i carries grad through its exit
    step only (when the rollout ran with grad). Per block (``given`` blocks: ``exit_steps = -1``,
    ``exit_inputs`` and ``times`` None): ``exit_steps``; ``times`` the TrigFlow grid ``[e + 2, B]`` actually
    run (last entry 0); ``exit_inputs`` the detached sample fed to the exit step; ``contexts`` /
    ``context_times`` the detached sample and time ``[B]`` committed to the cache. Everything
    :func:`replayed_video` needs.
    """

    x0: Tensor
    exit_steps: tuple[int, ...]
    times: tuple[Tensor | None, ...]
    exit_inputs: tuple[Tensor | None, ...]
    contexts: tuple[Tensor, ...]
    context_times: tuple[Tensor, ...]


def _schedules(schedule: Sequence[float] | Sequence[Sequence[float]], num_blocks: int) -> list[list[float]]:
    """One strictly decreasing TrigFlow schedule per block (a flat schedule is shared; a list of schedules is
    per block, its last entry repeated for later blocks)."""
    if len(schedule) == 0:
        raise ValueError("the self-forcing schedule is empty")
    per_block = (
        [list(map(float, s)) for s in schedule]
        if isinstance(schedule[0], Sequence)
        else [list(map(float, schedule))]
    )
    per_block = per_block + [per_block[-1]] * max(0, num_blocks - len(per_block))
    for s in per_block:
        if not s or any(not 0 < v <= math.pi / 2 for v in s) or any(a <= b for a, b in zip(s, s[1:])):
            raise ValueError(
                f"a self-forcing schedule must be strictly decreasing TrigFlow times in (0, pi/2], got {s}"
            )
    return per_block[:num_blocks]


def sample_exit_steps(
    lengths: Sequence[int], *, generator: torch.Generator, same_across_blocks: bool = True
) -> tuple[int, ...]:
    """Random exit steps (gradient truncation, CAUSAL_SPEC §4.5): block i exits at step ``e_i < lengths[i]``.

    ``same_across_blocks``: one uniform draw ``e`` in ``[0, max(lengths))``, capped per block at
    ``lengths[i] - 1``; else one uniform draw per block. Every rank of a sharded run must use the same exit
    steps (the number of network calls must match): pass a generator seeded identically on all ranks.
    """
    if not lengths or min(lengths) < 1:
        raise ValueError(f"every block needs at least one step, got lengths {list(lengths)}")
    if same_across_blocks:
        e = int(torch.randint(max(lengths), (), generator=generator, device=generator.device))
        return tuple(min(e, n - 1) for n in lengths)
    return tuple(int(torch.randint(n, (), generator=generator, device=generator.device)) for n in lengths)


def cycled_exit_steps(
    effective_iteration: int, lengths: Sequence[int], max_steps: int | None = None
) -> tuple[int, ...]:
    """rcm's deterministic exit (CAUSAL_SPEC §4.3): ``n = it % max_steps + 1`` steps, capped per block at its
    schedule length; returns exit indices ``min(n, len_i) - 1``."""
    max_steps = max(lengths) if max_steps is None else max_steps
    if effective_iteration < 0 or max_steps < 1:
        raise ValueError(
            f"need effective_iteration >= 0 and max_steps >= 1, got {effective_iteration}, {max_steps}"
        )
    n = effective_iteration % max_steps + 1
    return tuple(min(n, m) - 1 for m in lengths)


def _randn(shape: Sequence[int], generator: torch.Generator) -> Tensor:
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)


def self_forcing_rollout(
    denoise_block: BlockDenoiser,
    commit_block: BlockCommit,
    shape: Sequence[int],
    blocks: FrameBlocks,
    schedule: Sequence[float] | Sequence[Sequence[float]],
    *,
    generator: torch.Generator,
    exit_steps: Sequence[int],
    given: Tensor | None = None,
    context_time: float = 0.0,
    with_grad: bool = True,
    out_dtype: torch.dtype = torch.float32,
) -> SelfForcingRollout:
    """Block-by-block student rollout with the cache, exactly as at inference (CAUSAL_SPEC §4.3, §5).

    ``shape`` = ``[B, C, T, H, W]``. Noise is drawn from ``generator`` for the whole video, in this order: the
    start noise ``eps_0`` (block i starts from ``sin t_0 eps_0``: pure noise at ``t_0 = pi/2``, the TrigFlow
    form of the sampler's ``s_0 eps`` below it), then one re-noise tensor per step transition (``max_len -
    1``), then (if ``context_time > 0``) the context noise; block i uses its frame slice of each, so the draws
    do not depend on the exit steps. ``schedule``: TrigFlow times ``t_0 > t_1 > ...`` (``pi/2`` = pure noise),
    one list for all blocks or one per block (last repeated). For block i:

    1. :func:`rcm_losses.rollout.denoise_chain` from the start sample over ``[t_0 .. t_{e_i}, 0]``:
       ``x0_hat = denoise_block(x, t_k, i)``, re-noise ``x = cos t_{k+1} x0_hat + sin t_{k+1} eps_k``; steps
       before the exit ``e_i = exit_steps[i]`` run under ``no_grad``, the exit step with grad (if
       ``with_grad``);
    2. under ``no_grad``: ``commit_block(ctx, t_c, i)`` with ``ctx = x0_hat`` detached (``context_time = 0``)
       or re-noised to ``t_c`` (noisy context). The cache never carries grad into later blocks.

    ``given`` ``[B, C, G, H, W]``: the first blocks are given (causal I2V: the image latent, G = frames of the
    given blocks); they are committed at ``t = 0`` and returned unchanged (no grad). ``exit_steps`` has one
    entry per block (entries of given blocks are ignored); see :func:`sample_exit_steps`.
    """
    b, c, t_len, h, w = shape
    if t_len != blocks.num_frames:
        raise ValueError(f"shape has {t_len} frames, the blocks cover {blocks.num_frames}")
    n = blocks.num_blocks
    scheds = _schedules(schedule, n)
    if len(exit_steps) != n:
        raise ValueError(f"need one exit step per block ({n}), got {len(exit_steps)}")
    n_given = _given_blocks(given, blocks, shape)
    for i in range(n_given, n):
        if not 0 <= exit_steps[i] < len(scheds[i]):
            raise ValueError(
                f"block {i}: exit step {exit_steps[i]} outside its {len(scheds[i])}-step schedule"
            )
    x_start = _randn(shape, generator)
    step_noise = [_randn(shape, generator) for _ in range(max(map(len, scheds)) - 1)]
    ctx_noise = _randn(shape, generator) if context_time > 0 else None
    t_c = torch.full((b,), float(context_time), dtype=_F64, device=x_start.device)
    zero = torch.zeros(b, dtype=_F64, device=x_start.device)
    outs, exits, grids, inputs, ctxs, ctx_ts = [], [], [], [], [], []
    for i, sl in enumerate(blocks.slices):
        if i < n_given:
            x0_i, ctx, tc = given[:, :, sl].to(out_dtype), given[:, :, sl].detach(), zero
            e, grid, x_exit = -1, None, None
        else:
            e = int(exit_steps[i])
            grid = torch.tensor([*scheds[i][: e + 1], 0.0], dtype=_F64, device=x_start.device)
            grid = grid[:, None].expand(-1, b)
            x_init = math.sin(scheds[i][0]) * x_start[:, :, sl]  # TrigFlow sample of pure noise at t_0
            chain = denoise_chain(
                lambda x, t, _c, i=i: denoise_block(x, t, i),
                x_init,
                grid,
                None,
                noises=[z[:, :, sl] for z in step_noise[:e]],
                with_grad=with_grad,
                out_dtype=out_dtype,
            )
            x0_i, x_exit = chain.x0, chain.inputs[-1]
            ctx = x0_i.detach() if ctx_noise is None else add_noise(x0_i.detach(), ctx_noise[:, :, sl], t_c)
            tc = zero if ctx_noise is None else t_c
        with torch.no_grad():
            commit_block(ctx, tc, i)
        for lst, v in zip((outs, exits, grids, inputs, ctxs, ctx_ts), (x0_i, e, grid, x_exit, ctx, tc)):
            lst.append(v)
    return SelfForcingRollout(
        torch.cat(outs, dim=2), tuple(exits), tuple(grids), tuple(inputs), tuple(ctxs), tuple(ctx_ts)
    )


def _given_blocks(given: Tensor | None, blocks: FrameBlocks, shape: Sequence[int]) -> int:
    """Number of leading blocks covered by ``given`` (must end on a block boundary, leave one to generate)."""
    if given is None:
        return 0
    ends = [s.stop for s in blocks.slices]
    g = given.shape[2]
    if (
        given.ndim != 5
        or tuple(given.shape[:2]) != tuple(shape[:2])
        or tuple(given.shape[3:]) != tuple(shape[3:])
        or g not in ends[:-1]
    ):
        raise ValueError(
            f"given frames {tuple(given.shape)} must be [B, C, G, H, W] like {tuple(shape)} with G a "
            f"block boundary before the last block ({ends[:-1]})"
        )
    return ends.index(g) + 1


def replay_backward(
    rollout: SelfForcingRollout,
    denoise_block: BlockDenoiser,
    commit_block: BlockCommit,
    blocks: FrameBlocks,
    grad_video: Tensor,
    *,
    reset: Callable[[], None],
    check_atol: float | None = None,
) -> None:
    """Replayed backprop of a no-grad rollout (CAUSAL_SPEC §4.4): accumulate into the parameters the gradient
    of a loss whose derivative w.r.t. the video is ``grad_video`` ``[B, C, T, H, W]``, one block at a time.

    ``reset()`` the cache once, then for block i: recompute the exit step ``denoise_block(exit_input_i,
    t_{e_i}, i)`` with grad against the cache holding exactly blocks < i, backpropagate the block's slice of
    ``grad_video`` (one ``torch.autograd.backward`` per block: peak activations of one block), and re-commit
    the block's saved context under ``no_grad``. The parameter gradients equal those of the plain rollout
    (whose cache carries no grad either). ``check_atol``: also assert that each recomputed block matches the
    rollout (catches a cache that does not restart at ``reset()``). Each block's backward is a separate
    top-level backward, so this composes with FSDP2 (gradients are reduced per backward).
    """
    reset()
    for i, sl in enumerate(blocks.slices):
        if rollout.exit_steps[i] >= 0:
            e = rollout.exit_steps[i]
            with torch.enable_grad():
                x0_i = denoise_block(rollout.exit_inputs[i], rollout.times[i][e], i).x0.to(rollout.x0.dtype)
            if check_atol is not None and not torch.allclose(
                x0_i.detach(), rollout.x0[:, :, sl], atol=check_atol, rtol=0
            ):
                raise RuntimeError(
                    f"replayed block {i} differs from the rollout: the cache did not restart at "
                    "reset() or denoise_block is not deterministic"
                )
            if x0_i.requires_grad:
                torch.autograd.backward(x0_i, grad_video[:, :, sl].to(x0_i.dtype))
        with torch.no_grad():
            commit_block(rollout.contexts[i], rollout.context_times[i], i)


class _Replay(torch.autograd.Function):
    """Identity on the video whose backward runs ``replay(grad)`` (re-entrant autograd)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, video: Tensor, replay: Callable[[Tensor], None]) -> Tensor:
        ctx.replay = replay
        return video.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.replay(grad)
        return None, None, None


def replayed_video(
    rollout: SelfForcingRollout,
    denoise_block: BlockDenoiser,
    commit_block: BlockCommit,
    blocks: FrameBlocks,
    *,
    reset: Callable[[], None],
    check_atol: float | None = None,
) -> Tensor:
    """The rollout's video with replayed backprop: use it in place of ``rollout.x0`` (rollout run with
    ``with_grad=False``); its backward runs :func:`replay_backward` with ``dL/dG``.

    The replay runs *inside* the outer backward (re-entrant autograd). That is fine for plain modules; with
    FSDP2-sharded networks call :func:`replay_backward` directly instead (its per-block backward passes are
    top-level ones, which FSDP2's backward hooks expect).
    """
    anchor = torch.zeros((), requires_grad=True)
    replay = lambda grad: replay_backward(
        rollout, denoise_block, commit_block, blocks, grad, reset=reset, check_atol=check_atol
    )
    return _Replay.apply(anchor, rollout.x0, replay)
