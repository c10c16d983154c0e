"""Samplers (docs/losses.md, sampling): rCM few-step sampling with the exact consistency function, teacher Euler and
UniPC with the exact Gaussian velocity (closed-form flow map), convergence orders, CFG, golden UniPC values."""

import math

import pytest
import torch
from losses_gaussian import GaussianData

from rcm_losses.parameterization import TrigFlowAdapter
from rcm_losses.sampling import (
    DEFAULT_MID_T,
    flow_euler_sample,
    flow_sigmas,
    flow_unipc_sample,
    rcm_sample,
    rcm_sample_times,
)

F64 = torch.float64
G = GaussianData(mu=torch.tensor([0.5, -1.0, 0.0, 2.0], dtype=F64), std=torch.tensor([0.3, 1.0, 2.0, 0.7], dtype=F64))
EXACT = dict(input_dtype=None, timestep_dtype=None)  # float64 network inputs, unrounded timesteps


def noise(n, seed=0, d=4):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def assert_data_statistics(x, g, n):
    """Mean within 5 standard errors; variance within 5 standard errors (sqrt(2/n) relative); no correlation."""
    torch.testing.assert_close(x.mean(0), g.mu, rtol=0, atol=5 * g.std.max().item() / math.sqrt(n))
    torch.testing.assert_close(x.var(0) / g.std**2, torch.ones_like(g.std), rtol=0, atol=5 * math.sqrt(2 / n))
    corr = torch.corrcoef(x.T) - torch.eye(x.shape[1], dtype=F64)
    assert corr.abs().max() < 5 / math.sqrt(n)


def flow_map(x_s0, s0, g):
    """Exact PF-ODE endpoint of the RF flow from ``x_{s0}`` (Gaussian data)."""
    return g.mu + g.std * (x_s0 - (1 - s0) * g.mu) / torch.sqrt((1 - s0) ** 2 * g.std**2 + s0**2)


def test_rcm_one_step_is_exact():
    student = TrigFlowAdapter(G.rf_student, **EXACT)
    z = noise(2000)
    x = rcm_sample(student, z, None, generator=torch.Generator().manual_seed(1), num_steps=1, sigma_max=None)
    # from t = pi/2 the exact consistency function maps eps to mu + std eps, exactly
    torch.testing.assert_close(x, G.mu + G.std * z, rtol=1e-12, atol=1e-12)
    assert_data_statistics(x, G, 2000)


def test_rcm_four_steps_with_exact_consistency_function_keep_the_data_distribution():
    student = TrigFlowAdapter(G.rf_student, **EXACT)
    seen = []
    x = rcm_sample(student, noise(2000, 2), None, generator=torch.Generator().manual_seed(3), num_steps=4,
                   sigma_max=80.0, callback=seen.append)
    assert_data_statistics(x, G, 2000)
    assert [d["step"] for d in seen] == [0, 1, 2, 3] and seen[0]["t"] == math.atan(80.0)
    assert [d["t"] for d in seen[1:]] == list(DEFAULT_MID_T)
    assert torch.equal(seen[-1]["x"], x)


def test_rcm_start_and_fresh_noise():
    calls = []

    def den(x, t, cond):
        calls.append((x.clone(), t.clone()))
        return student(x, t, cond)

    student = TrigFlowAdapter(G.rf_student, **EXACT)
    z = noise(8, 4)
    rcm_sample(den, z, None, generator=torch.Generator().manual_seed(0), num_steps=2, sigma_max=80.0)
    t0 = math.atan(80.0)
    torch.testing.assert_close(calls[0][0], math.sin(t0) * z, rtol=0, atol=0)  # RF x = s0 eps, in TrigFlow form
    assert calls[1][1].tolist() == [1.5] * 8
    # the second input re-noises the first prediction with the generator's first float32 draw (not with z);
    # same float64 formula as add_noise, so only rounding differs (1e-14)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(F64)
    x0 = student(*calls[0], None).x0
    torch.testing.assert_close(calls[1][0], math.cos(1.5) * x0 + math.sin(1.5) * eps, rtol=1e-14, atol=1e-14)
    assert (eps - z).abs().max() > 0.1  # guard: the check above tells fresh noise from the start noise


def test_rcm_schedule():
    assert rcm_sample_times(4) == [math.atan(80.0), 1.5, 1.4, 1.0, 0.0]
    assert rcm_sample_times(1, sigma_max=None) == [math.pi / 2, 0.0]
    assert rcm_sample_times(2, mid_t=[1.3]) == [math.atan(80.0), 1.3, 0.0]
    with pytest.raises(ValueError, match="intermediate"):
        rcm_sample_times(3, mid_t=[1.3])
    with pytest.raises(ValueError, match="strictly decreasing"):
        rcm_sample_times(2, sigma_max=1.0)  # atan(1) = 0.785 < 1.5
    with pytest.raises(ValueError, match="sigma_max"):
        rcm_sample_times(2, sigma_max=-1.0)
    with pytest.raises(ValueError, match="num_steps"):
        rcm_sample_times(0)


