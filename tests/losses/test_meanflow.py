"""MeanFlow (rcm_losses.meanflow) against closed forms for Gaussian data, float64.

Data ``x ~ N(mu, diag(std^2))``, ``z_t = (1 - t) x + t eps``: ``z_t ~ N(m_t, a_t^2)`` with ``m_t = (1 - t) mu``,
``a_t^2 = (1 - t)^2 std^2 + t^2`` per element. The probability-flow ODE is the affine map that keeps the
standardized coordinate, ``z_r = m_r + (a_r / a_t)(z_t - m_t)``, so the exact average velocity is
``u(z, r, t) = (z_t - z_r) / (t - r) = -mu + k / a_t (z - m_t)`` with
``k = (a_t - a_r) / (t - r) = ((t + r) - std^2 (2 - t - r)) / (a_t + a_r)`` (no singularity at ``r = t``).
Independent checks of that formula: at ``r = t`` it is the posterior velocity ``E[eps - x | z_t]`` (Gaussian
conditioning), and one step from ``t = 1`` lands exactly on ``mu + std * noise`` (the known endpoint).
Tolerances: float64 identities to 1e-10; finite differences are first order (error ∝ eps).
"""

from __future__ import annotations

import pytest
import torch

from rcm_losses.meanflow import (
    LogitNormalPair,
    MeanFlowAdapter,
    adaptive_weight,
    average_velocity_jvp_via_func,
    guided_velocity,
    meanflow_loss,
    meanflow_objective,
    meanflow_sample,
    meanflow_tangent,
    meanflow_target,
    rf_add_noise,
)

F64 = torch.float64
SHAPE = (3, 2, 4)  # per-sample shape [C, T, H]-like


def _bt(s, x):
    return s.reshape(-1, *([1] * (x.ndim - 1)))


class Gaussian:
    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(SHAPE, generator=g, dtype=F64)
        self.std = 0.2 + torch.rand(SHAPE, generator=g, dtype=F64)

    def a(self, s, z):
        s = _bt(s, z)
        return torch.sqrt((1 - s) ** 2 * self.std**2 + s**2)

    def u(self, z, r, t, cond=None):
        """Exact average velocity (module docstring)."""
        at, ar = self.a(t, z), self.a(r, z)
        tb, rb = _bt(t, z), _bt(r, z)
        k = ((tb + rb) - self.std**2 * (2 - tb - rb)) / (at + ar)
        return -self.mu + k / at * (z - (1 - tb) * self.mu)

    def posterior_velocity(self, z, t):
        """E[eps - x | z_t = z] by Gaussian conditioning."""
        tb = _bt(t, z)
        a2 = self.a(t, z) ** 2
        dev = z - (1 - tb) * self.mu
        return tb * dev / a2 - (self.mu + (1 - tb) * self.std**2 * dev / a2)

    def wan_teacher(self, x, timestep, cond):
        """Velocity network on Wan's scale (``timestep = 1000 t``)."""
        return self.posterior_velocity(x, timestep / 1000)


def _batch(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *SHAPE, generator=g, dtype=F64)
    eps = torch.randn(b, *SHAPE, generator=g, dtype=F64)
    t = 0.05 + 0.9 * torch.rand(b, generator=g, dtype=F64)
    r = t * torch.rand(b, generator=g, dtype=F64)
    r[0] = t[0]  # one flow-matching sample (r = t)
    return x, eps, r, t


def test_exact_u_at_r_eq_t_is_the_posterior_velocity():
    d = Gaussian()
    x, eps, _, t = _batch()
    z = rf_add_noise(x, eps, t)
    torch.testing.assert_close(d.u(z, t, t), d.posterior_velocity(z, t), atol=1e-12, rtol=1e-12)


def test_identity_residual_is_zero_for_the_exact_u():
    """Distillation from the exact marginal velocity: the target equals the exact u, loss 0 (p = 0: plain L2)."""
    d = Gaussian()
    x, eps, r, t = _batch()
    loss, diag = meanflow_objective(d.u, None, x, eps, r, t, None, teacher=d.wan_teacher, p=0.0)
    assert loss.shape == (6,) and not diag["nan"].any()
    assert loss.max() < 1e-24, loss
    assert (diag["du_norm"][1:] > 1e-3).all(), "du/dt ~ 0 would make the check vacuous"
    # a wrong u (the instantaneous velocity used as the average one) leaves a clear residual where r < t
    wrong = lambda z, r_, t_, c: d.u(z, t_, t_)  # noqa: E731
    loss_w, _ = meanflow_objective(wrong, None, x, eps, r, t, None, teacher=d.wan_teacher, p=0.0)
    assert loss_w[0] < 1e-24 and (loss_w[1:] > 1e-6).all()


