"""The training loop's small functions: phase schedule and counters, optimizer/scheduler construction,
gradient sanitizing, accumulation, closures with their own backward, EMA, per-step generators."""

import math

import pytest
import torch
from torch import nn

from rcm_losses.ema import ema_beta
from rcm_train.trainer import (
    OptimizerConfig,
    ScheduleConfig,
    StepContext,
    TrainConfig,
    TrainParts,
    TrainState,
    build_optimizer,
    build_scheduler,
    effective_iteration,
    effective_iteration_critic,
    is_student_phase,
    run_iteration,
    sanitize_grads_,
    step_generator,
    train,
    train_step,
)


def test_schedule_matches_reference_example():
    """docs/train.md, training loop, 1.3B (W=1000, f=5): 0-999 student; 1000 student (eff 1000); 1001-1004 critic with
    eff_fake 0..3 (simulation steps n = 1..4); 1005 student (eff 1001, n = 2)."""
    s = ScheduleConfig(tangent_warmup=1000, student_update_freq=5)
    phases = [is_student_phase(i, s, True) for i in range(995, 1011)]
    assert phases == [True] * 6 + [False] * 4 + [True] + [False] * 4 + [True]
    assert [effective_iteration(i, s, True) for i in (0, 999, 1000, 1004, 1005, 1010)] == [0, 999, 1000, 1000, 1001, 1002]
    assert [effective_iteration_critic(i, s, True) for i in range(1001, 1005)] == [0, 1, 2, 3]
    assert [effective_iteration_critic(i, s, True) for i in range(1006, 1010)] == [4, 5, 6, 7]
    # 14B (W=0, f=10): 0 student, 1-9 critic; without a critic every iteration is a student one
    s14 = ScheduleConfig(tangent_warmup=0, student_update_freq=10)
    assert [is_student_phase(i, s14, True) for i in range(12)] == [True] + [False] * 9 + [True, False]
    assert all(is_student_phase(i, s14, False) and effective_iteration(i, s14, False) == i for i in range(12))


def test_lr_warmup_per_optimizer():
    m = nn.Linear(2, 2)
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=4, warmup_start=1e-6)
    opt = build_optimizer(m, cfg)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expect = [1e-3 * (1e-6 + (1 - 1e-6) * k / 4) for k in range(4)] + [1e-3, 1e-3]
    assert lrs == pytest.approx(expect, rel=1e-12)
    assert opt.param_groups[0]["betas"] == (0.0, 0.999) and opt.param_groups[0]["weight_decay"] == 0.01
    assert opt.defaults["foreach"] and not opt.defaults["fused"]  # CPU: foreach kernel


def test_optimizer_refuses_low_precision_parameters():
    with pytest.raises(TypeError, match=r"float32 master weights, found \['torch.bfloat16'\]"):
        build_optimizer(nn.Linear(2, 2).bfloat16(), OptimizerConfig())
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(nn.Linear(2, 2).requires_grad_(False), OptimizerConfig())


def test_sanitize_and_clip():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, float("nan"), float("inf")])
    b.grad = torch.tensor([-float("inf"), 4.0])
    norm = sanitize_grads_([a, b], None)
    assert norm.item() == pytest.approx(5.0)  # NaN/inf -> 0, then ||(3, 0, 0, 0, 4)||
    assert a.grad.tolist() == [3.0, 0.0, 0.0] and b.grad.tolist() == [0.0, 4.0]
    norm = sanitize_grads_([a, b], 1.0)
    assert norm.item() == pytest.approx(5.0)
    assert math.hypot(*a.grad.tolist(), *b.grad.tolist()) == pytest.approx(1.0, rel=1e-5)


class _TwoClosures:
    """Objective with two closures on disjoint parameters, recording the order of forwards and whether the
    previous closure's graph was already freed (its own backward ran) when the next one started."""

    def __init__(self):
        self.log = []

    def closures(self, models, batch, ctx):
        m = models["student"]

        def first():
            self.log.append(("first", ctx.micro_step))
            return (m.a * batch).sum(-1), {"mean": batch.mean()}

        def second():
            self.log.append(("second", m.a.grad is not None))
            return (m.b * batch**2).sum(-1), {}

        return {"first": first, "second": second}


class _AB(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))


def test_train_step_closures_and_accumulation():
    """Each closure backpropagates before the next one runs; gradients add over closures and average over
    micro-batches (loss.sum() / grad_accum), checked through SGD(lr=1): the step is minus the gradient."""
    m = _AB()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    obj = _TwoClosures()
    b1, b2 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    ctx = StepContext("student", 0, 0, ScheduleConfig(), torch.Generator())
    metrics = train_step({"student": m}, [b1, b2], {"student": opt}, obj, ctx)
    assert obj.log == [("first", 0), ("second", True), ("first", 1), ("second", True)]
    ga = (b1.sum(0) + b2.sum(0)) / 2
    gb = ((b1**2).sum(0) + (b2**2).sum(0)) / 2
    torch.testing.assert_close(m.a.detach(), 1 - ga)
    torch.testing.assert_close(m.b.detach(), 1 - gb)
    assert metrics["first/loss"] == pytest.approx((6.0 + 3.0) / 2)  # per-sample mean, averaged over micro-batches
    assert metrics["grad_norm/student"] == pytest.approx(torch.cat([ga, gb]).norm().item())
    assert m.a.grad is None  # zeroed after the step


