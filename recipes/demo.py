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

from rcm_nets.wan import MeanFlowWanDiT, WanDiT, get_config, meanflow_student_state_dict
from rcm_pipelines.video import plot_curves, write_json
from rcm_recipes.config import RecipeConfig, parse_config, run_main, write_config
from rcm_recipes.demo_eval import EvalConfig, evaluate_methods, summarize
from rcm_recipes.pixel_dit import PositionalDiT
from rcm_recipes.progress import ProgressLogger
from rcm_recipes.shapes import ShapesConfig, TinyTextEncoder, shape_batches
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


class NetConfig(RecipeConfig):
    """The tiny pixel-space WanDiT shared by teacher, student and fake score (official field names)."""

    dim: int = 64
    """Hidden width."""
    ffn_dim: int = 256
    """Feed-forward width."""
    num_heads: int = 4
    """Attention heads."""
    num_layers: int = 4
    """Transformer blocks."""
    patch_size: tuple[int, int, int] = (1, 4, 4)
    """Patch (t, h, w) of the patch embedding; frames and frame size must be divisible by it."""
    freq_dim: int = 64
    """Width of the sinusoidal timestep embedding."""
    absolute_position: float | None = 0.5
    """Add a learned absolute position map to the input, initialized to coordinate ramps of this
    amplitude (WanDiT itself has only relative RoPE positions); None: the plain WanDiT."""


class TextConfig(RecipeConfig):
    """The tiny text encoder (one fixed random vector per word)."""

    dim: int = 32
    """Embedding width (the DiT's text_dim)."""
    length: int = 8
    """Padded prompt length in words (the DiT's text_len)."""


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


PRESETS: dict[str, DemoConfig] = {
    "default": DemoConfig(),
    "ci": DemoConfig(
        out_dir="outputs/demo_ci",
        teacher=TeacherConfig(iterations=400, batch_size=16),
        distill=DistillConfig(iterations=40, schedule=ScheduleConfig(tangent_warmup=10, student_update_freq=2)),
        eval=EvalConfig(num_samples=24, teacher_steps=20),
    ),
}


def _seed(seed: int, stream: str) -> int:
    """Independent, reproducible seeds per use (data, init, eval, ...)."""
    return int(np.random.SeedSequence([seed, *stream.encode()]).generate_state(1)[0])


def build_net(cfg: DemoConfig) -> nn.Module:
    """The tiny pixel-space WanDiT (wrapped in `PositionalDiT` when `net.absolute_position`)."""
    wan = get_config("tiny-pixel", dim=cfg.net.dim, ffn_dim=cfg.net.ffn_dim, num_heads=cfg.net.num_heads,
                     num_layers=cfg.net.num_layers, patch_size=cfg.net.patch_size, freq_dim=cfg.net.freq_dim,
                     text_dim=cfg.text.dim, text_len=cfg.text.length)
    net = WanDiT(wan)
    net.init_weights(torch.Generator().manual_seed(_seed(cfg.seed, "init")))
    if cfg.net.absolute_position is not None:
        return PositionalDiT(net, cfg.data.frames, cfg.data.size, cfg.data.size, scale=cfg.net.absolute_position)
    return net


def _frozen_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).requires_grad_(False).eval()


def train_teacher(cfg: DemoConfig, encoder: TinyTextEncoder) -> tuple[nn.Module, dict]:
    """Flow-matching teacher; returns its EMA weights and the loss curves."""
    tc = cfg.teacher
    net = build_net(cfg)
    opt = build_optimizer(net, tc.optimizer)
    parts = TrainParts(models={"teacher": net}, optimizers={"teacher": opt},
                       schedulers={"teacher": build_scheduler(opt, tc.optimizer)}, ema={"teacher": _frozen_copy(net)})
    data = shape_batches(cfg.data, encoder, tc.batch_size, torch.Generator().manual_seed(_seed(cfg.seed, "data")))
    logger = ProgressLogger("teacher (flow matching)", tc.iterations, disable=not cfg.progress)
    loop = TrainConfig(max_iter=tc.iterations, seed=_seed(cfg.seed, "teacher"), clip_norm=tc.clip_norm,
                       ema_rate=tc.ema_rate, student_models=["teacher"], critic_models=[], checkpoint_every=0)
    train(parts, FlowMatchingObjective(tc.objective), data, loop, logger=logger)
    return parts.ema["teacher"], logger.curves


