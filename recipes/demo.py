"""The CPU demo: train a tiny text-to-video teacher, rCM-distill it, and compare few-step samples.

    uv run recipes/demo.py                 # the full demo (2 CPU cores, under 10 minutes)
    uv run recipes/demo.py --preset ci     # the reduced run the tests use (under 2 minutes)
    uv run recipes/demo.py --help          # every field

1. Data: procedural videos of a colored square or disk moving left/right/up/down, prompted by
   "a {color} {shape} moving {direction}" and embedded by a tiny fixed text encoder (`rcm_recipes.shapes`).
2. Teacher: a tiny pixel-space `WanDiT` trained with flow matching (with prompt dropout for CFG) by the
   `rcm_train` loop.
3. Distillation: rCM (sCM with the network's JVP path + DMD against a fake score trained in critic
   phases), `rcm_train.objectives.RCMObjective` in the same `rcm_train` loop.
4. Evaluation: teacher (Euler + CFG, 50 and 4 steps) and student (1, 2, 4 steps) on the same prompts and
   noise, scored against held-out procedural videos (`rcm_recipes.shapes_metric`: prompt accuracy read
   back from the pixels + a Frechet distance on hand-made features).

Writes to `out_dir` (default outputs/demo/): config.yaml, grid.mp4 + grid.gif (rows = methods, columns =
prompts), loss_curves.png, metrics.json, teacher.safetensors, student.safetensors.
"""

# ruff: noqa: E402  (the OpenMP setting below must precede the imports that load torch)
from __future__ import annotations

import os

# Sleep rather than spin in OpenMP barriers: on a busy 2-core machine spinning threads made every step
# 5-10x slower (measured); on an idle one passive waiting costs nothing measurable.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import model_validator
from safetensors.torch import save_file
from torch import nn

from rcm_nets.wan import MeanFlowWanDiT, meanflow_student_state_dict
from rcm_pipelines.video import plot_curves, write_json
from rcm_recipes.config import RecipeConfig, load_presets, parse_config, run_main, write_config
from rcm_recipes.demo_eval import EvalConfig, evaluate_methods, summarize
from rcm_recipes.pixel_dit import NetConfig, PositionalDiT, build_pixel_dit
from rcm_recipes.progress import ProgressLogger
from rcm_recipes.shapes import ShapesConfig, TextConfig, TinyTextEncoder, shape_batches
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


class DemoConfig(RecipeConfig):
    """The CPU demo: teacher -> rCM distillation -> few-step samples, metrics and videos."""

    out_dir: str = "outputs/demo"
    """Directory of every output."""
    seed: int = 0
    """Seed of the data, the initial weights, the training noise and the evaluation noise."""
    threads: int = 2
    """torch CPU threads."""
    progress: bool = True
    """Show progress bars."""
    attention_backend: Literal["rcm", "sdpa", "math"] = "sdpa"
    """Kernel of the networks' plain attention, forward and backward (`rcm_kernels.attention.backends`);
    the sCM tangent always takes the JVP attention path. 'sdpa' (torch's fused CPU kernel) made a teacher
    step ~15% faster than 'rcm' (the reference math) on 2 cores."""
    data: ShapesConfig = ShapesConfig(frames=5, size=16, radius=3.5, speed=1.5)
    """The procedural videos."""
    text: TextConfig = TextConfig()
    """The text encoder."""
    net: NetConfig = NetConfig()
    """The network architecture."""
    teacher: TeacherConfig = TeacherConfig()
    """Teacher training."""
    distill: DistillConfig = DistillConfig()
    """Distillation."""
    meanflow: MeanFlowConfig = MeanFlowConfig()
    """Optional MeanFlow student (a second JVP-based objective), evaluated beside the rCM student."""
    eval: EvalConfig = EvalConfig()
    """Sampling, metrics and the grid video."""

    @model_validator(mode="after")
    def _patches_fit(self) -> DemoConfig:
        pt, ph, pw = self.net.patch_size
        if self.data.frames % pt or self.data.size % ph or self.data.size % pw:
            raise ValueError(f"data.frames={self.data.frames} and data.size={self.data.size} must be divisible by "
                             f"net.patch_size={self.net.patch_size}")
        return self