class _Quadratic:
    def closures(self, models, batch, ctx):
        s = models["student"]
        noise = torch.randn(3, generator=ctx.generator)
        if ctx.phase == "critic":
            return {"critic": lambda: (((models["fake_score"].w - s.w.detach()) ** 2).sum(), {})}
        return {"fit": lambda: (((s.w - batch - 0.01 * noise) ** 2).sum(), {})}


class _W(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))


def test_run_iteration_phases_schedulers_ema():
    parts = TrainParts(models={"student": _W(), "fake_score": _W()}, optimizers={}, schedulers={},
                       ema={"student": _W()})
    oc = OptimizerConfig(lr=0.1, warmup_steps=2)
    for n in ("student", "fake_score"):
        parts.optimizers[n] = build_optimizer(parts.models[n], oc)
        parts.schedulers[n] = build_scheduler(parts.optimizers[n], oc)
    cfg = TrainConfig(schedule=ScheduleConfig(tangent_warmup=1, student_update_freq=2), ema_rate=0.1)
    batch = torch.ones(3)
    seen = []
    for it in range(5):  # student 0, 1 (eff 1), critic 2, student 3 (eff 2), critic 4
        before = parts.ema["student"].w.detach().clone()
        m = run_iteration(parts, _Quadratic(), [batch], it, cfg)
        seen.append((m["phase_student"], "fit/loss" in m, "critic/loss" in m))
        if m["phase_student"]:
            eff = effective_iteration(it, cfg.schedule, True)
            beta = ema_beta(eff, 0.1)
            assert m["ema_beta"] == beta
            torch.testing.assert_close(parts.ema["student"].w.detach(),
                                       beta * before + (1 - beta) * parts.models["student"].w.detach())
        else:
            torch.testing.assert_close(parts.ema["student"].w.detach(), before)  # EMA only in student phases
    assert seen == [(1.0, True, False), (1.0, True, False), (0.0, False, True), (1.0, True, False), (0.0, False, True)]
    # each LR scheduler counted only its own optimizer's steps: student 3, critic 2 (warmup 2 -> done)
    assert parts.schedulers["student"].last_epoch == 3 and parts.schedulers["fake_score"].last_epoch == 2


def test_step_generator_is_reproducible_and_distinct():
    draw = lambda *a: torch.rand(4, generator=step_generator(*a)).tolist()
    assert draw(0, 5, 0, 1) == draw(0, 5, 0, 1)
    assert len({tuple(draw(0, 5, 0, r)) for r in range(3)} | {tuple(draw(0, 6, 0, 0)), tuple(draw(0, 5, 1, 0))}) == 5


def test_train_state_restores_rng():
    s = TrainState(iteration=7)
    torch.manual_seed(11)
    sd = s.state_dict()
    a = torch.rand(3)
    torch.manual_seed(12)
    s2 = TrainState()
    s2.load_state_dict(sd)
    assert s2.iteration == 7 and torch.equal(torch.rand(3), a)


# ------------------------------------------------------------------------------------------ non-finite policy
class _Blowup:
    """Fits ``w`` to the batch; from iteration ``bad`` on the loss (and so the gradient) is NaN."""

    def __init__(self, bad: int):
        self.bad = bad

    def closures(self, models, batch, ctx):
        s = models["student"]
        scale = float("nan") if ctx.iteration >= self.bad else 1.0
        return {"fit": lambda: (scale * ((s.w - batch) ** 2).sum().reshape(1),
                                {"nan": torch.tensor([ctx.iteration == 1, False])})}


def _parts():
    parts = TrainParts(models={"student": _W()}, optimizers={}, ema={"student": _W()})
    parts.optimizers["student"] = build_optimizer(parts.models["student"], OptimizerConfig(lr=0.1, warmup_steps=0))
    return parts


def test_nonfinite_stops_naming_iteration_network_and_quantity_and_keeps_the_last_finite_checkpoint(tmp_path):
    """Before: NaN gradients were zeroed (nan_to_num) and the run went on to save non-finite weights."""
    from rcm_train.checkpoint import Checkpointer, load_part
    from rcm_train.safety import NonFiniteError

    parts, ck = _parts(), Checkpointer(tmp_path / "ckpt")
    cfg = TrainConfig(max_iter=6, checkpoint_every=2, critic_models=[], ema_rate=0.1)
    with pytest.raises(NonFiniteError, match=r"non-finite value in the loss 'fit/loss' \(nan\) \(iteration 3, "
                                             r"network 'student'\)") as err:
        train(parts, _Blowup(3), iter(lambda: torch.ones(3), None), cfg, checkpointer=ck)
    assert err.value.iteration == 3 and err.value.network == "student"
    assert ck.latest_iteration() == 2 and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "iter_000000002", "latest"]
    assert torch.isfinite(parts.models["student"].w).all()  # the NaN step never reached the optimizer
    assert torch.isfinite(load_part(ck.latest(), "student")["w"]).all()


