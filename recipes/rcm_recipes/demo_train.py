"""The CPU demo's three trainings (teacher, rCM student, MeanFlow student) on the rcm_train loop.

Each takes its config, its networks and an iterator of shape batches (`rcm_recipes.shapes.shape_batches`) and
returns the network to sample (its EMA copy when the config keeps one) and the loss curves; `recipes/demo.py`
strings them together with the evaluation (`rcm_recipes.demo_eval`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from rcm_nets.wan import MeanFlowWanDiT, meanflow_student_state_dict
from rcm_train.objectives import RCMObjective, RCMObjectiveConfig
from rcm_train.objectives.flow_matching import FlowMatchingConfig, FlowMatchingObjective
from rcm_train.objectives.meanflow import MeanFlowObjective, MeanFlowObjectiveConfig
from rcm_train.trainer import (
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    TrainParts,
    build_optimizer,
    build_scheduler,
    train,
)

from .config import RecipeConfig
from .pixel_dit import PositionalDiT
from .progress import ProgressLogger

__all__ = ["TeacherConfig", "DistillConfig", "MeanFlowConfig", "seed_for", "fit", "train_teacher", "distill",
           "distill_meanflow"]


class TeacherConfig(RecipeConfig):
    """Flow-matching training of the teacher."""

    iterations: int = 2000
    """Training iterations."""
    batch_size: int = 32
    """Videos per iteration."""
    optimizer: OptimizerConfig = OptimizerConfig(lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=100,
                                                 warmup_start=0.01)
    """AdamW and LR warmup."""
    clip_norm: float | None = 1.0
    """Gradient-norm clip."""
    ema_rate: float = 0.1
    """Power-EMA rate of the weights used afterwards (EDM2 sigma_rel)."""
    objective: FlowMatchingConfig = FlowMatchingConfig(logit_mean=1.5)
    """Flow-matching time distribution and prompt dropout (times lean to high noise, where the shape's
    position and path are decided)."""


class DistillConfig(RecipeConfig):
    """rCM distillation of the teacher into a few-step student."""

    iterations: int = 200
    """Raw iterations (student and critic phases together)."""
    batch_size: int = 16
    """Videos per iteration."""
    schedule: ScheduleConfig = ScheduleConfig(tangent_warmup=40, student_update_freq=2)
    """sCM-only warmup, then one student iteration every student_update_freq (the others train the critic)."""
    student_optimizer: OptimizerConfig = OptimizerConfig(lr=2e-4, betas=(0.0, 0.999), weight_decay=0.01,
                                                         warmup_steps=20)
    """Student AdamW (no momentum, as the reference)."""
    critic_optimizer: OptimizerConfig = OptimizerConfig(lr=2e-4, betas=(0.0, 0.999), weight_decay=0.01,
                                                        warmup_steps=20)
    """Fake-score AdamW."""
    clip_norm: float | None = 1.0
    """Gradient-norm clip."""
    ema_rate: float | None = 0.05
    """Power-EMA rate of the student used for sampling (None: sample the raw student)."""
    objective: RCMObjectiveConfig = RCMObjectiveConfig(
        guidance=3.0, p_g_mean=0.0, p_d_shift=2.0, input_dtype="float32", timestep_dtype=None
    )
    """The rCM objective (sCM + DMD); the networks run in float32 with exact timesteps on CPU."""


class MeanFlowConfig(RecipeConfig):
    """MeanFlow distillation of the teacher into a 1-2 step student (optional: --meanflow.enabled=true)."""

    enabled: bool = False
    """Also train and evaluate a MeanFlow student (adds about a quarter to the demo's time on 2 cores)."""
    iterations: int = 200
    """Iterations (every one is a student iteration: there is no critic)."""
    batch_size: int = 16
    """Videos per iteration."""
    optimizer: OptimizerConfig = OptimizerConfig(lr=2e-4, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=20)
    """Student AdamW."""
    clip_norm: float | None = 1.0
    """Gradient-norm clip."""
    ema_rate: float | None = 0.05
    """Power-EMA rate of the student used for sampling (None: sample the raw student)."""
    objective: MeanFlowObjectiveConfig = MeanFlowObjectiveConfig(guidance=3.0, input_dtype="float32")
    """The MeanFlow objective (exact JVP; the teacher's CFG velocity as v)."""



def seed_for(seed: int, stream: str) -> int:
    """Independent, reproducible seeds per use (data, init, eval, ...)."""
    return int(np.random.SeedSequence([seed, *stream.encode()]).generate_state(1)[0])


def _frozen_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).requires_grad_(False).eval()