def distill(cfg: DemoConfig, teacher: nn.Module, encoder: TinyTextEncoder) -> tuple[nn.Module, dict]:
    """rCM distillation (sCM + DMD + critic) from the teacher; returns the student used for sampling
    (its EMA unless `distill.ema_rate` is None) and the loss curves."""
    dc = cfg.distill
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    fake = copy.deepcopy(teacher).requires_grad_(True).train()
    opt_s, opt_f = build_optimizer(student, dc.student_optimizer), build_optimizer(fake, dc.critic_optimizer)
    parts = TrainParts(
        models={"student": student, "teacher": teacher, "fake_score": fake},
        optimizers={"student": opt_s, "fake_score": opt_f},
        schedulers={"student": build_scheduler(opt_s, dc.student_optimizer),
                    "fake_score": build_scheduler(opt_f, dc.critic_optimizer)},
        ema={"student": _frozen_copy(student)} if dc.ema_rate is not None else {},
    )
    objective = RCMObjective(dc.objective, negative_embed=torch.zeros(cfg.text.length, cfg.text.dim))
    data = shape_batches(cfg.data, encoder, dc.batch_size,
                         torch.Generator().manual_seed(_seed(cfg.seed, "distill-data")))
    logger = ProgressLogger("rCM distillation", dc.iterations, keep=("loss", "g_norm"), disable=not cfg.progress)
    loop = TrainConfig(max_iter=dc.iterations, seed=_seed(cfg.seed, "distill"), clip_norm=dc.clip_norm,
                       ema_rate=dc.ema_rate, schedule=dc.schedule, checkpoint_every=0)
    train(parts, objective, data, loop, logger=logger)
    return (parts.ema["student"] if dc.ema_rate is not None else student.eval()), logger.curves


def distill_meanflow(cfg: DemoConfig, teacher: nn.Module, encoder: TinyTextEncoder) -> tuple[nn.Module, dict]:
    """MeanFlow distillation: a MeanFlowWanDiT student starting as the teacher (zero interval embedding)."""
    mc = cfg.meanflow
    dit = MeanFlowWanDiT(teacher.dit.config)
    gen = torch.Generator().manual_seed(_seed(cfg.seed, "meanflow-init"))
    dit.load_state_dict(meanflow_student_state_dict(teacher.dit.state_dict(), generator=gen))
    student = PositionalDiT(dit, cfg.data.frames, cfg.data.size, cfg.data.size, scale=0.0)
    student.position.data.copy_(teacher.position.data)
    student.requires_grad_(True).train()
    opt = build_optimizer(student, mc.optimizer)
    parts = TrainParts(models={"student": student, "teacher": teacher}, optimizers={"student": opt},
                       schedulers={"student": build_scheduler(opt, mc.optimizer)},
                       ema={"student": _frozen_copy(student)} if mc.ema_rate is not None else {})
    objective = MeanFlowObjective(mc.objective, negative_embed=torch.zeros(cfg.text.length, cfg.text.dim))
    data = shape_batches(cfg.data, encoder, mc.batch_size, torch.Generator().manual_seed(_seed(cfg.seed, "mf-data")))
    logger = ProgressLogger("MeanFlow distillation", mc.iterations, disable=not cfg.progress)
    loop = TrainConfig(max_iter=mc.iterations, seed=_seed(cfg.seed, "meanflow"), clip_norm=mc.clip_norm,
                       ema_rate=mc.ema_rate, student_models=["student"], critic_models=[], checkpoint_every=0)
    train(parts, objective, data, loop, logger=logger)
    return (parts.ema["student"] if mc.ema_rate is not None else student.eval()), logger.curves


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
