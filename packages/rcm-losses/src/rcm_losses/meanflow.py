"""MeanFlow: the average-velocity objective (Geng et al., arXiv 2505.13447; docs/meanflow.md).

Time convention (the paper's, which is Wan's rectified flow): RF time ``t ∈ [0, 1]``, ``t = 1`` is noise,
``z_t = (1 − t) x + t ε``, instantaneous velocity ``v = ε − x``. The network is an *average velocity*
``u(z, r, t)`` over ``[r, t]`` (``r ≤ t``): ``z_r = z_t − (t − r) u(z_t, r, t)``, and ``u(z, t, t) = v(z, t)``.

The MeanFlow identity (paper sec. 4.1) ``u = v − (t − r) du/dt`` with the total derivative along the flow
``du/dt = v ∂_z u + ∂_t u``, i.e. the JVP of ``u`` along the tangent ``(v, 0, 1)`` in ``(z, r, t)``,
gives the stop-gradient regression target (sec. 4.1, Algorithm 1)::

    (r, t) = LogitNormalPair()(B, generator=g)                     # [B] float64 each, r <= t
    z_t = rf_add_noise(x, eps, t)
    with torch.no_grad():
        v = eps - x                                                # or a teacher's (CFG) velocity
        u_sg, du_dt = meanflow_tangent(student.jvp, z_t, r, t, cond, v)   # exact JVP (or mode="fd")
    u = student(z_t, r, t, cond)                                   # with grad
    loss, diag = meanflow_loss(u, meanflow_target(v, du_dt, r, t))  # adaptive weight (sec. 4.3)
    loss.sum().backward()

or all at once with :func:`meanflow_objective`. ``student`` is an :data:`AverageVelocity` in RF units,
e.g. a :class:`MeanFlowAdapter` around a network that takes Wan's ``1000·t`` timesteps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from rcm_losses.parameterization import RF_TIMESTEP_SCALE, VelocityFn, expand_time

__all__ = [
    "AverageVelocity",
    "AverageVelocityJVP",
    "AverageVelocityNet",
    "AverageVelocityNetJVP",
    "MeanFlowAdapter",
    "LogitNormalPair",
    "rf_add_noise",
    "average_velocity_jvp_via_func",
    "meanflow_tangent",
    "meanflow_target",
    "adaptive_weight",
    "meanflow_loss",
    "guided_velocity",
    "teacher_velocity",
    "meanflow_objective",
    "meanflow_sample",
]

AverageVelocity = Callable[[Tensor, Tensor, Tensor, Any], Tensor]
"""``(z [B, ...], r [B], t [B] RF times, cond) -> u`` shaped like ``z``."""
AverageVelocityJVP = Callable[[Tensor, Tensor, Tensor, Any, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(z, r, t, cond, tz, tr, tt) -> (u, du)``: ``u`` and its JVP along ``(tz, tr, tt)`` w.r.t. ``(z, r, t)``."""
AverageVelocityNet = Callable[[Tensor, Tensor, Tensor, Any], Tensor]
"""Network contract on Wan's scale: ``(x, timestep_t = 1000 t, timestep_r = 1000 r, cond) -> u``."""
AverageVelocityNetJVP = Callable[[Tensor, Tensor, Tensor, Any, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(x, timestep_t, timestep_r, cond, tx, ttimestep_t, ttimestep_r) -> (u, du)`` on Wan's scale."""


def _sum(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


def _nan(x: Tensor) -> Tensor:
    return torch.isnan(x).flatten(1).any(1)


def rf_add_noise(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """``z_t = (1 − t) x + t ε`` (paper sec. 3); promotes to ``t``'s dtype (float64 times give float64)."""
    tb = expand_time(t, x)
    return (1 - tb) * x + tb * eps


# ------------------------------------------------------------------------------------------ time pairs
@dataclass(frozen=True)
class LogitNormalPair:
    """MeanFlow time pairs (paper sec. 4.3, "sampling time steps"; defaults: its ImageNet choice).

    Two draws ``σ(mean + std·n)``, ``n ~ N(0, 1)`` (logit-normal); ``t`` is the larger and ``r`` the
    smaller; then each sample keeps ``r < t`` with probability ``ratio_r_neq_t`` and gets ``r = t``
    (plain flow matching) otherwise. ``(batch, *, generator) -> (r, t)``, float64 ``[batch]`` each on the
    generator's device; draws ``n`` as ``[2, batch]`` float32, then one ``U[0, 1)`` per sample.
    """

    mean: float = -0.4
    std: float = 1.0
    ratio_r_neq_t: float = 0.25

    def __post_init__(self) -> None:
        if not self.std >= 0:
            raise ValueError(f"LogitNormalPair std must be >= 0, got {self.std}")
        if not 0.0 <= self.ratio_r_neq_t <= 1.0:
            raise ValueError(f"ratio_r_neq_t must lie in [0, 1], got {self.ratio_r_neq_t}")

    def __call__(self, batch: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        dev = generator.device
        n = torch.randn(2, batch, generator=generator, device=dev, dtype=torch.float32).to(torch.float64)
        s = torch.sigmoid(self.mean + self.std * n)
        t, r = s.max(0).values, s.min(0).values
        keep = torch.rand(batch, generator=generator, device=dev, dtype=torch.float32) < self.ratio_r_neq_t
        return torch.where(keep, r, t), t


# ------------------------------------------------------------------------------------------- adapters
def _scaled_jvp_via_func(net: AverageVelocityNet) -> AverageVelocityNetJVP:
    def jvp(x, ts, rs, cond, tx, tts, trs):
        out, tout = torch.func.jvp(lambda x_, t_, r_: net(x_, t_, r_, cond), (x, ts, rs),
                                   (tx.to(x.dtype), tts.to(ts.dtype), trs.to(rs.dtype)))
        return out, tout.detach()

    return jvp


@dataclass(frozen=True)
class MeanFlowAdapter:
    """A Wan-scale average-velocity network seen in RF units (stateless; holds only callables).

    ``adapter(z, r, t, cond) = net(z.to(input_dtype), 1000 t, 1000 r, cond)`` as float64;
    ``adapter.jvp(z, r, t, cond, tz, tr, tt)`` calls ``net_jvp`` with the tangents ``(tz, 1000 tt, 1000 tr)``
    (``torch.func.jvp`` of ``net`` when ``net_jvp`` is None). ``input_dtype=None`` keeps ``z`` float64;
    timesteps are passed in float64 (the network computes its sinusoids in float64).
    """

    net: AverageVelocityNet
    net_jvp: AverageVelocityNetJVP | None = None
    input_dtype: torch.dtype | None = torch.bfloat16
    timestep_scale: float = RF_TIMESTEP_SCALE

    def _in(self, z: Tensor) -> Tensor:
        return z if self.input_dtype is None else z.to(self.input_dtype)

    def __call__(self, z: Tensor, r: Tensor, t: Tensor, cond: Any) -> Tensor:
        k = self.timestep_scale
        return self.net(self._in(z), k * t.to(torch.float64), k * r.to(torch.float64), cond).to(torch.float64)

    def jvp(self, z: Tensor, r: Tensor, t: Tensor, cond: Any, tz: Tensor, tr: Tensor, tt: Tensor
            ) -> tuple[Tensor, Tensor]:
        k, f = self.timestep_scale, self.net_jvp or _scaled_jvp_via_func(self.net)
        r64, t64 = r.to(torch.float64), t.to(torch.float64)
        u, du = f(self._in(z), k * t64, k * r64, cond, self._in(tz), k * tt.to(torch.float64),
                  k * tr.to(torch.float64))
        return u.to(torch.float64), du.to(torch.float64)


def average_velocity_jvp_via_func(u_fn: AverageVelocity) -> AverageVelocityJVP:
    """JVP of any :data:`AverageVelocity` w.r.t. ``(z, r, t)`` by ``torch.func.jvp`` (generic fallback)."""

    def jvp(z, r, t, cond, tz, tr, tt):
        u, du = torch.func.jvp(lambda z_, r_, t_: u_fn(z_, r_, t_, cond), (z, r, t),
                               (tz.to(z.dtype), tr.to(r.dtype), tt.to(t.dtype)))
        return u, du.detach()

    return jvp


# -------------------------------------------------------------------------------------------- tangent
def meanflow_tangent(
    student_jvp: AverageVelocityJVP | None,
    z_t: Tensor,
    r: Tensor,
    t: Tensor,
    cond: Any,
    v: Tensor,
    *,
    mode: Literal["exact", "fd"] = "exact",
    fd_eps: float = 5e-3,
    student: AverageVelocity | None = None,
    u_now: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(u, du/dt)`` along the flow, float64; call it under ``torch.no_grad()``.

    * ``mode="exact"``: ``student_jvp(z_t, r, t, cond, v, 0, 1)`` (forward-mode JVP, tangent ``(v, 0, 1)``
      in ``(z, r, t)``; paper sec. 4.1 and its Algorithm 1).
    * ``mode="fd"``: forward difference along the same direction,
      ``du/dt ≈ (u(z_t + h v, r, t + h) − u(z_t, r, t)) / h`` with ``h = fd_eps`` (error ``O(h)``; two
      forwards). ``u_now`` (the student's ``u(z_t, r, t)``, e.g. the detached grad forward) saves one of them.
      Needs ``student``.
    """
    if mode == "exact":
        if student_jvp is None:
            raise ValueError("mode='exact' needs the student's JVP (student_jvp=)")
        one = torch.ones_like(t, dtype=torch.float64)
        u, du = student_jvp(z_t, r, t, cond, v, torch.zeros_like(one), one)
        return u.to(torch.float64), du.to(torch.float64)
    if mode != "fd":
        raise ValueError(f"mode must be 'exact' or 'fd', got {mode!r}")
    if student is None:
        raise ValueError("mode='fd' needs the student (student=)")
    if not fd_eps > 0:
        raise ValueError(f"fd_eps must be > 0, got {fd_eps}")
    t64 = t.to(torch.float64)
    u = (student(z_t, r, t64, cond) if u_now is None else u_now).to(torch.float64)
    u_next = student(z_t + fd_eps * v, r, t64 + fd_eps, cond).to(torch.float64)
    return u, (u_next - u) / fd_eps


def meanflow_target(v: Tensor, du_dt: Tensor, r: Tensor, t: Tensor) -> Tensor:
    """``u_tgt = v − (t − r) du/dt`` (paper sec. 4.1), float64, shaped like ``v``; a constant (detached)."""
    d = expand_time((t.to(torch.float64) - r.to(torch.float64)), v)
    return (v.to(torch.float64) - d * du_dt.to(torch.float64)).detach()


def adaptive_weight(sq_err: Tensor, *, p: float = 1.0, c: float = 1e-3) -> Tensor:
    """``w = 1 / (sq_err + c)^p``, detached (paper sec. 4.3; ``p = 0``: plain L2, ``p = 0.5``: pseudo-Huber)."""
    if p < 0 or not c > 0:
        raise ValueError(f"adaptive weighting needs p >= 0 and c > 0, got p={p}, c={c}")
    return 1.0 / (sq_err.detach() + c) ** p


def meanflow_loss(
    u_student: Tensor,
    u_target: Tensor,
    *,
    p: float = 1.0,
    c: float = 1e-3,
    loss_scale: float = 1.0,
    reduce: Literal["mean", "sum"] = "mean",
) -> tuple[Tensor, dict[str, Tensor]]:
    """``loss = loss_scale · sg(w) · ‖u − sg(u_tgt)‖²`` per sample, float64 ``[B]``.

    ``‖·‖²`` is the mean (``reduce="mean"``, default: ``c`` then means the same at every resolution) or the
    sum of the squared error over the non-batch elements; ``w`` from :func:`adaptive_weight`. Samples with a
    NaN in ``u`` or the target get loss 0 (no gradient; ``diag['nan']``). Returns ``(loss, diag)`` with
    detached ``sq_err`` (unweighted), ``weight``, ``nan`` and ``loss``.
    """
    u = u_student.to(torch.float64)
    tgt = u_target.to(torch.float64).detach()
    nan = _nan(u.detach()) | _nan(tgt)
    keep = expand_time(~nan, u)
    delta = torch.where(keep, u - tgt, torch.zeros_like(u))
    sq = _sum(delta**2)
    if reduce == "mean":
        sq = sq / delta[0].numel()
    elif reduce != "sum":
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    w = adaptive_weight(sq, p=p, c=c)
    loss = loss_scale * w * sq
    return loss, {"sq_err": sq.detach(), "weight": w, "nan": nan, "loss": loss.detach()}


# ------------------------------------------------------------------------------------------ velocities
def guided_velocity(v: Tensor, u_cond: Tensor, u_uncond: Tensor, *, omega: float, kappa: float = 0.0) -> Tensor:
    """Guidance in training (paper sec. 4.2; ``kappa``: the variant of its appendix)::

        ṽ = ω v + κ u(z_t, t, t | c) + (1 − ω − κ) u(z_t, t, t | ∅)

    ``v = ε − x`` (conditional sample velocity), ``u_cond`` / ``u_uncond`` the student's own instantaneous
    velocities (``r = t``) without grad. ``ω = 1, κ = 0`` gives ``v`` (no guidance).
    """
    v, uc, uu = (a.to(torch.float64) for a in (v, u_cond, u_uncond))
    return omega * v + kappa * uc + (1 - omega - kappa) * uu


def teacher_velocity(teacher: VelocityFn, z_t: Tensor, t: Tensor, cond: Any, uncond: Any = None,
                     guidance: float = 1.0, *, input_dtype: torch.dtype | None = None,
                     timestep_scale: float = RF_TIMESTEP_SCALE) -> Tensor:
    """A rectified-flow teacher's velocity (CFG ``u + w (c − u)``) at ``(z_t, t)``, float64 (distillation:
    the teacher's velocity replaces ``ε − x`` as ``v``). ``teacher(x, 1000 t, cond)`` (``WanDiT.forward``)."""
    x = z_t if input_dtype is None else z_t.to(input_dtype)
    ts = timestep_scale * t.to(torch.float64)
    vc = teacher(x, ts, cond).to(torch.float64)
    if uncond is None or guidance == 1.0:
        return vc
    vu = teacher(x, ts, uncond).to(torch.float64)
    return vu + guidance * (vc - vu)


def meanflow_objective(
    student: AverageVelocity,
    student_jvp: AverageVelocityJVP | None,
    x: Tensor,
    eps: Tensor,
    r: Tensor,
    t: Tensor,
    cond: Any,
    uncond: Any = None,
    *,
    teacher: VelocityFn | None = None,
    guidance: float = 1.0,
    omega: float = 1.0,
    kappa: float = 0.0,
    mode: Literal["exact", "fd"] = "exact",
    fd_eps: float = 5e-3,
    p: float = 1.0,
    c: float = 1e-3,
    loss_scale: float = 1.0,
    reduce: Literal["mean", "sum"] = "mean",
    teacher_input_dtype: torch.dtype | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One MeanFlow step. ``x``, ``eps`` ``[B, ...]``; ``r ≤ t`` ``[B]`` RF times (:class:`LogitNormalPair`).

    ``v`` (no grad) is, in order of precedence: the ``teacher``'s CFG velocity (distillation, ``guidance``
    and ``uncond``); the guided ``ṽ`` of :func:`guided_velocity` when ``omega != 1`` or ``kappa != 0``
    (needs ``uncond``); else ``ε − x``. Then ``(u, du/dt)`` by :func:`meanflow_tangent` (``mode``), the
    target, the student forward with grad (in ``"fd"`` mode its detached output is the difference's base
    point, so FD costs one extra forward) and :func:`meanflow_loss`. ``student_jvp=None`` uses
    ``student.jvp`` if present, else ``torch.func.jvp``. Returns ``(loss [B], diag)``; backpropagate
    ``loss.sum()``. ``diag`` adds ``r``, ``t`` and ``du_norm`` (per-sample RMS of ``du/dt``).
    """
    t64, r64 = t.to(torch.float64), r.to(torch.float64)
    if (r64 > t64).any():
        raise ValueError("MeanFlow needs r <= t for every sample")
    z_t = rf_add_noise(x, eps, t64)
    with torch.no_grad():
        if teacher is not None:
            v = teacher_velocity(teacher, z_t, t64, cond, uncond, guidance, input_dtype=teacher_input_dtype)
        elif omega != 1.0 or kappa != 0.0:
            if uncond is None:
                raise ValueError("guidance in training (omega != 1 or kappa != 0) needs uncond")
            v = guided_velocity(eps.to(torch.float64) - x.to(torch.float64), student(z_t, t64, t64, cond),
                                student(z_t, t64, t64, uncond), omega=omega, kappa=kappa)
        else:
            v = eps.to(torch.float64) - x.to(torch.float64)
    if mode == "exact":  # the no-grad JVP pass first, so its activations are freed before the grad forward
        if student_jvp is None:
            student_jvp = getattr(student, "jvp", None) or average_velocity_jvp_via_func(student)
        with torch.no_grad():
            _, du = meanflow_tangent(student_jvp, z_t, r64, t64, cond, v)
        u = student(z_t, r64, t64, cond)
    else:
        u = student(z_t, r64, t64, cond)
        with torch.no_grad():
            _, du = meanflow_tangent(None, z_t, r64, t64, cond, v, mode=mode, fd_eps=fd_eps, student=student,
                                     u_now=u.detach())
    target = meanflow_target(v, du, r64, t64)
    loss, diag = meanflow_loss(u, target, p=p, c=c, loss_scale=loss_scale, reduce=reduce)
    du_norm = du.flatten(1).pow(2).mean(1).sqrt()
    return loss, {**diag, "r": r64.detach(), "t": t64.detach(), "du_norm": du_norm}


# ------------------------------------------------------------------------------------------- sampling
def meanflow_sample(student: AverageVelocity, noise: Tensor, cond: Any, *,
                    times: Sequence[float] = (1.0, 0.0)) -> Tensor:
    """Few-step MeanFlow sampling (paper Algorithm 2): ``z_r = z_t − (t − r) u(z_t, r, t)`` over the
    decreasing RF grid ``times`` (``(1, 0)``: one step ``z_0 = z_1 − u(z_1, 0, 1)``; ``(1, 0.5, 0)``: two).
    ``noise`` is ``z_1`` when ``times[0] = 1``. Float64; returns ``z_{times[-1]}`` shaped like ``noise``.
    """
    ts = [float(s) for s in times]
    if len(ts) < 2 or any(not a > b for a, b in zip(ts, ts[1:])) or ts[0] > 1 or ts[-1] < 0:
        raise ValueError(f"times must be a strictly decreasing grid in [0, 1] with >= 2 entries, got {list(times)}")
    z = noise.to(torch.float64)
    b = z.shape[0]
    for t_, r_ in zip(ts, ts[1:]):
        t = torch.full((b,), t_, dtype=torch.float64, device=z.device)
        r = torch.full((b,), r_, dtype=torch.float64, device=z.device)
        z = z - (t_ - r_) * student(z, r, t, cond).to(torch.float64)
    return z
