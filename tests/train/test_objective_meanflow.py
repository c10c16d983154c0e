"""The MeanFlow objective binding (rcm_train.objectives.meanflow): a few steps learn the exact average
velocity of Gaussian data (closed form, tests/losses/test_meanflow.py), and one step runs on a tiny
MeanFlowWanDiT through its forward_jvp (exact) and through the finite difference."""

import pytest
import torch
from torch import nn

from rcm_train.objectives.meanflow import MeanFlowObjective, MeanFlowObjectiveConfig
from rcm_train.trainer import OptimizerConfig, ScheduleConfig, StepContext, build_optimizer, train_step

F64 = torch.float64
D = 4
NSTEPS = 300


class _MLP(nn.Module):
    """u(z, r, t) for flat samples [B, D]; Wan-scale timesteps in, as the student contract."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(D + 2, 64, dtype=F64), nn.SiLU(), nn.Linear(64, 64, dtype=F64), nn.SiLU(),
                               nn.Linear(64, D, dtype=F64))

    def forward(self, x, t, context, *, r):
        return self.f(torch.cat([x, t[:, None] / 1000, r[:, None] / 1000], 1))


def _exact(mu, std):
    def a(s):
        return torch.sqrt((1 - s[:, None]) ** 2 * std**2 + s[:, None] ** 2)

    def u(z, r, t):
        k = ((t + r)[:, None] - std**2 * (2 - t - r)[:, None]) / (a(t) + a(r))
        return -mu + k / a(t) * (z - (1 - t[:, None]) * mu)

    return u


def _ctx(it, seed=0):
    return StepContext("student", it, it, ScheduleConfig(), torch.Generator().manual_seed(seed * 1000 + it))


def test_a_few_steps_learn_the_exact_average_velocity():
    torch.manual_seed(0)
    mu, std = torch.tensor([1.0, -0.5, 0.3, 2.0], dtype=F64), torch.tensor([0.5, 1.0, 0.3, 0.8], dtype=F64)
    u_star = _exact(mu, std)
    teacher = lambda x, ts, c: u_star(x, ts / 1000, ts / 1000)  # noqa: E731  exact marginal velocity
    net = _MLP()
    obj = MeanFlowObjective(MeanFlowObjectiveConfig(p=0.0, ratio_r_neq_t=0.5, input_dtype=None))
    opt = {"student": build_optimizer(net, OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0,
                                                           betas=(0.9, 0.99)))}
    g = torch.Generator().manual_seed(9)
    t = torch.rand(512, generator=g, dtype=F64)
    r = t * torch.rand(512, generator=g, dtype=F64)
    x_eval, eps_eval = mu + std * torch.randn(512, D, generator=g, dtype=F64), torch.randn(512, D, generator=g, dtype=F64)
    z = (1 - t[:, None]) * x_eval + t[:, None] * eps_eval  # evaluate where z_t lives

    def err():
        with torch.no_grad():
            return (net(z, 1000 * t, None, r=1000 * r) - u_star(z, r, t)).square().mean().item()

    e0, losses = err(), []
    for it in range(NSTEPS):
        x = mu + std * torch.randn(128, D, generator=g, dtype=F64)
        out = train_step({"student": net, "teacher": teacher}, [{"latent": x, "embed": torch.zeros(128, 1, 1)}],
                         opt, obj, _ctx(it))
        losses.append(out["meanflow/loss"])
    e1 = err()
    assert e1 < 0.1 * e0, (e0, e1)
    assert sum(losses[-10:]) < 0.1 * sum(losses[:10]), (losses[:10], losses[-10:])


@pytest.mark.parametrize("jvp", ["exact", "fd"])
def test_one_step_on_a_tiny_meanflow_dit(jvp):
    from rcm_nets.wan import WanDiT
    from rcm_nets.wan.meanflow import MeanFlowWanDiT

    torch.manual_seed(1)
    teacher = WanDiT.from_config("tiny", num_layers=1)
    teacher.init_weights()
    with torch.no_grad():
        teacher.head.head.weight.normal_(std=0.02)
    student = MeanFlowWanDiT.from_config("tiny", num_layers=1)
    student.load_teacher(teacher.state_dict())
    calls = []
    jvp_fn = student.forward_jvp
    student.forward_jvp = lambda *a, **k: calls.append(1) or jvp_fn(*a, **k)
    cfg = student.config
    batch = {"latent": torch.randn(2, cfg.in_dim, 1, 4, 4), "embed": torch.randn(2, 3, cfg.text_dim)}
    obj = MeanFlowObjective(MeanFlowObjectiveConfig(jvp=jvp, ratio_r_neq_t=1.0, input_dtype="float32"),
                            negative_embed=torch.zeros(3, cfg.text_dim))
    opt = {"student": build_optimizer(student, OptimizerConfig(warmup_steps=0))}
    out = train_step({"student": student, "teacher": teacher}, [batch], opt, obj, _ctx(0))
    assert torch.isfinite(torch.tensor(out["meanflow/loss"])) and out["meanflow/loss"] > 0
    assert out["grad_norm/student"] > 0
    assert len(calls) == (1 if jvp == "exact" else 0)
    assert student.interval_embedding[2].weight.abs().max() > 0, "the zero-initialised Linear moved"


def test_adapter_over_meanflow_dit_fd_matches_exact_jvp_in_float64():
    """The binding's adapter drives forward_jvp with the right scales: the forward difference converges to
    the exact JVP at first order. (Wan's time sinusoid reaches 1 rad per timestep, i.e. 1000 rad per unit of RF
    time, so d²u/dt² is large and h must be tiny here; docs/meanflow.md, finite difference.)"""
    from rcm_losses.meanflow import meanflow_tangent
    from rcm_nets.wan.meanflow import MeanFlowWanDiT
    from rcm_train.objectives.meanflow import meanflow_adapter

    torch.manual_seed(4)
    net = MeanFlowWanDiT.from_config("tiny", num_layers=1, dtype=F64)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    u = meanflow_adapter(net, None)
    z, v = torch.randn(2, 16, 1, 4, 4, dtype=F64), torch.randn(2, 16, 1, 4, 4, dtype=F64)
    t, r, ctx = torch.tensor([0.8, 0.5], dtype=F64), torch.tensor([0.3, 0.1], dtype=F64), torch.randn(2, 3, 32, dtype=F64)
    with torch.no_grad():
        _, exact = meanflow_tangent(u.jvp, z, r, t, ctx, v)
        err = {}
        for h in (1e-6, 1e-7):
            _, fd = meanflow_tangent(None, z, r, t, ctx, v, mode="fd", fd_eps=h, student=u)
            err[h] = ((fd - exact).norm() / exact.norm()).item()
    assert exact.abs().max() > 1e-2
    assert 8 < err[1e-6] / err[1e-7] < 12 and err[1e-7] < 1e-4, err
