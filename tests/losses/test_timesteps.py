"""Training-time samplers (docs/losses.md, timesteps): distributions, dtypes, generator discipline."""

import math

import pytest
import torch

from rcm_losses.parameterization import trig_to_rf, trig_to_sigma, unshift_rf
from rcm_losses.timesteps import LogNormal, UniformShift, dcm_times, fixed_times, sample_dcm_u

N = 20000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_lognormal_distribution():
    t = LogNormal(0.7, 1.6)(N, generator=gen())
    assert t.dtype == torch.float64 and t.shape == (N,)
    assert ((t >= 0) & (t <= math.pi / 2)).all()
    log_sigma = torch.log(trig_to_sigma(t))
    # standard errors: mean 1.6/sqrt(N) = 0.011, std ~ 1.6/sqrt(2N) = 0.008; 5 sigma bounds
    assert log_sigma.mean().item() == pytest.approx(0.7, abs=0.06)
    assert log_sigma.std().item() == pytest.approx(1.6, abs=0.04)
    # docs/losses.md, timesteps median of p_G(0.7): sigma ~ 2.01, t ~ 1.11
    assert t.median().item() == pytest.approx(math.atan(math.exp(0.7)), abs=0.02)


def test_uniform_shift_distribution():
    t = UniformShift(5.0)(N, generator=gen())
    assert t.dtype == torch.float64 and t.shape == (N,)
    u = unshift_rf(trig_to_rf(t), 5.0)
    # u ~ U[0,1): mean 0.5 +- 0.002 (1 std); quartiles too
    assert u.min() >= 0 and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.012)
    assert torch.quantile(u, 0.25).item() == pytest.approx(0.25, abs=0.015)
    assert trig_to_rf(t).median().item() == pytest.approx(0.833, abs=0.005)  # s_median = 0.833
    # shift <= 0 is the identity: plain uniform RF time
    s = trig_to_rf(UniformShift(0.0)(N, generator=gen()))
    assert s.mean().item() == pytest.approx(0.5, abs=0.012)


@pytest.mark.parametrize("sampler", [LogNormal(-0.8, 1.6), UniformShift(5.0)])
def test_samplers_use_only_the_generator(sampler):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = sampler(7, generator=gen(5))
    assert torch.equal(torch.get_rng_state(), state), "sampler touched the global RNG"
    assert torch.equal(a, sampler(7, generator=gen(5)))
    assert not torch.equal(a, sampler(7, generator=gen(6)))


def test_sampler_validation():
    with pytest.raises(ValueError, match="p_std"):
        LogNormal(0.0, -1.0)
    with pytest.raises(ValueError, match="batch"):
        UniformShift(5.0)(0, generator=gen())


def test_fixed_times():
    t = fixed_times([1.5, 1.4, 1.0], 4)
    assert t.shape == (3, 4) and t.dtype == torch.float64
    assert t[:, 2].tolist() == [1.5, 1.4, 1.0]
    with pytest.raises(ValueError, match=r"\[0, pi/2\]"):
        fixed_times([1.6], 2)
    with pytest.raises(ValueError, match="flat"):
        fixed_times([[1.0]], 2)


def test_dcm_times():
    u = sample_dcm_u(1000, generator=gen(), total_steps=48, skip_steps=2)
    assert u.dtype == torch.float64 and u.min() >= 0 and u.max() < 1 - 2 / 48
    t = dcm_times(u, total_steps=48, skip_steps=2, shift=5.0)
    assert t.shape == (3, 1000)
    assert (t[:-1] > t[1:]).all()  # t_0 > t_1 > t_2
    # t_k = atan(s / (1 - s)) with s = shift(1 - u - k/48; 5), checked at one sample by hand
    s = 1 - (u[0].item() + 1 / 48)
    s = 5 * s / (1 + 4 * s)
    assert t[1, 0].item() == pytest.approx(math.atan(s / (1 - s)), rel=1e-12)
    with pytest.raises(ValueError, match="skip_steps"):
        dcm_times(u, total_steps=4, skip_steps=4)
    with pytest.raises(ValueError, match="every t_k > 0"):
        dcm_times(torch.tensor([0.99], dtype=torch.float64), total_steps=48, skip_steps=1)
    with pytest.raises(ValueError, match="skip_steps"):
        sample_dcm_u(2, generator=gen(), total_steps=4, skip_steps=0)