def test_flow_sigmas():
    s = flow_sigmas(50, shift=5.0, sigma_max=5000.0)
    assert s.shape == (51,) and s.dtype == F64 and s[-1] == 0
    assert s[0].item() == pytest.approx(5000 / 5001, abs=1e-12)  # unshift then shift returns s_max
    assert (s[1:] < s[:-1]).all()
    assert flow_sigmas(4, shift=1.0, sigma_max=None).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    # u grid is uniform before the shift: u_i = unshift(s_i)
    u = s[:-1] / (5 - 4 * s[:-1])
    torch.testing.assert_close(u[:-1] - u[1:], torch.full((49,), u[0].item() / 50, dtype=F64), rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(0)


G_SMOOTH = GaussianData(mu=G.mu, std=torch.tensor([0.8, 1.0, 1.2, 0.9], dtype=F64))  # no stiff component


@pytest.mark.parametrize("sampler, steps, shift, rms", [(flow_unipc_sample, 50, 5.0, 0.01),  # teacher default
                                                        (flow_euler_sample, 100, 3.0, 0.03)])  # dataset builder
def test_flow_samplers_transport_noise_to_the_data_gaussian(sampler, steps, shift, rms):
    z = noise(2000, 5)
    x = sampler(G_SMOOTH.rf_teacher, z, None, num_steps=steps, shift=shift, **EXACT)  # sigma_max 5000
    s0 = 5000 / 5001
    # pointwise against the closed-form flow map (measured rms: UniPC 0.004, Euler 0.018)
    assert (x - flow_map(s0 * z, s0, G_SMOOTH)).pow(2).mean().sqrt() < rms
    assert_data_statistics(x, G_SMOOTH, 2000)


def test_unipc_is_second_order_and_euler_first():
    """Error against the closed-form flow map at N, 2N, 4N, 8N steps (shift 1, a well-conditioned Gaussian
    so that 16 steps are already in the asymptotic regime): UniPC ~4x smaller per doubling, Euler ~2x."""
    g = G_SMOOTH
    z = noise(16, 6)
    s0 = 80 / 81
    exact = flow_map(s0 * z, s0, g)
    for sampler, lo, hi in ((flow_unipc_sample, 1.8, 2.6), (flow_euler_sample, 0.9, 1.1)):
        errs = [(sampler(g.rf_teacher, z, None, num_steps=n, shift=1.0, sigma_max=80.0, **EXACT) - exact)
                .abs().max().item() for n in (16, 32, 64, 128)]
        orders = [math.log2(a / b) for a, b in zip(errs[:-1], errs[1:])]
        assert all(lo < o < hi for o in orders), (sampler.__name__, errs, orders)


# Recorded from diffusers 0.42.1 UniPCMultistepScheduler(solver_order=2, prediction_type="flow_prediction",
# use_flow_sigmas=True, predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")
# with its sigmas/timesteps replaced by flow_sigmas(N, shift=3, sigma_max=80), on the inputs built below.
UNIPC_GOLDEN = {
    6: [[1.1649478693943223, 0.382407195573724, -0.6085196589118151, -0.5500438472337649],
        [0.587396294344911, 1.2046424752752416, 0.6428621705750732, -0.3055207360672786]],
    7: [[1.1765430549294011, 0.38523127509549904, -0.6175139514308406, -0.5562737387517016],
        [0.5937748775696825, 1.2136738159400684, 0.6411748004046547, -0.31566317155433876]],
}


@pytest.mark.parametrize("n", [6, 7])
def test_unipc_matches_diffusers_golden(n):
    w = torch.sin(torch.arange(16, dtype=F64).reshape(4, 4)) * 0.5

    def vel(x, ts, cond):  # nonlinear in x and s, so every predictor/corrector term matters
        s = ts[:, None] / 1000
        return torch.tanh(x @ w) * (1 + s) + s * x - 0.3

    z = torch.cos(torch.arange(8, dtype=F64).reshape(2, 4) * 1.3)
    out = flow_unipc_sample(vel, z, None, num_steps=n, shift=3.0, sigma_max=80.0, **EXACT)
    torch.testing.assert_close(out, torch.tensor(UNIPC_GOLDEN[n], dtype=F64), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("sampler", [flow_euler_sample, flow_unipc_sample])
def test_cfg_and_network_inputs(sampler):
    seen = []
    g_u = GaussianData(mu=torch.zeros(4, dtype=F64), std=torch.ones(4, dtype=F64))

    def vel(x, ts, cond):
        seen.append((cond, x.dtype, ts.clone()))
        return G.rf_teacher(x, ts) if cond == "c" else g_u.rf_teacher(x, ts)

    def combined(x, ts, cond):
        vu = g_u.rf_teacher(x, ts)
        return vu + 3.0 * (G.rf_teacher(x, ts) - vu)

    z = noise(8, 7)
    out = sampler(vel, z, "c", "u", guidance=3.0, num_steps=5, **EXACT)
    assert [c for c, _, _ in seen] == ["c", "u"] * 5
    ref = sampler(combined, z, None, num_steps=5, **EXACT)
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)
    seen.clear()
    cb = []
    sampler(vel, z.float(), "c", num_steps=3, callback=cb.append)  # defaults: bf16 input, bf16 timesteps
    assert [c for c, _, _ in seen] == ["c"] * 3 and all(d == torch.bfloat16 for _, d, _ in seen)
    for _, _, ts in seen:
        assert torch.equal(ts, ts.to(torch.bfloat16).to(F64)) and ts.shape == (8,)
    assert [d["step"] for d in cb] == [0, 1, 2] and set(cb[0]) == {"step", "num_steps", "s", "x", "x0"}


def test_unipc_needs_finite_sigma_max():
    with pytest.raises(ValueError, match="finite sigma_max"):
        flow_unipc_sample(G.rf_teacher, noise(2), None, sigma_max=None)
    with pytest.raises(ValueError, match="finite sigma_max"):
        flow_unipc_sample(G.rf_teacher, noise(2), None, sigma_max=math.inf)
