"""The staged driver (rcm_train.stages): shared loop settings reach every stage's loop, per-stage fields are
refused in the shared block, and the stage's exports are written. (Resume and skipping a finished stage run
end to end in tests/recipes/test_distill.py.)"""

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from rcm_train import stages
from rcm_train.checkpoint import CheckpointConfig
from rcm_train.logging import LoggerConfig
from rcm_train.stages import Stage, StagedRunConfig, StageSetup, run_stage
from rcm_train.trainer import ScheduleConfig, TrainConfig, TrainParts, TrainState


def test_per_stage_fields_are_refused_in_the_shared_block():
    with pytest.raises(ValidationError, match=r"run\.train\.max_iter is set per stage"):
        StagedRunConfig(train=TrainConfig(max_iter=5))
    with pytest.raises(ValidationError, match=r"run\.checkpoint\.dir is set per stage"):
        StagedRunConfig(checkpoint=CheckpointConfig(dir="x"))
    with pytest.raises(ValidationError, match=r"run\.logger\.dir"):
        StagedRunConfig(logger=LoggerConfig(dir="x"))
    dumped = StagedRunConfig().model_dump()  # a dumped config.yaml reads back (defaults pass)
    assert StagedRunConfig.model_validate(dumped) == StagedRunConfig()


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))


def test_shared_settings_reach_the_stage_loop(tmp_path, monkeypatch):
    seen = []

    def fake_train(parts, objective, data, config, **kw):
        seen.append(config)
        return TrainState(iteration=config.max_iter)

    monkeypatch.setattr(stages, "train", fake_train)
    monkeypatch.setattr(stages, "export_module", lambda module, path, dtype=None: path.parent.mkdir(
        parents=True, exist_ok=True) or path.write_bytes(b"x"))
    run = StagedRunConfig(train=TrainConfig(ema_iteration_shift=7, grad_accum=2, seed=3), logger=LoggerConfig(
        console=False))
    net = _Tiny()
    setup = lambda: StageSetup(TrainParts(models={"student": net}, optimizers={}, schedulers={},
                                          ema={"student": net}), objective=None)
    stage = Stage("s1", 5, setup, schedule=ScheduleConfig(student_update_freq=3), critic_models=["fake_score"])
    res = run_stage(stage, run, output_dir=tmp_path, data=lambda: [], sample_every=4)
    (cfg,) = seen
    assert (cfg.ema_iteration_shift, cfg.grad_accum, cfg.seed) == (7, 2, 3)  # shared loop settings arrive
    assert (cfg.max_iter, cfg.schedule.student_update_freq, cfg.critic_models) == (5, 3, ["fake_score"])
    assert cfg.sample_every == 0  # no hook: no sampling
    assert res.iteration == 5 and res.exports["student"] == tmp_path / "s1" / "student.safetensors"
    assert res.exports["student"].is_file()
