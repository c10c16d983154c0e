"""The CPU demo: train a tiny text-to-video teacher, rCM-distill it, and compare few-step samples.

    uv run recipes/demo.py                 # the full demo (2 CPU cores, under 10 minutes)
    uv run recipes/demo.py --preset ci     # the reduced run the tests use (under 2 minutes)
    uv run recipes/demo.py --help          # every field

1. Data: procedural videos of a colored square or disk moving left/right/up/down, prompted by
   "a {color} {shape} moving {direction}" and embedded by a tiny fixed text encoder (`rcm_recipes.shapes`).
2. Teacher: a tiny pixel-space `WanDiT` trained with flow matching (with prompt dropout for CFG) by the
   `rcm_train` loop (the three trainings are in `rcm_recipes.demo_train`).
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

import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator
from safetensors.torch import save_file
from torch import nn

from rcm_pipelines.video import plot_curves, write_json
from rcm_recipes.config import RecipeConfig, load_presets, parse_config, run_main, write_config
from rcm_recipes.demo_eval import EvalConfig, evaluate_methods, summarize
from rcm_recipes.demo_train import (
    DistillConfig,
    MeanFlowConfig,
    TeacherConfig,
    distill,
    distill_meanflow,
    seed_for,
    train_teacher,
)
from rcm_recipes.pixel_dit import NetConfig, build_pixel_dit
from rcm_recipes.shapes import ShapesConfig, TextConfig, TinyTextEncoder, shape_batches


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
    return seed_for(seed, stream)


def _batches(cfg: DemoConfig, encoder: TinyTextEncoder, batch_size: int, stream: str):
    return shape_batches(cfg.data, encoder, batch_size, torch.Generator().manual_seed(_seed(cfg.seed, stream)))


def build_net(cfg: DemoConfig) -> nn.Module:
    """The tiny pixel-space WanDiT of the demo (`rcm_recipes.pixel_dit`)."""
    return build_pixel_dit(cfg.net, text_dim=cfg.text.dim, text_len=cfg.text.length, frames=cfg.data.frames,
                           size=cfg.data.size, seed=_seed(cfg.seed, "init"))


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
    negative = torch.zeros(cfg.text.length, cfg.text.dim)  # the tiny encoder's empty prompt
    teacher, teacher_curves = train_teacher(cfg.teacher, build_net(cfg), _batches(cfg, encoder, cfg.teacher.batch_size,
                                            "data"), seed=_seed(cfg.seed, "teacher"), progress=cfg.progress)
    times["teacher_training"] = time.perf_counter() - t0
    save_file(teacher.state_dict(), out / "teacher.safetensors")
    t1 = time.perf_counter()
    student, distill_curves = distill(cfg.distill, teacher, _batches(cfg, encoder, cfg.distill.batch_size,
                                      "distill-data"), negative=negative, seed=_seed(cfg.seed, "distill"),
                                      progress=cfg.progress)
    times["distillation"] = time.perf_counter() - t1
    save_file(student.state_dict(), out / "student.safetensors")
    meanflow, mf_curves = None, {}
    if cfg.meanflow.enabled:
        t_mf = time.perf_counter()
        meanflow, mf_curves = distill_meanflow(
            cfg.meanflow, teacher, _batches(cfg, encoder, cfg.meanflow.batch_size, "mf-data"), negative=negative,
            seed=_seed(cfg.seed, "meanflow"), init_seed=_seed(cfg.seed, "meanflow-init"), progress=cfg.progress)
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
