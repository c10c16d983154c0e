"""DMD generator objective and the fake-score critic (docs/losses.md, dmd), float64."""

import pytest
import torch
from losses_gaussian import GaussianData, bt, standard_case

from rcm_losses.dmd import dmd_loss, dmd_objective, fake_score_loss, fake_score_objective
from rcm_losses.parameterization import TrigFlowAdapter, add_noise

F64 = torch.float64


def adapter(net):
    return TrigFlowAdapter(net, input_dtype=None, timestep_dtype=None)


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def w_norm(G, real):  # independent normalizer: per-sample mean absolute difference, clipped at 1e-5
    return torch.stack([(g - r).abs().mean() for g, r in zip(G, real)]).clamp_min(1e-5)


def test_gradient_wrt_generator_output():
    G = rand(3, 2, 4, 5, seed=1).requires_grad_(True)
    fake, real = rand(3, 2, 4, 5, seed=2), rand(3, 2, 4, 5, seed=3)
    loss, diag = dmd_loss(G, fake, real, loss_scale=2.5)
    loss.sum().backward()
    direction = (fake - real) / bt(w_norm(G.detach(), real), G)
    torch.testing.assert_close(G.grad, 2 * 2.5 * direction, rtol=1e-12, atol=1e-12)  # no 1/2, sum reduction
    torch.testing.assert_close(loss, 2.5 * direction.pow(2).flatten(1).sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(diag["w_n"], w_norm(G.detach(), real), rtol=1e-14, atol=0)
    assert loss.dtype == F64 and not diag["loss"].requires_grad


def test_normalizer_is_clipped():
    real = rand(2, 6, seed=4)
    G = real.clone().requires_grad_(True)
    loss, diag = dmd_loss(G, real + 1e-3, real)
    assert diag["w_n"].tolist() == [1e-5, 1e-5]
    loss.sum().backward()
    torch.testing.assert_close(G.grad, torch.full_like(G, 2 * 1e-3 / 1e-5), rtol=1e-9, atol=0)


def test_nan_samples_contribute_zero():
    G = rand(4, 3, 5, seed=5)
    fake, real = rand(4, 3, 5, seed=6), rand(4, 3, 5, seed=7)
    fake[1, 2, 3] = float("nan")  # NaN in the fake score of sample 1
    G[2, 0, 0] = float("nan")  # NaN in the generator output of sample 2
    Gg = G.clone().requires_grad_(True)
    loss, diag = dmd_loss(Gg, fake, real)
    loss.sum().backward()
    assert diag["nan"].tolist() == [False, True, True, False]
    assert loss[1] == 0 and loss[2] == 0
    assert torch.isfinite(Gg.grad).all() and Gg.grad[1:3].abs().max() == 0
    keep = [0, 3]
    ref, _ = dmd_loss(G[keep], fake[keep], real[keep])
    torch.testing.assert_close(loss[keep], ref, rtol=1e-14, atol=0)


def test_dmd_objective_composition():
    g_fake, g_real_c = standard_case(), standard_case()
    g_real_c.mu = -g_real_c.mu
    g_real_u = GaussianData(mu=torch.zeros_like(g_fake.mu), std=torch.ones_like(g_fake.std))
    fake, real_c, real_u = adapter(g_fake.rf_teacher), adapter(g_real_c.rf_teacher), adapter(g_real_u.rf_teacher)
    seen = []

    def teacher(x, t, cond):
        seen.append((cond, x.requires_grad, torch.is_grad_enabled()))
        return real_c(x, t, None) if cond == "c" else real_u(x, t, None)

    G = (0.5 * rand(3, *g_fake.mu.shape, seed=8)).requires_grad_(True)
    eps, t = rand(3, *g_fake.mu.shape, seed=9), torch.tensor([0.3, 0.9, 1.4], dtype=F64)
    loss, diag = dmd_objective(G, t, eps, fake, teacher, "c", "u", guidance=4.0, loss_scale=1.5)
    assert seen == [("c", False, False), ("u", False, False)]  # CFG teacher, no grad, detached input
    loss.sum().backward()
    x_d = add_noise(G.detach(), eps, t)
    x0_fake = g_fake.posterior_x0(x_d, t)
    pu, pc = g_real_u.posterior_x0(x_d, t), g_real_c.posterior_x0(x_d, t)
    x0_real = pu + 4.0 * (pc - pu)
    expected = 2 * 1.5 * (x0_fake - x0_real) / bt(w_norm(G.detach(), x0_real), G)
    torch.testing.assert_close(G.grad, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(diag["t"], t)


def test_critic_loss_zero_for_exact_score_of_point_mass():
    """Generator = point mass at mu: its exact denoiser returns mu for every x_t, so the loss is 0."""
    mu = standard_case().mu
    point = GaussianData(mu=mu, std=torch.zeros_like(mu))
    G = mu.expand(4, *mu.shape).clone()
    t = torch.tensor([0.2, 0.8, 1.2, 1.5], dtype=F64)
    loss, _ = fake_score_objective(G, t, rand(*G.shape, seed=10), adapter(point.rf_teacher), None)
    assert loss.abs().max() < 1e-24  # exact up to rounding of mu (values ~1, float64)
    wrong, _ = fake_score_objective(G, t, rand(*G.shape, seed=10), adapter(standard_case().rf_teacher), None)
    assert wrong.min() > 1e-3


def test_critic_loss_for_exact_score_of_gaussian_generator():
    """Generator ~ N(mu, s^2): the exact denoiser attains the minimum E[loss] = sum s^2 / V_t (V_t =
    cos^2 t s^2 + sin^2 t), the posterior variance over sin^2 t; any other denoiser does worse."""
    gauss = GaussianData(mu=torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64),
                         std=torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=F64))
    n, gen = 4000, torch.Generator().manual_seed(11)
    G = gauss.sample(n, gen)
    t = torch.full((n,), 0.9, dtype=F64)
    eps = torch.randn(G.shape, generator=gen, dtype=F64)
    loss, _ = fake_score_objective(G, t, eps, adapter(gauss.rf_teacher), None)
    expected = (gauss.std**2 / gauss.var_t(t[:1], G[:1])[0]).sum()
    # per sample the loss is a sum of scaled chi^2_1 terms; 4000 samples give ~1.5% standard error
    assert loss.mean().item() == pytest.approx(expected.item(), rel=0.06)
    # a denoiser off by +0.2 adds 0.2^2 / sin^2 t per element in expectation (the cross term averages out)
    biased, _ = fake_score_loss(G, gauss.posterior_x0(add_noise(G, eps, t), t) + 0.2, t)
    assert biased.mean() > loss.mean() + 0.5 * 4 * 0.2**2 / torch.sin(t[0]) ** 2


def test_critic_gradient_goes_to_fake_score_only():
    a = torch.tensor(1.0, dtype=F64, requires_grad=True)
    base = adapter(standard_case().rf_teacher)
    fake = lambda x, t, c: base(x * a, t, c)
    G = rand(2, *standard_case().mu.shape, seed=12).requires_grad_(True)
    t = torch.tensor([0.5, 1.0], dtype=F64)
    loss, diag = fake_score_objective(G, t, rand(*G.shape, seed=13), fake, None)
    loss.sum().backward()
    assert G.grad is None and a.grad is not None and a.grad.abs() > 0
    # the loss equals sum (G - x0_fake)^2 / sin^2 t, computed directly
    x0f = base(add_noise(G.detach(), rand(*G.shape, seed=13), t), t, None).x0
    ref = ((G.detach() - x0f) ** 2).flatten(1).sum(1) / torch.sin(t) ** 2
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(diag["loss"], ref, rtol=1e-12, atol=0)