def test_conditional_velocity_target_is_unbiased():
    """With v = eps - x the target is linear in v, and E[eps - x | z_t] is the marginal velocity: the
    target averaged over the posterior of (x, eps) given z_t equals the exact u (Monte Carlo, 4e4 draws)."""
    d = Gaussian()
    n = 40000
    g = torch.Generator().manual_seed(3)
    t = torch.full((n,), 0.7, dtype=F64)
    r = torch.full((n,), 0.2, dtype=F64)
    z = torch.randn(1, *SHAPE, generator=g, dtype=F64).expand(n, *SHAPE).contiguous()
    a2 = d.a(t[:1], z[:1]) ** 2
    m_x = d.mu + 0.3 * d.std**2 * (z[:1] - 0.3 * d.mu) / a2  # E[x | z_t]
    var_x = d.std**2 * 0.7**2 / a2  # Var[x | z_t]
    xs = m_x + var_x.sqrt() * torch.randn(n, *SHAPE, generator=g, dtype=F64)
    eps = (z - 0.3 * xs) / 0.7
    v = eps - xs
    _, du = meanflow_tangent(average_velocity_jvp_via_func(d.u), z, r, t, None, v)
    tgt = meanflow_target(v, du, r, t).mean(0)
    torch.testing.assert_close(tgt, d.u(z[:1], r[:1], t[:1])[0], atol=0.03, rtol=0)


def test_adapter_scales_times_and_tangents():
    d = Gaussian()
    net = lambda x, ts, rs, c: d.u(x, rs / 1000, ts / 1000)  # noqa: E731
    ad = MeanFlowAdapter(net, input_dtype=None)
    x, eps, r, t = _batch()
    z = rf_add_noise(x, eps, t)
    torch.testing.assert_close(ad(z, r, t, None), d.u(z, r, t), atol=1e-12, rtol=0)
    tz, tr, tt = torch.randn_like(z), torch.randn_like(r), torch.randn_like(t)
    u, du = ad.jvp(z, r, t, None, tz, tr, tt)
    ref_u, ref_du = torch.func.jvp(d.u, (z, r, t), (tz, tr, tt))
    torch.testing.assert_close(u, ref_u, atol=1e-12, rtol=0)
    torch.testing.assert_close(du, ref_du, atol=1e-10, rtol=1e-10)


def test_finite_difference_converges_to_the_exact_jvp():
    d = Gaussian()
    x, eps, r, t = _batch()
    z = rf_add_noise(x, eps, t)
    v = d.posterior_velocity(z, t)
    _, exact = meanflow_tangent(average_velocity_jvp_via_func(d.u), z, r, t, None, v)
    errs = {}
    for h in (4e-2, 2e-2, 1e-2, 5e-3, 2.5e-3, 1e-4):
        _, fd = meanflow_tangent(None, z, r, t, None, v, mode="fd", fd_eps=h, student=d.u)
        errs[h] = ((fd - exact).norm() / exact.norm()).item()
    print("MeanFlow FD tangent relative error:", {k: f"{e:.3e}" for k, e in errs.items()})
    for h in (2e-2, 1e-2, 5e-3, 2.5e-3):  # first order: halving h halves the error
        assert 0.4 < errs[h] / errs[2 * h] < 0.6, errs
    assert errs[1e-4] < 1e-3 and errs[5e-3] < 5e-2, errs


def test_objective_fd_mode_approaches_exact():
    d = Gaussian()
    x, eps, r, t = _batch()
    losses = [meanflow_objective(d.u, None, x, eps, r, t, None, teacher=d.wan_teacher, p=0.0, mode="fd",
                                 fd_eps=h)[0].sum().item() for h in (1e-2, 1e-3, 1e-4)]
    # the loss is the squared tangent error times (t - r)^2: it falls as h^2
    assert 80 < losses[0] / losses[1] < 120 and 80 < losses[1] / losses[2] < 120, losses


@pytest.mark.parametrize("times", [(1.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.8, 0.3, 0.0)])
def test_sampler_with_the_exact_u_gives_exact_samples(times):
    d = Gaussian()
    noise = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(4), dtype=F64)
    out = meanflow_sample(d.u, noise, None, times=times)
    torch.testing.assert_close(out, d.mu + d.std * noise, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="decreasing"):
        meanflow_sample(d.u, noise, None, times=(0.0, 1.0))