PRESETS: dict[str, DemoConfig] = load_presets(DemoConfig, "demo")
"""Named starting points: configs/demo/<name>.yaml (default: the full demo; ci: the reduced run the tests use)."""


def _seed(seed: int, stream: str) -> int:
    """Independent, reproducible seeds per use (data, init, eval, ...)."""
    return int(np.random.SeedSequence([seed, *stream.encode()]).generate_state(1)[0])


def build_net(cfg: DemoConfig) -> nn.Module:
    """The tiny pixel-space WanDiT of the demo (`rcm_recipes.pixel_dit`)."""
    return build_pixel_dit(cfg.net, text_dim=cfg.text.dim, text_len=cfg.text.length, frames=cfg.data.frames,
                           size=cfg.data.size, seed=_seed(cfg.seed, "init"))


def _frozen_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).requires_grad_(False).eval()


def _fit(cfg: DemoConfig, encoder: TinyTextEncoder, title: str, models: dict[str, nn.Module], optimizers: dict,
         objective, loop: TrainConfig, *, batch_size: int, sampled: str, seeds: tuple[str, str],
         keep: tuple[str, ...] = ("loss",)) -> tuple[nn.Module, dict]:
    """Train the ``models`` named in ``optimizers`` (name -> OptimizerConfig) with ``objective`` on shape batches
    by the rcm_train loop (``seeds``: the seed streams of the data and of the loop). Returns network ``sampled``
    (its EMA copy when ``loop.ema_rate`` is set) and the loss curves."""
    opts = {k: build_optimizer(models[k], c) for k, c in optimizers.items()}
    parts = TrainParts(models=models, optimizers=opts,
                       schedulers={k: build_scheduler(o, optimizers[k]) for k, o in opts.items()},
                       ema={sampled: _frozen_copy(models[sampled])} if loop.ema_rate is not None else {})
    data = shape_batches(cfg.data, encoder, batch_size, torch.Generator().manual_seed(_seed(cfg.seed, seeds[0])))
    logger = ProgressLogger(title, loop.max_iter, keep=keep, disable=not cfg.progress)
    train(parts, objective, data, loop.model_copy(update={"seed": _seed(cfg.seed, seeds[1]), "checkpoint_every": 0}),
          logger=logger)
    return (parts.ema[sampled] if parts.ema else models[sampled].eval()), logger.curves


def train_teacher(cfg: DemoConfig, encoder: TinyTextEncoder) -> tuple[nn.Module, dict]:
    """Flow-matching teacher; returns its EMA weights and the loss curves."""
    tc = cfg.teacher
    loop = TrainConfig(max_iter=tc.iterations, clip_norm=tc.clip_norm, ema_rate=tc.ema_rate,
                       student_models=["teacher"], critic_models=[])
    return _fit(cfg, encoder, "teacher (flow matching)", {"teacher": build_net(cfg)}, {"teacher": tc.optimizer},
                FlowMatchingObjective(tc.objective), loop, batch_size=tc.batch_size, sampled="teacher",
                seeds=("data", "teacher"))


def distill(cfg: DemoConfig, teacher: nn.Module, encoder: TinyTextEncoder) -> tuple[nn.Module, dict]:
    """rCM distillation (sCM + DMD + critic) from the teacher; returns the student used for sampling
    (its EMA unless `distill.ema_rate` is None) and the loss curves."""
    dc = cfg.distill
    models = {"student": copy.deepcopy(teacher).requires_grad_(True).train(), "teacher": teacher,
              "fake_score": copy.deepcopy(teacher).requires_grad_(True).train()}
    objective = RCMObjective(dc.objective, negative_embed=torch.zeros(cfg.text.length, cfg.text.dim))
    loop = TrainConfig(max_iter=dc.iterations, clip_norm=dc.clip_norm, ema_rate=dc.ema_rate, schedule=dc.schedule)
    return _fit(cfg, encoder, "rCM distillation", models,
                {"student": dc.student_optimizer, "fake_score": dc.critic_optimizer}, objective, loop,
                batch_size=dc.batch_size, sampled="student", seeds=("distill-data", "distill"), keep=("loss", "g_norm"))