def fit(title: str, models: dict[str, nn.Module], optimizers: dict[str, OptimizerConfig], objective: Any,
        loop: TrainConfig, data: Iterable, *, sampled: str, seed: int, progress: bool,
        keep: tuple[str, ...] = ("loss",)) -> tuple[nn.Module, dict]:
    """Train the ``models`` named in ``optimizers`` with ``objective`` on ``data`` by the rcm_train loop (no
    checkpoints). Returns network ``sampled`` (its EMA copy when ``loop.ema_rate`` is set) and the loss curves."""
    opts = {k: build_optimizer(models[k], c) for k, c in optimizers.items()}
    parts = TrainParts(models=models, optimizers=opts,
                       schedulers={k: build_scheduler(o, optimizers[k]) for k, o in opts.items()},
                       ema={sampled: _frozen_copy(models[sampled])} if loop.ema_rate is not None else {})
    logger = ProgressLogger(title, loop.max_iter, keep=keep, disable=not progress)
    train(parts, objective, data, loop.model_copy(update={"seed": seed, "checkpoint_every": 0}), logger=logger)
    return (parts.ema[sampled] if parts.ema else models[sampled].eval()), logger.curves


def train_teacher(tc: TeacherConfig, net: nn.Module, data: Iterable, *, seed: int,
                  progress: bool) -> tuple[nn.Module, dict]:
    """Flow-matching teacher from ``net``; returns its EMA weights and the loss curves."""
    loop = TrainConfig(max_iter=tc.iterations, clip_norm=tc.clip_norm, ema_rate=tc.ema_rate,
                       student_models=["teacher"], critic_models=[])
    return fit("teacher (flow matching)", {"teacher": net}, {"teacher": tc.optimizer},
               FlowMatchingObjective(tc.objective), loop, data, sampled="teacher", seed=seed, progress=progress)


def distill(dc: DistillConfig, teacher: nn.Module, data: Iterable, *, negative: torch.Tensor, seed: int,
            progress: bool) -> tuple[nn.Module, dict]:
    """rCM distillation (sCM + DMD + critic) from the teacher; returns the student used for sampling
    (its EMA unless ``dc.ema_rate`` is None) and the loss curves."""
    models = {"student": copy.deepcopy(teacher).requires_grad_(True).train(), "teacher": teacher,
              "fake_score": copy.deepcopy(teacher).requires_grad_(True).train()}
    loop = TrainConfig(max_iter=dc.iterations, clip_norm=dc.clip_norm, ema_rate=dc.ema_rate, schedule=dc.schedule)
    return fit("rCM distillation", models, {"student": dc.student_optimizer, "fake_score": dc.critic_optimizer},
               RCMObjective(dc.objective, negative_embed=negative), loop, data, sampled="student", seed=seed,
               progress=progress, keep=("loss", "g_norm"))


def distill_meanflow(mc: MeanFlowConfig, teacher: PositionalDiT, data: Iterable, *, negative: torch.Tensor,
                     seed: int, init_seed: int, progress: bool) -> tuple[nn.Module, dict]:
    """MeanFlow distillation: a MeanFlowWanDiT student starting as the teacher (zero interval embedding)."""
    dit = MeanFlowWanDiT(teacher.dit.config)
    gen = torch.Generator().manual_seed(init_seed)
    dit.load_state_dict(meanflow_student_state_dict(teacher.dit.state_dict(), generator=gen))
    frames, height, width = teacher.position.shape[1:]
    student = PositionalDiT(dit, frames, height, width, scale=0.0)
    student.position.data.copy_(teacher.position.data)
    loop = TrainConfig(max_iter=mc.iterations, clip_norm=mc.clip_norm, ema_rate=mc.ema_rate,
                       student_models=["student"], critic_models=[])
    return fit("MeanFlow distillation", {"student": student.requires_grad_(True).train(), "teacher": teacher},
               {"student": mc.optimizer}, MeanFlowObjective(mc.objective, negative_embed=negative), loop, data,
               sampled="student", seed=seed, progress=progress)