def test_time_pairs():
    s = LogitNormalPair(mean=-0.4, std=1.0, ratio_r_neq_t=0.25)
    r, t = s(20000, generator=torch.Generator().manual_seed(0))
    r2, t2 = s(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r, r2) and torch.equal(t, t2) and r.dtype == F64
    assert (r <= t).all() and (t < 1).all() and (r > 0).all()
    frac = (r < t).double().mean().item()
    assert abs(frac - 0.25) < 0.015, frac
    # t is the max of two logit-normals: P(t <= s) = Phi((logit s - mean) / std)^2
    s0 = 0.4
    q = torch.special.ndtr((torch.logit(torch.tensor(s0, dtype=F64)) + 0.4) / 1.0) ** 2
    assert abs((t <= s0).double().mean().item() - q.item()) < 0.015
    r0, t0 = LogitNormalPair(ratio_r_neq_t=0.0)(100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(r0, t0)
    with pytest.raises(ValueError):
        LogitNormalPair(ratio_r_neq_t=1.5)


def test_adaptive_weight_and_gradient():
    g = torch.Generator().manual_seed(5)
    u = torch.randn(4, 3, 5, generator=g, dtype=F64, requires_grad=True)
    tgt = torch.randn(4, 3, 5, generator=g, dtype=F64)
    for p, c in ((1.0, 1e-3), (0.5, 1e-2), (0.0, 1e-3)):
        loss, diag = meanflow_loss(u, tgt, p=p, c=c, loss_scale=2.0)
        mse = ((u - tgt) ** 2).mean((1, 2)).detach()
        torch.testing.assert_close(diag["sq_err"], mse)
        torch.testing.assert_close(diag["weight"], 1 / (mse + c) ** p)
        (grad,) = torch.autograd.grad(loss.sum(), u)
        ref = 2.0 * (1 / (mse + c) ** p)[:, None, None] * 2 * (u - tgt).detach() / 15  # sg(w): w has no grad
        torch.testing.assert_close(grad, ref, atol=1e-12, rtol=1e-12)
    assert not adaptive_weight(mse.requires_grad_(), p=1.0).requires_grad
    loss_sum, _ = meanflow_loss(u, tgt, p=0.0, reduce="sum")
    torch.testing.assert_close(loss_sum.detach(), ((u - tgt) ** 2).sum((1, 2)).detach())


def test_nan_samples_are_masked():
    u = torch.zeros(3, 4, dtype=F64, requires_grad=True)
    tgt = torch.ones(3, 4, dtype=F64)
    tgt[1, 2] = float("nan")
    loss, diag = meanflow_loss(u, tgt, p=0.0)
    assert diag["nan"].tolist() == [False, True, False] and loss[1] == 0 and torch.isfinite(loss).all()
    (grad,) = torch.autograd.grad(loss.sum(), u)
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()


def test_guided_velocity_and_objective_guidance():
    g = torch.Generator().manual_seed(6)
    v, uc, uu = (torch.randn(2, 5, generator=g, dtype=F64) for _ in range(3))
    torch.testing.assert_close(guided_velocity(v, uc, uu, omega=1.0), v)
    torch.testing.assert_close(guided_velocity(v, uc, uu, omega=2.0, kappa=0.5), 2 * v + 0.5 * uc - 1.5 * uu)
    # objective: the guided v uses the student's own u(z_t, t, t | c / ∅); with a cond-independent exact
    # student ṽ = ω (eps - x) + (1 - ω) v*, so the target is the ω-mix of the unguided and the exact one
    d = Gaussian()
    x, eps, r, t = _batch()
    loss, _ = meanflow_objective(d.u, None, x, eps, r, t, "c", "u", omega=1.0, p=0.0)
    loss_g, _ = meanflow_objective(d.u, None, x, eps, r, t, "c", "u", omega=0.5, p=0.0)
    torch.testing.assert_close(loss_g, 0.25 * loss, atol=1e-12, rtol=1e-9)
    with pytest.raises(ValueError, match="uncond"):
        meanflow_objective(d.u, None, x, eps, r, t, "c", omega=2.0)
    with pytest.raises(ValueError, match="r <= t"):
        meanflow_objective(d.u, None, x, eps, t, r, "c")
