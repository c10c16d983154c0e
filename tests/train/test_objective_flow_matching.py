"""The flow-matching objective (rcm_train.objectives.flow_matching)."""

import torch

from rcm_train.objectives.flow_matching import FlowMatchingConfig, FlowMatchingObjective
from rcm_train.trainer import ScheduleConfig, StepContext


class _Oracle(torch.nn.Module):
    """Knows x0: returns the exact RF velocity (x_s - x0) / s = eps - x0, and records its inputs."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.calls = x0, []

    def forward(self, x_s, timestep, context):
        self.calls.append((timestep, context))
        s = (timestep / 1000.0)[:, None, :, None, None]  # per-frame times [B, T]
        return (x_s - self.x0) / s


def test_loss_is_zero_for_the_exact_velocity_and_the_mse_otherwise():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 3, 2, 4, 4, generator=g)
    obj = FlowMatchingObjective(FlowMatchingConfig(cond_dropout=0.0), name="net")
    step = lambda: StepContext("student", 0, 0, ScheduleConfig(), torch.Generator().manual_seed(3))
    batch = {"latent": x0, "embed": torch.zeros(3, 2, 5)}
    # float32 round-off of (x_s - x0) / s: ~1e-6 relative, squared.
    assert obj.closures({"net": _Oracle(x0)}, batch, step())["flow"]()[0].abs().max() < 1e-10
    # A zero network: the loss is the mean squared target eps - x0, eps drawn first from the step generator.
    zero = lambda x, t, c: torch.zeros_like(x)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    expected = (eps - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(obj.closures({"net": zero}, batch, step())["flow"]()[0], expected)


def test_objective_draws_from_the_step_generator_and_drops_prompts():
    b = 400
    x0, ctx = torch.zeros(b, 3, 1, 2, 2), torch.ones(b, 2, 5)
    oracle = _Oracle(x0)
    obj = FlowMatchingObjective(FlowMatchingConfig(cond_dropout=0.25), name="net")
    step = StepContext("student", 0, 0, ScheduleConfig(), torch.Generator().manual_seed(1))
    loss, diag = obj.closures({"net": oracle}, {"latent": x0, "embed": ctx}, step)["flow"]()
    assert loss.shape == (b,) and loss.abs().max() < 1e-8
    timestep, used_ctx = oracle.calls[0]
    assert torch.allclose(timestep[:, 0].float() / 1000, diag["s"]) and (0 < diag["s"]).all() and (diag["s"] < 1).all()
    dropped = (used_ctx == 0).all(-1).all(-1).float().mean()
    assert abs(dropped - 0.25) < 0.07  # binomial(400, 0.25): std 0.022, three sigma
    # Same generator seed, same draws.
    again = _Oracle(x0)
    obj.closures({"net": again}, {"latent": x0, "embed": ctx},
                 StepContext("student", 0, 0, ScheduleConfig(), torch.Generator().manual_seed(1)))["flow"]()
    assert torch.equal(again.calls[0][0], timestep)
