"""sCM and dCM objectives against closed-form Gaussian cases (docs/losses.md, consistency), float64."""

import pytest
import torch
from losses_gaussian import bt, forward_jvp_of, standard_case

from rcm_losses.consistency import (
    dcm_objective,
    scm_g,
    scm_loss,
    scm_objective,
    scm_student_tangent,
    scm_tangent,
    tangent_warmup_ratio,
)
from rcm_losses.parameterization import TrigFlowAdapter, add_noise, denoiser_jvp_via_func
from rcm_losses.timesteps import dcm_times

F64 = torch.float64
G = standard_case()


def adapter(net):
    # float64 end to end and exact timesteps, so closed forms hold to rounding error
    return TrigFlowAdapter(net, forward_jvp_of(net), input_dtype=None, timestep_dtype=None)


TEACHER = adapter(G.rf_teacher)
EXACT = adapter(G.rf_student)


def perturbed(delta=0.2):
    return adapter(lambda x, ts, c: G.rf_student(x, ts, c, delta=delta))


def setup(seed=0, batch=4):
    gen = torch.Generator().manual_seed(seed)
    x0 = G.sample(batch, gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=F64)
    t = torch.tensor([0.2, 0.7, 1.1, 1.5], dtype=F64)[:batch]
    return x0, eps, t, add_noise(x0, eps, t)


def raw_g(student, x_t, t, r=1.0):
    F_T = TEACHER(x_t, t, None).F
    with torch.no_grad():
        t_F = scm_student_tangent(student.jvp, x_t, t, None, F_T)
    return scm_g(student(x_t, t, None).F, F_T, t_F, x_t, t, r), F_T, t_F


def test_g_vanishes_for_exact_consistency_function():
    x0, eps, t, x_t = setup()
    g, _, _ = raw_g(EXACT, x_t, t)
    assert g.abs().max() < 1e-10  # exact f is constant along the exact ODE: df/dt = 0
    g_gen, _, _ = raw_g(TrigFlowAdapter(G.rf_student, input_dtype=None, timestep_dtype=None), x_t, t)
    assert g_gen.abs().max() < 1e-10  # same through the torch.func fallback JVP
    g_pert, _, _ = raw_g(perturbed(), x_t, t)
    assert g_pert.abs().max() > 1e-2  # guard: a wrong student gives a clearly nonzero g
    loss, diag = scm_objective(EXACT, EXACT.jvp, TEACHER, x0, eps, t, None, loss_scale=100.0)
    assert loss.abs().max() < 1e-15 and diag["g_norm"].max() < 1e-10
    # student_jvp=None picks the adapter's own JVP, and the torch.func fallback for a bare callable
    for student in (EXACT, lambda x, tt, c: EXACT(x, tt, c)):
        loss, _ = scm_objective(student, None, TEACHER, x0, eps, t, None)
        assert loss.abs().max() < 1e-15


def test_g_equals_cos_t_df_dt_for_perturbed_student():
    _, _, t, x_t = setup(1)
    student = perturbed(0.3)
    g, F_T, _ = raw_g(student, x_t, t)
    plain = TrigFlowAdapter(student.velocity, input_dtype=None, timestep_dtype=None)

    def f(x, tt):  # consistency function of the student
        return torch.cos(bt(tt, x)) * x - torch.sin(bt(tt, x)) * plain(x, tt, None).F

    _, dfdt = torch.func.jvp(f, (x_t, t), (F_T, torch.ones_like(t)))  # d/dt along dx/dt = F_T
    torch.testing.assert_close(g, torch.cos(bt(t, x_t)) * dfdt, rtol=1e-10, atol=1e-10)


