"""Backward simulation (docs/losses.md, rollout): reproducibility, time grid, fresh noise, gradient only at the end."""

import math

import pytest
import torch

from rcm_losses.parameterization import TrigFlowPrediction
from rcm_losses.rollout import backward_simulation, denoise_chain, rollout_times, simulation_steps
from rcm_losses.timesteps import UniformShift

F64 = torch.float64
SHAPE = (3, 2, 4)


class Recorder:
    """Denoiser ``x0 = a tanh(x) + 0.1 cos(t)`` that records whether grad was on at each call."""

    def __init__(self):
        self.a = torch.tensor(0.8, requires_grad=True)
        self.grad_on, self.xs, self.ts = [], [], []

    def __call__(self, x, t, cond):
        self.grad_on.append(torch.is_grad_enabled())
        self.xs.append(x.detach().clone())
        self.ts.append(t.clone())
        x0 = self.a * torch.tanh(x) + 0.1 * torch.cos(t).reshape(-1, 1, 1)
        return TrigFlowPrediction(x0=x0, F=torch.zeros_like(x0))


def run(seed=0, n=4, **kw):
    den = Recorder()
    kw.setdefault("time_sampler", UniformShift(5.0))
    out = backward_simulation(den, None, SHAPE, n_steps=n, generator=torch.Generator().manual_seed(seed), **kw)
    return den, out


def test_reproducible_with_a_fixed_generator():
    _, a = run(0)
    _, b = run(0)
    _, c = run(1)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.times, b.times)
    assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))
    assert not torch.equal(a.x0, c.x0) and not torch.equal(a.times, c.times)


def test_does_not_touch_global_rng():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    run(0)
    assert torch.equal(torch.get_rng_state(), state)


def test_time_grid():
    _, out = run(2, n=4)
    t = out.times
    assert t.shape == (5, 3) and t.dtype == F64
    assert (t[0] == math.pi / 2).all()  # exactly pure noise
    assert (t[-1] == 0).all()
    assert (t[1:] <= t[:-1]).all()  # non-increasing per sample
    # the running minimum: with many steps and samples some draws exceed the previous time and are capped
    big = rollout_times(8, 256, generator=torch.Generator().manual_seed(0), time_sampler=UniformShift(5.0))
    assert (big[1:] <= big[:-1]).all() and (big[2:-1] == big[1:-2]).any()
    fixed = rollout_times(4, 2, fixed=(1.5, 1.4, 1.0))
    assert fixed[:, 0].tolist() == [math.pi / 2, 1.5, 1.4, 1.0, 0.0]
    assert rollout_times(2, 2, fixed=(1.5, 1.4, 1.0))[:, 1].tolist() == [math.pi / 2, 1.5, 0.0]
    assert rollout_times(1, 2, fixed=(1.5,))[:, 1].tolist() == [math.pi / 2, 0.0]


def test_first_input_is_the_initial_noise_and_renoising_is_fresh():
    den, out = run(4, n=4)
    eps0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    assert torch.equal(out.inputs[0], eps0)  # x at t = pi/2 is pure noise, no scaling
    noises = []
    for i in range(3):  # recover eps_i from x_{i+1} = cos t x0_hat_i + sin t eps_i
        t = out.times[i + 1].reshape(-1, 1, 1)
        noises.append((out.inputs[i + 1] - torch.cos(t) * out.predictions[i]) / torch.sin(t))
    for i, e in enumerate(noises):
        assert (e - eps0).abs().max() > 0.1, "re-noise reused the initial noise"
        for f in noises[:i]:
            assert (e - f).abs().max() > 0.1, "re-noise reused an earlier noise"
    assert [t[0].item() for t in den.ts] == out.times[:-1, 0].tolist()


@pytest.mark.parametrize("n", [1, 3])
def test_gradient_only_through_last_call(n):
    den, out = run(5, n=n)
    assert den.grad_on == [False] * (n - 1) + [True]
    assert out.x0.requires_grad and out.x0.dtype == torch.float32
    assert not any(p.requires_grad for p in out.predictions)
    out.x0.sum().backward()
    # only the last call contributes: d/da sum(a tanh(x_last)) = sum tanh(x_last)
    torch.testing.assert_close(den.a.grad, torch.tanh(den.xs[-1]).sum().float(), rtol=1e-5, atol=1e-5)


def test_no_grad_rollout():
    den, out = run(6, n=3, with_grad=False)
    assert den.grad_on == [False, False, False] and not out.x0.requires_grad


def test_fixed_times_rollout_uses_them():
    den, out = run(7, n=3, time_sampler=None, fixed=(1.5, 1.4, 1.0))
    assert [t[0].item() for t in den.ts] == [math.pi / 2, 1.5, 1.4]


def test_denoise_chain_with_given_noises():
    den = Recorder()
    x = torch.randn(SHAPE)
    times = rollout_times(3, 3, fixed=(1.2, 0.5))
    noises = [torch.full(SHAPE, 0.5), torch.full(SHAPE, -0.5)]
    out = denoise_chain(den, x, times, None, noises=noises)
    for i in range(2):
        t = times[i + 1].reshape(-1, 1, 1)
        torch.testing.assert_close(out.inputs[i + 1], torch.cos(t) * out.predictions[i] + torch.sin(t) * noises[i])


def test_simulation_steps_cycle():
    assert [simulation_steps(i) for i in range(9)] == [1, 2, 3, 4, 1, 2, 3, 4, 1]
    assert simulation_steps(5, max_steps=1) == 1


def test_bad_arguments():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="exactly one"):
        rollout_times(2, 2, generator=g)
    with pytest.raises(ValueError, match="exactly one"):
        rollout_times(2, 2, generator=g, time_sampler=UniformShift(5.0), fixed=(1.0,))
    with pytest.raises(ValueError, match="need 3 fixed times"):
        rollout_times(4, 2, fixed=(1.5,))
    with pytest.raises(ValueError, match="generator"):
        rollout_times(2, 2, time_sampler=UniformShift(5.0))
    with pytest.raises(ValueError, match="n_steps"):
        rollout_times(0, 2, fixed=())
    with pytest.raises(ValueError, match="generator"):
        denoise_chain(Recorder(), torch.zeros(SHAPE), rollout_times(2, 3, fixed=(1.0,)), None)
    with pytest.raises(ValueError, match="noise tensors"):
        denoise_chain(Recorder(), torch.zeros(SHAPE), rollout_times(3, 3, fixed=(1.0, 0.5)), None, noises=[])
    with pytest.raises(ValueError, match="times must be"):
        denoise_chain(Recorder(), torch.zeros(SHAPE), torch.zeros(3, 2), None, generator=g)
    with pytest.raises(ValueError, match="max_steps"):
        simulation_steps(3, max_steps=0)