def distill_meanflow(cfg: DemoConfig, teacher: nn.Module, encoder: TinyTextEncoder) -> tuple[nn.Module, dict]:
    """MeanFlow distillation: a MeanFlowWanDiT student starting as the teacher (zero interval embedding)."""
    mc = cfg.meanflow
    dit = MeanFlowWanDiT(teacher.dit.config)
    gen = torch.Generator().manual_seed(_seed(cfg.seed, "meanflow-init"))
    dit.load_state_dict(meanflow_student_state_dict(teacher.dit.state_dict(), generator=gen))
    student = PositionalDiT(dit, cfg.data.frames, cfg.data.size, cfg.data.size, scale=0.0)
    student.position.data.copy_(teacher.position.data)
    objective = MeanFlowObjective(mc.objective, negative_embed=torch.zeros(cfg.text.length, cfg.text.dim))
    loop = TrainConfig(max_iter=mc.iterations, clip_norm=mc.clip_norm, ema_rate=mc.ema_rate,
                       student_models=["student"], critic_models=[])
    return _fit(cfg, encoder, "MeanFlow distillation", {"student": student.requires_grad_(True).train(),
                                                        "teacher": teacher}, {"student": mc.optimizer}, objective,
                loop, batch_size=mc.batch_size, sampled="student", seeds=("mf-data", "meanflow"))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(DemoConfig, argv, presets=PRESETS, prog="demo.py")
    out = Path(cfg.out_dir)
    write_config(cfg, out / "config.yaml")
    torch.set_num_threads(cfg.threads)
    os.environ["RCM_ATTENTION_BACKEND"] = cfg.attention_backend  # read by rcm_kernels at every attention call
    torch.manual_seed(cfg.seed)
    encoder = TinyTextEncoder(cfg.text.dim, cfg.text.length, seed=_seed(cfg.seed, "text"))
    times = {}
    t0 = time.perf_counter()
    teacher, teacher_curves = train_teacher(cfg, encoder)
    times["teacher_training"] = time.perf_counter() - t0
    save_file(teacher.state_dict(), out / "teacher.safetensors")
    t1 = time.perf_counter()
    student, distill_curves = distill(cfg, teacher, encoder)
    times["distillation"] = time.perf_counter() - t1
    save_file(student.state_dict(), out / "student.safetensors")
    meanflow, mf_curves = None, {}
    if cfg.meanflow.enabled:
        t_mf = time.perf_counter()
        meanflow, mf_curves = distill_meanflow(cfg, teacher, encoder)
        times["meanflow_distillation"] = time.perf_counter() - t_mf
        save_file(meanflow.state_dict(), out / "meanflow_student.safetensors")
    t2 = time.perf_counter()
    metrics = evaluate_methods(cfg.eval, cfg.data, encoder, teacher, student, guidance=cfg.distill.objective.guidance,
                               seed=_seed(cfg.seed, "eval"), out_dir=out, progress=cfg.progress, meanflow=meanflow)
    times["evaluation"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    plot_curves(
        {"teacher: flow matching": {"loss": teacher_curves["flow/loss"]},
         # The sCM loss is loss_scale * |g / (|g| + c)|^2 ~ loss_scale by construction (only its gradient
         # moves); the raw tangent norm |g| is what falls as the student becomes self-consistent.
         "student: sCM tangent norm |g|": {"|g|": distill_curves.get("scm/g_norm", ([], []))},
         "student: DMD loss": {"dmd": distill_curves.get("dmd/loss", ([], []))},
         "critic: fake-score loss": {"loss": distill_curves.get("critic/loss", ([], []))},
         **({"MeanFlow student loss": {"loss": mf_curves["meanflow/loss"]}} if "meanflow/loss" in mf_curves else {})},
        out / "loss_curves.png",
    )
    report = {**metrics, "wall_time_s": {k: round(v, 1) for k, v in times.items()}}
    write_json(report, out / "metrics.json")
    print(summarize(report, out))
    return report


if __name__ == "__main__":
    run_main(main)