def test_warmup_ratio_terms():
    _, _, t, x_t = setup(2)
    student = perturbed()
    F_T = TEACHER(x_t, t, None).F
    t_F = scm_student_tangent(student.jvp, x_t, t, None, F_T)
    F = student(x_t, t, None).F
    cos, sin = torch.cos(bt(t, x_t)), torch.sin(bt(t, x_t))
    # r = 0: first coefficient cos t, no x_t term, t_F unscaled
    torch.testing.assert_close(scm_g(F, F_T, t_F, x_t, t, 0.0), -cos * (F - F_T) - t_F, rtol=1e-13, atol=1e-13)
    # r = 1: first coefficient cos^2 t (sqrt(1 - sin^2) = cos for t in [0, pi/2])
    torch.testing.assert_close(scm_g(F, F_T, t_F, x_t, t, 1.0),
                               -cos**2 * (F - F_T) - cos * sin * x_t - t_F, rtol=1e-12, atol=1e-12)
    assert [tangent_warmup_ratio(i, 1000) for i in (0, 250, 1000, 5000)] == [0.0, 0.25, 1.0, 1.0]
    assert tangent_warmup_ratio(7, 0) == 1.0
    with pytest.raises(ValueError, match="warmup"):
        tangent_warmup_ratio(-1, 10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scm_g(F, F_T, t_F, x_t, t, 1.5)


def test_loss_gradient_is_minus_two_scale_g():
    _, _, t, x_t = setup(3)
    g, F_T, t_F = raw_g(perturbed(), x_t, t)
    F = perturbed()(x_t, t, None).F.detach().requires_grad_(True)
    loss, diag = scm_loss(F, F_T, t_F, x_t, t, loss_scale=100.0)
    loss.sum().backward()
    norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
    g_n = g / bt(norm + 0.1, g)  # per-sample L2 over all non-batch elements, + 0.1
    torch.testing.assert_close(F.grad, -2 * 100.0 * g_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, 100.0 * g_n.pow(2).flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(diag["g_norm"], norm, rtol=1e-12, atol=0)
    assert loss.dtype == F64 and not diag["loss"].requires_grad


def test_nan_samples_contribute_nothing():
    _, _, t, x_t = setup(4)
    g, F_T, t_F = raw_g(perturbed(), x_t, t)
    F = perturbed()(x_t, t, None).F.detach()
    F[1, 0, 0, 0, 0] = float("nan")  # NaN in the student output of sample 1
    t_F = t_F.clone()
    t_F[2, 1, 1, 0, 1] = float("nan")  # NaN in g of sample 2
    Fg = F.clone().requires_grad_(True)
    loss, diag = scm_loss(Fg, F_T, t_F, x_t, t)
    loss.sum().backward()
    assert diag["nan"].tolist() == [False, True, True, False]
    assert loss[1] == 0 and loss[2] == 0 and torch.isfinite(loss).all()
    assert torch.isfinite(Fg.grad).all() and Fg.grad[1].abs().max() == 0 and Fg.grad[2].abs().max() == 0
    keep = [0, 3]  # the other samples are unaffected
    ref, _ = scm_loss(F[keep], F_T[keep], t_F[keep], x_t[keep], t[keep])
    torch.testing.assert_close(loss[keep], ref, rtol=1e-14, atol=0)


@pytest.mark.parametrize("fd_type", [1, 2])
def test_finite_difference_variants_approximate_the_jvp(fd_type):
    _, _, t, x_t = setup(5)
    student = perturbed()
    F_T = TEACHER(x_t, t, None).F
    exact = scm_student_tangent(student.jvp, x_t, t, None, F_T)
    approx = scm_student_tangent(student.jvp, x_t, t, None, F_T, fd_type=fd_type, fd_size=1e-4, student=student)
    # first-order finite differences: error O(h) * second derivatives, ~1e-4 relative here
    err = (approx - exact).abs().max() / exact.abs().max()
    assert err < 1e-3
    coarse = scm_student_tangent(student.jvp, x_t, t, None, F_T, fd_type=fd_type, fd_size=1e-2, student=student)
    assert (coarse - exact).abs().max() / exact.abs().max() > 5 * err  # and it is an O(h) approximation


def test_tangent_variant_validation():
    _, _, t, x_t = setup()
    F_T = TEACHER(x_t, t, None).F
    with pytest.raises(ValueError, match="fd_type"):
        scm_student_tangent(EXACT.jvp, x_t, t, None, F_T, fd_type=3)
    with pytest.raises(ValueError, match="student="):
        scm_student_tangent(EXACT.jvp, x_t, t, None, F_T, fd_type=1)
    with pytest.raises(ValueError, match="fd_size"):
        scm_student_tangent(EXACT.jvp, x_t, t, None, F_T, fd_type=2, fd_size=0.0, student=EXACT)


def test_scm_tangent_is_scaled():
    F_T = torch.randn(3, 5, dtype=F64)
    t = torch.tensor([0.1, 0.8, 1.5], dtype=F64)
    tx, tt = scm_tangent(F_T, t)
    torch.testing.assert_close(tt, torch.cos(t) * torch.sin(t))
    torch.testing.assert_close(tx, (torch.cos(t) * torch.sin(t))[:, None] * F_T)


def test_scm_objective_with_cfg_and_grad():
    x0, eps, t, x_t = setup(6)
    w = 3.0
    a = torch.tensor(0.2, dtype=F64, requires_grad=True)  # a "parameter" of the student
    net = lambda x, ts, c: G.rf_student(x, ts, c, delta=a)
    student = TrigFlowAdapter(net, input_dtype=None, timestep_dtype=None)
    uncond_g = standard_case((2, 3, 2, 2))
    uncond_g.mu = uncond_g.mu * 0.5

    def teacher(x, tt, cond):
        return TEACHER(x, tt, None) if cond == "c" else adapter(uncond_g.rf_teacher)(x, tt, None)

    loss, diag = scm_objective(student, denoiser_jvp_via_func(student), teacher, x0, eps, t, "c", "u",
                               guidance=w, r=0.5, loss_scale=10.0)
    # reference composition by hand
    with torch.no_grad():
        Fc, Fu = teacher(x_t, t, "c").F, teacher(x_t, t, "u").F
        F_T = Fu + w * (Fc - Fu)
        _, t_F = torch.func.jvp(lambda x, tt: student(x, tt, None).F, (x_t, t), scm_tangent(F_T, t))
    ref, _ = scm_loss(student(x_t, t, None).F, F_T, t_F, x_t, t, r=0.5, loss_scale=10.0)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(diag["t"], t) and loss.requires_grad
    loss.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad) and a.grad.abs() > 0


def test_dcm_converges_with_the_grid():
    """Exact teacher and exact student: the only mismatch is the teacher's Euler step, O(h^2) in x,
    so the loss (a squared error) falls ~16x when the grid step halves."""
    x0, eps, _, _ = setup(7)
    u = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=F64)
    losses = []
    for n in (48, 96):
        times = dcm_times(u, total_steps=n, skip_steps=1, shift=5.0)
        loss, diag = dcm_objective(EXACT, TEACHER, x0, eps, times, None, loss_scale=100.0)
        assert not diag["nan"].any()
        losses.append(loss)
    ratio = losses[0] / losses[1]
    assert ((ratio > 12) & (ratio < 20)).all(), ratio
    assert losses[0].max() < 1e-3  # and small in absolute terms


def test_dcm_gradient_flows_only_through_the_prediction():
    x0, eps, _, _ = setup(8)
    a = torch.tensor(0.3, dtype=F64, requires_grad=True)
    student = TrigFlowAdapter(lambda x, ts, c: G.rf_student(x, ts, c, delta=a), input_dtype=None,
                              timestep_dtype=None)
    times = dcm_times(torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=F64), total_steps=8, skip_steps=2)
    loss, _ = dcm_objective(student, TEACHER, x0, eps, times, None, loss_scale=1.0)
    (grad,) = torch.autograd.grad(loss.sum(), a)
    # reference: same computation with the target built from a detached copy of the parameter
    x = add_noise(x0, eps, times[0])
    x0_hat = student(x, times[0], None).x0
    with torch.no_grad():
        for k in range(2):
            x = x - bt(times[k] - times[k + 1], x) * TEACHER(x, times[k], None).F
        target = student(x, times[-1], None).x0
    (ref,) = torch.autograd.grad((x0_hat - target).pow(2).sum(), a)
    torch.testing.assert_close(grad, ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="dCM times"):
        dcm_objective(student, TEACHER, x0, eps, times[:1], None)
