"""Time conversions, the RF -> TrigFlow adapter and its JVP (docs/losses.md, parameterization)."""

import math

import pytest
import torch
from losses_gaussian import GaussianData, bt, forward_jvp_of, standard_case

from rcm_losses import parameterization as P

F64 = torch.float64


def test_conversions_round_trip():
    # float64 round trips are exact up to a few ulps of the larger quantity (tolerance 1e-12 relative)
    sigma = torch.logspace(-3, 3, 61, dtype=F64)
    s = torch.linspace(0.0, 0.999, 101, dtype=F64)
    t = torch.linspace(0.0, math.pi / 2 - 1e-3, 101, dtype=F64)
    torch.testing.assert_close(P.rf_to_sigma(P.sigma_to_rf(sigma)), sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(P.trig_to_sigma(P.sigma_to_trig(sigma)), sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(P.trig_to_rf(P.rf_to_trig(s)), s, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(P.rf_to_trig(P.trig_to_rf(t)), t, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(P.sigma_to_trig(P.rf_to_sigma(s)), P.rf_to_trig(s), rtol=1e-12, atol=1e-15)
    for a in (0.5, 3.0, 5.0):
        torch.testing.assert_close(P.unshift_rf(P.shift_rf(s, a), a), s, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(P.shift_rf(P.unshift_rf(s, a), a), s, rtol=1e-12, atol=1e-15)
    for a in (0.0, -1.0):  # shift <= 0 is the identity both ways
        assert torch.equal(P.shift_rf(s, a), s) and torch.equal(P.unshift_rf(s, a), s)


def test_endpoints():
    one = torch.ones(1, dtype=F64)
    assert P.rf_to_trig(one).item() == math.pi / 2  # exactly pure noise
    assert torch.isfinite(P.rf_to_sigma(one)).all()  # clamped to 1 - eps(fp64): sigma ~ 4.5e15
    assert P.rf_to_sigma(one).item() == pytest.approx(1 / torch.finfo(F64).eps, rel=1e-6)
    c = P.trigflow_scalings(torch.full((1,), math.pi / 2, dtype=F64))
    assert (c.c_in.item(), c.c_noise.item(), c.c_skip.item(), c.c_out.item()) == (1.0, 1000.0, 1.0, -1.0)


# docs/losses.md, parameterization "handy values": t -> sigma, RF s, 1000 s, to the digits printed there
HANDY = [(1.5, 14.10, 0.9338, 933.8), (1.4, 5.80, 0.8529, 852.9), (1.3, 3.60, 0.7827, 782.7),
         (1.0, 1.557, 0.6090, 609.0), (0.6, 0.684, 0.4062, None)]
HANDY_SIGMA = [(80, 1.55830, 0.98765), (120, 1.56246, 0.99174), (200, 1.56580, 0.99502), (1600, None, 0.99938)]


@pytest.mark.parametrize("t, sigma, s, ts", HANDY)
def test_handy_values_from_t(t, sigma, s, ts):
    tt = torch.tensor([t], dtype=F64)
    assert P.trig_to_sigma(tt).item() == pytest.approx(sigma, abs=6e-3)  # printed to 3-4 significant digits
    assert P.trig_to_rf(tt).item() == pytest.approx(s, abs=6e-5)
    if ts is not None:
        assert P.trigflow_scalings(tt).c_noise.item() == pytest.approx(ts, abs=6e-2)


@pytest.mark.parametrize("sigma, t, s", HANDY_SIGMA)
def test_handy_values_from_sigma(sigma, t, s):
    tt = P.sigma_to_trig(torch.tensor([float(sigma)], dtype=F64))
    if t is not None:
        assert tt.item() == pytest.approx(t, abs=6e-6)
    assert P.trig_to_rf(tt).item() == pytest.approx(s, abs=6e-6)
    assert P.sigma_to_rf(torch.tensor([float(sigma)], dtype=F64)).item() == pytest.approx(s, abs=6e-6)


def test_bf16_timestep_rounding():
    ts = torch.tensor([933.78, 987.65, 999.3], dtype=F64)
    assert P.round_timestep(ts, torch.bfloat16).tolist() == [932.0, 988.0, 1000.0]  # docs/losses.md, parameterization [verified]
    assert torch.equal(P.round_timestep(ts, None), ts)


def test_scalings_jvp_matches_func_jvp():
    t = torch.linspace(0.05, 1.55, 17, dtype=F64)
    dt = torch.cos(t) * torch.sin(t)  # the sCM tangent
    c, dc = P.trigflow_scalings_jvp(t, dt)
    _, ref = torch.func.jvp(lambda u: tuple(P.trigflow_scalings(u)), (t,), (dt,))
    for a, b in zip(dc, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # spec's explicit form of the timestep tangent
    torch.testing.assert_close(dc.c_noise, 1000 * dt / (torch.cos(t) + torch.sin(t)) ** 2, rtol=1e-13, atol=0)


def test_adapter_recovers_exact_posterior():
    g = standard_case()
    gen = torch.Generator().manual_seed(1)
    x0 = g.sample(3, gen)
    t = torch.tensor([0.3, 1.0, 1.5], dtype=F64)
    x_t = P.add_noise(x0, torch.randn(x0.shape, generator=gen, dtype=F64), t)
    den = P.TrigFlowAdapter(g.rf_teacher, input_dtype=None, timestep_dtype=None)
    pred = den(x_t, t, None)
    assert pred.x0.dtype == F64 and pred.F.dtype == F64
    # float64 end to end; only rounding differences (1e-12)
    torch.testing.assert_close(pred.x0, g.posterior_x0(x_t, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pred.F, g.velocity(x_t, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cos(bt(t, x_t)) * x_t - torch.sin(bt(t, x_t)) * pred.F, pred.x0,
                               rtol=1e-12, atol=1e-12)


def test_adapter_network_inputs():
    seen = {}

    def net(x, ts, cond):
        seen.update(x=x, ts=ts, cond=cond)
        return torch.zeros_like(x)

    x_t = torch.randn(2, 2, 3, 2, 2, dtype=F64)
    t = torch.tensor([1.5, 1.0], dtype=F64)
    P.TrigFlowAdapter(net)(x_t, t, "ctx")  # defaults: bf16 input and bf16-rounded timestep
    assert seen["x"].dtype == torch.bfloat16 and seen["cond"] == "ctx"
    assert seen["ts"].shape == (2,) and seen["ts"].tolist() == [932.0, 608.0]  # 933.8 and 609.0 rounded to bf16
    P.TrigFlowAdapter(net)(x_t, t[:, None], "ctx")  # [B, 1] times give a [B] timestep too
    assert seen["ts"].shape == (2,)
    tf = torch.tensor([[1.5, 1.4, 1.0], [1.0, 0.6, 0.3]], dtype=F64)  # per-frame times [B, T]
    pred = P.TrigFlowAdapter(net, input_dtype=None, timestep_dtype=None)(x_t, tf, None)
    assert seen["ts"].shape == (2, 3) and seen["x"].dtype == F64
    c_skip = 1 / (torch.cos(tf) + torch.sin(tf))
    torch.testing.assert_close(pred.x0, x_t * c_skip[:, None, :, None, None])  # v = 0 => x0 = c_skip x_t
    with pytest.raises(ValueError, match="does not fit"):
        P.TrigFlowAdapter(net)(x_t, torch.zeros(2, 5, dtype=F64), None)
    with pytest.raises(ValueError, match="batch"):
        P.add_noise(x_t, x_t, torch.zeros(3, dtype=F64))


@pytest.mark.parametrize("rounding", [False, True])
def test_trigflow_jvp_matches_autodiff(rounding):
    """Explicit composition with a forward_jvp net == torch.func.jvp through the adapter."""
    g = standard_case()
    student = lambda x, ts, c: g.rf_student(x, ts, c, delta=0.3)
    dt = torch.bfloat16 if rounding else None
    ad = P.TrigFlowAdapter(student, forward_jvp_of(student), input_dtype=None, timestep_dtype=dt)
    gen = torch.Generator().manual_seed(2)
    x_t = torch.randn(3, *g.mu.shape, generator=gen, dtype=F64)
    t = torch.tensor([0.4, 1.1, 1.5], dtype=F64)
    tx, tt = torch.randn(x_t.shape, generator=gen, dtype=F64), torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    F, dF = ad.jvp(x_t, t, None, tx, tt)
    F_ref, dF_ref = P.denoiser_jvp_via_func(ad)(x_t, t, None, tx, tt)
    torch.testing.assert_close(F, ad(x_t, t, None).F, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(F, F_ref, rtol=1e-12, atol=1e-12)
    # without rounding the two paths are the same math (1e-10); with rounding the explicit path also
    # rounds the timestep tangent to bf16 (relative error <= 2^-8) while autodiff passes it through
    tol = dict(rtol=1e-2, atol=1e-2) if rounding else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dF, dF_ref, **tol)
    # the torch.func fallback for nets without forward_jvp gives the same as the explicit one
    F2, dF2 = P.TrigFlowAdapter(student, None, input_dtype=None, timestep_dtype=dt).jvp(x_t, t, None, tx, tt)
    torch.testing.assert_close(dF2, dF, rtol=1e-12, atol=1e-12)


def test_trigflow_jvp_casts_network_inputs():
    seen = {}

    def fjvp(x, ts, cond, tx, tts):
        seen.update(x=x, tx=tx, ts=ts, tts=tts)
        return torch.zeros_like(x), torch.zeros_like(tx)

    x_t = torch.randn(2, 4, dtype=F64)
    t = torch.tensor([1.0, 1.5], dtype=F64)
    P.trigflow_jvp(fjvp, x_t, t, None, x_t, torch.cos(t) * torch.sin(t))
    assert seen["x"].dtype == seen["tx"].dtype == torch.bfloat16
    assert seen["ts"].tolist() == [608.0, 932.0]
    assert torch.equal(seen["tts"], seen["tts"].to(torch.bfloat16).to(F64))  # tangent rounded to bf16 too


def test_cfg_denoise():
    calls = []

    def den(x, t, cond):
        calls.append(cond)
        k = 1.0 if cond == "c" else 3.0
        return P.TrigFlowPrediction(x0=k * x, F=-k * x)

    x, t = torch.ones(2, 3, dtype=F64), torch.ones(2, dtype=F64)
    out = P.cfg_denoise(den, x, t, "c", "u", 5.0)
    assert calls == ["c", "u"]
    torch.testing.assert_close(out.x0, (3 + 5 * (1 - 3)) * x)
    torch.testing.assert_close(out.F, -(3 + 5 * (1 - 3)) * x)
    calls.clear()
    assert torch.equal(P.cfg_denoise(den, x, t, "c", "u", 1.0).x0, x) and calls == ["c"]  # w <= 1: cond only
    calls.clear()
    P.cfg_denoise(den, x, t, "c", None, 5.0)
    assert calls == ["c"]


def test_gaussian_helper_is_consistent():
    """Guard the test oracle itself: f is constant along the exact PF-ODE (df/dt = 0)."""
    g = GaussianData(mu=torch.tensor([0.5, -1.0], dtype=F64), std=torch.tensor([0.3, 2.0], dtype=F64))
    x_t = torch.tensor([[0.2, 1.0], [-0.7, 0.4]], dtype=F64)
    t = torch.tensor([0.7, 1.3], dtype=F64)
    _, dfdt = torch.func.jvp(g.consistency, (x_t, t), (g.velocity(x_t, t), torch.ones_like(t)))
    assert dfdt.abs().max() < 1e-12