def test_nonfinite_skip_is_bounded():
    from rcm_train.safety import NonFiniteError

    parts = _parts()
    cfg = TrainConfig(max_iter=6, checkpoint_every=0, critic_models=[], on_nonfinite="skip", max_skips=2)
    before = parts.models["student"].w.detach().clone()
    with pytest.raises(NonFiniteError, match=r"after 2 skipped updates \(max_skips\) \(iteration 5"):
        train(parts, _Blowup(3), iter(lambda: torch.ones(3), None), cfg)
    assert not torch.equal(parts.models["student"].w, before) and torch.isfinite(parts.models["student"].w).all()
    # skips within the bound: the run finishes with the finite weights of iteration 3
    parts = _parts()
    state = train(parts, _Blowup(3), iter(lambda: torch.ones(3), None), cfg.model_copy(update={"max_iter": 5}))
    assert state.iteration == 5 and torch.isfinite(parts.models["student"].w).all()


def test_nonfinite_parameters_and_nan_masked_count(tmp_path, capsys):
    from rcm_train.checkpoint import Checkpointer, ModelState, save_weights
    from rcm_train.logging import LoggerConfig, MetricsLogger
    from rcm_train.safety import NonFiniteError, check_finite_state_dict
    from rcm_train.trainer import check_parameters

    parts = _parts()
    logger = MetricsLogger(LoggerConfig(dir=str(tmp_path), every=2, nan_warn_fraction=0.2))
    train(parts, _Blowup(99), iter(lambda: torch.ones(3), None),
          TrainConfig(max_iter=2, checkpoint_every=0, critic_models=[]), logger=logger)
    out = capsys.readouterr().out
    assert "nan_masked=1/4" in out and "warning: 1 of 4 samples had a NaN" in out  # 25% > 20%
    with torch.no_grad():
        parts.ema["student"].w[1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"parameter 'w' \(iteration 7, network 'student_ema'\)"):
        check_parameters(parts, 7)
    ck = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(NonFiniteError, match="student_ema"):
        ck.save(1, {"student_ema": ModelState(parts.ema["student"])})
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(NonFiniteError, match=r"weight 'w' \(weights to be written to .*w.safetensors\)"):
        save_weights(parts.ema["student"].state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(NonFiniteError, match=r"weight 'b' \(teacher.pth\)"):
        check_finite_state_dict({"a": torch.ones(2), "b": torch.tensor([float("nan")])}, "teacher.pth")


def test_train_state_rng_is_tensors_only():
    """Before: the RNG state was a pickle.dumps blob (and resume called pickle.loads on it)."""
    import random

    import numpy as np

    from rcm_train.safety import is_plain

    random.seed(3)
    random.gauss(0, 1)  # a cached gaussian is part of the state
    np.random.seed(4)
    np.random.randn()
    sd = TrainState(iteration=2).state_dict()
    assert is_plain(sd) and not any(isinstance(v, bytes) for v in sd.values())
    assert all(isinstance(v, torch.Tensor) for v in sd["rng_rank0"].values())
    expect = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn())
    random.seed(0)
    np.random.seed(0)
    TrainState().load_state_dict(sd)
    assert (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn()) == expect


@pytest.mark.parametrize("cls, field, value", [
    (TrainConfig, "grad_accum", 0), (TrainConfig, "checkpoint_every", -1), (TrainConfig, "ema_rate", 1.0),
    (TrainConfig, "max_skips", -1), (TrainConfig, "clip_norm", 0.0), (OptimizerConfig, "lr", 0.0),
    (OptimizerConfig, "lr", float("nan")), (OptimizerConfig, "betas", (0.9, 1.0)),
    (OptimizerConfig, "warmup_steps", -1), (ScheduleConfig, "student_update_freq", 0)])
def test_config_ranges(cls, field, value):
    """Before: grad_accum=0 trained nothing and exported the teacher; checkpoint_every=-1 saved every step."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=field):
        cls(**{field: value})


def test_config_ranges_of_data_checkpoint_logger():
    from pydantic import ValidationError

    from rcm_train.checkpoint import CheckpointConfig
    from rcm_train.data import DataConfig
    from rcm_train.logging import LoggerConfig

    for make in (lambda: DataConfig(shards="x", batch_size=0), lambda: DataConfig(shards="x", num_workers=-1),
                 lambda: CheckpointConfig(keep_last=0), lambda: LoggerConfig(every=0)):
        with pytest.raises(ValidationError):
            make()
