"""The teacher's flow-matching objective and the progress logger."""

import torch

from rcm_recipes.flow_matching import FlowMatchingConfig, FlowMatchingObjective, flow_matching_loss
from rcm_recipes.progress import ProgressLogger
from rcm_train.trainer import ScheduleConfig, StepContext


class _Oracle(torch.nn.Module):
    """Knows x0: returns the exact RF velocity (x_s - x0) / s = eps - x0, and records its inputs."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.calls = x0, []

    def forward(self, x_s, timestep, context):
        self.calls.append((timestep, context))
        s = (timestep / 1000.0)[:, None, None, None, None]
        return (x_s - self.x0) / s


def test_loss_is_zero_for_the_exact_velocity_and_the_mse_otherwise():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 3, 2, 4, 4, generator=g), torch.randn(3, 3, 2, 4, 4, generator=g)
    s, ctx = torch.tensor([0.2, 0.5, 0.9]), torch.zeros(3, 2, 5)
    # float32 round-off of (x_s - x0) / s: ~1e-6 relative, squared.
    assert flow_matching_loss(_Oracle(x0), x0, eps, s, ctx).abs().max() < 1e-10
    zero = lambda x, t, c: torch.zeros_like(x)
    expected = (eps - x0).square().flatten(1).mean(1)
    torch.testing.assert_close(flow_matching_loss(zero, x0, eps, s, ctx), expected)


def test_objective_draws_from_the_step_generator_and_drops_prompts():
    b = 400
    x0, ctx = torch.zeros(b, 3, 1, 2, 2), torch.ones(b, 2, 5)
    oracle = _Oracle(x0)
    obj = FlowMatchingObjective(FlowMatchingConfig(cond_dropout=0.25), name="net")
    step = StepContext("student", 0, 0, ScheduleConfig(), torch.Generator().manual_seed(1))
    loss, diag = obj.closures({"net": oracle}, {"latent": x0, "embed": ctx}, step)["flow"]()
    assert loss.shape == (b,) and loss.abs().max() < 1e-8
    timestep, used_ctx = oracle.calls[0]
    assert torch.allclose(timestep / 1000, diag["s"]) and (0 < diag["s"]).all() and (diag["s"] < 1).all()
    dropped = (used_ctx == 0).all(-1).all(-1).float().mean()
    assert abs(dropped - 0.25) < 0.07  # binomial(400, 0.25): std 0.022, three sigma
    # Same generator seed, same draws.
    again = _Oracle(x0)
    obj.closures({"net": again}, {"latent": x0, "embed": ctx},
                 StepContext("student", 0, 0, ScheduleConfig(), torch.Generator().manual_seed(1)))["flow"]()
    assert torch.equal(again.calls[0][0], timestep)


def test_progress_logger_records_curves():
    log = ProgressLogger("x", 3, disable=True)
    log.start(0, 3)
    for it in (1, 2, 3):
        log.log(it, {"scm/loss": float(it), "grad_norm/student": 1.0, "dmd/loss": float("nan")})
    log.close()
    assert log.curves == {"scm/loss": ([1, 2, 3], [1.0, 2.0, 3.0])}
