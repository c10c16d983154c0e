"""Evaluation of the CPU demo: sample every method on the same prompts and noise, score, write the grid.

Methods: the teacher with Euler + CFG at `teacher_steps` and `teacher_few_steps`, the distilled student
with the rCM sampler at each of `student_steps`, and the student before distillation (the teacher's
weights used as a few-step consistency sampler) at the same step counts. Every method starts from the
same initial noise per prompt. Scores come from `shapes_metric.evaluate` against held-out procedural
videos of the same prompts (another seed); the held-out set scored against the reference is reported as
`data_heldout` (the best achievable values for this sample size).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import field_validator
from torch import Tensor, nn

from rcm_losses import MeanFlowAdapter, TrigFlowAdapter, flow_euler_sample, meanflow_sample, rcm_sample
from rcm_pipelines.progress import Progress
from rcm_pipelines.video import video_grid, write_video

from .config import RecipeConfig
from .shapes import SHAPES, Prompt, ShapesConfig, TinyTextEncoder, balanced_prompts, render_videos
from .shapes_metric import evaluate

__all__ = ["EvalConfig", "METRIC_DESCRIPTION", "evaluate_methods", "summarize"]

METRIC_DESCRIPTION = (
    "color_accuracy / direction_accuracy: fraction of samples whose color (foreground-weighted mean RGB, "
    "nearest grammar color) and direction (least-squares velocity of the foreground centroid, nearest "
    "grammar direction) read back from the pixels match the prompt; chance 1/6 and 1/4. prompt_accuracy: "
    "both right. frechet_distance: Frechet distance between Gaussians fitted to 16 hand-made video features "
    "(color, area, centroid, velocity, path straightness, extent, partial coverage (blur), texture, "
    "background level, edge energy, pixel spread), standardized by a held-out reference set of the same "
    "prompts; lower is better; two real sets score ~0.2-0.5. See rcm_recipes/shapes_metric.py."
)


class EvalConfig(RecipeConfig):
    """Sampling, metrics and the grid video."""

    num_samples: int = 96
    """Prompts (one sample each) per method; a multiple of 12 balances colors and directions."""
    teacher_steps: int = 50
    """Euler steps of the reference teacher sampler."""
    teacher_few_steps: int = 4
    """Euler steps of the few-step teacher baseline."""
    student_steps: list[int] = [1, 2, 4]
    """Step counts of the student (rCM sampler)."""
    teacher_shift: float = 3.0
    """Time shift of the teacher's Euler schedule (1 = uniform in RF time; larger spends more steps at
    high noise)."""
    teacher_sigma_max: float | None = None
    """Starting noise level of the teacher sampler (None: pure noise)."""
    student_sigma_max: float = 80.0
    """Starting noise level of the rCM sampler (TrigFlow t0 = atan(sigma_max))."""
    mid_t: list[float] = [1.5, 1.4, 1.0]
    """Intermediate TrigFlow times of the rCM sampler (the first steps - 1 are used)."""
    meanflow_steps: list[int] = [1, 2]
    """Step counts of the MeanFlow student (with --meanflow=true)."""
    grid_columns: int = 8
    """Prompts shown in the grid video."""
    grid_scale: int = 5
    """Upscaling of each grid cell (nearest)."""
    fps: int = 4
    """Frame rate of the grid videos."""

    @field_validator("num_samples")
    @classmethod
    def _multiple_of_12(cls, v: int) -> int:
        if v < 12 or v % 12:
            raise ValueError(f"must be a positive multiple of 12 (balanced colors and directions), got {v}")
        return v


def _velocity(net: nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    return lambda x, timestep, context: net(x, timestep, context)


def _plural(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


@torch.no_grad()
def sample_methods(cfg: EvalConfig, teacher: nn.Module, student: nn.Module, context: Tensor, noise: Tensor, *,
                   guidance: float, seed: int, progress: bool = True,
                   meanflow: nn.Module | None = None) -> dict[str, tuple[Tensor, int]]:
    """``{method: (videos [N, 3, T, H, W] float32 in [-1, 1], network evaluations per sample)}``."""
    uncond = torch.zeros_like(context)
    cfg_calls = 2 if guidance > 1 else 1  # CFG: a conditional and an unconditional call per step
    plan: list[tuple[str, Callable[[Callable], Tensor], int, int]] = []  # (name, run, steps, calls per step)
    for n in (cfg.teacher_steps, cfg.teacher_few_steps):
        plan.append((f"teacher_{n}", lambda cb, n=n: flow_euler_sample(
            _velocity(teacher), noise, context, uncond, guidance=guidance, num_steps=n, shift=cfg.teacher_shift,
            sigma_max=cfg.teacher_sigma_max, input_dtype=torch.float32, timestep_dtype=None, callback=cb),
            n, cfg_calls))
    for name, net in (("student", student), ("untrained_student", teacher)):
        den = TrigFlowAdapter(_velocity(net), input_dtype=torch.float32, timestep_dtype=None)
        for n in cfg.student_steps:
            plan.append((f"{name}_{n}", lambda cb, den=den, n=n: rcm_sample(
                den, noise, context, generator=torch.Generator().manual_seed(seed + n), num_steps=n,
                sigma_max=cfg.student_sigma_max, mid_t=cfg.mid_t, callback=cb), n, 1))
    if meanflow is not None:  # MeanFlow student: z_r = z_t - (t - r) u(z_t, r, t) on a uniform RF grid from t = 1
        u = MeanFlowAdapter(lambda x, t, r, c: meanflow(x, t, c, r=r), input_dtype=torch.float32)
        for n in cfg.meanflow_steps:
            plan.append((f"meanflow_{n}", lambda cb, n=n: meanflow_sample(
                u, noise, context, times=[1 - k / n for k in range(n + 1)]), n, 1))
    out: dict[str, tuple[Tensor, int]] = {}
    with Progress(sum(n * c for *_, n, c in plan), "sampling", unit="eval", disable=not progress) as bar:
        for name, run, n, calls in plan:
            bar.set_postfix(method=name)
            with torch.no_grad():
                video = run(lambda info, calls=calls: bar.update(calls))
            if name.startswith("meanflow"):
                bar.update(n * calls)
            out[name] = (video.float().clamp(-1, 1), n * calls)
    return out


def evaluate_methods(cfg: EvalConfig, data: ShapesConfig, encoder: TinyTextEncoder, teacher: nn.Module,
                     student: nn.Module, *, guidance: float, seed: int, out_dir: str | Path,
                     progress: bool = True, meanflow: nn.Module | None = None) -> dict[str, Any]:
    """Sample, score and write ``grid.mp4`` / ``grid.gif`` into `out_dir`; returns the metrics report."""
    prompts = balanced_prompts(cfg.num_samples)
    context = encoder([p.text for p in prompts])
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((cfg.num_samples, 3, data.frames, data.size, data.size), generator=g)
    heldout = render_videos(prompts, data, torch.Generator().manual_seed(seed + 1))
    reference = render_videos(prompts, data, torch.Generator().manual_seed(seed + 2))
    samples = sample_methods(cfg, teacher, student, context, noise, guidance=guidance, seed=seed, progress=progress,
                             meanflow=meanflow)
    methods: dict[str, dict[str, Any]] = {"data_heldout": {"steps": 0, "network_evaluations": 0,
                                                           **evaluate(heldout, prompts, reference)}}
    for name, (video, nfe) in samples.items():
        steps = int(name.rsplit("_", 1)[1])
        methods[name] = {"steps": steps, "network_evaluations": nfe, **evaluate(video, prompts, reference)}
    cols = _grid_columns(prompts, cfg.grid_columns)
    rows = {"held-out\ndata": heldout[cols]}
    rows.update({f"teacher\n{_plural(n)}": samples[f"teacher_{n}"][0][cols]
                 for n in (cfg.teacher_steps, cfg.teacher_few_steps)})
    rows.update({f"student\n{_plural(n)}": samples[f"student_{n}"][0][cols] for n in cfg.student_steps})
    rows.update({f"MeanFlow\n{_plural(n)}": samples[f"meanflow_{n}"][0][cols] for n in cfg.meanflow_steps
                 if f"meanflow_{n}" in samples})
    grid = video_grid(rows, column_labels=[f"{prompts[i].color}\n{prompts[i].shape} {prompts[i].direction}"
                                           for i in cols], scale=cfg.grid_scale)
    for suffix in (".mp4", ".gif"):
        write_video(grid, Path(out_dir) / f"grid{suffix}", fps=cfg.fps)
    return {"metric": METRIC_DESCRIPTION, "chance": {"color_accuracy": 1 / 6, "direction_accuracy": 1 / 4},
            "num_samples": cfg.num_samples, "guidance": guidance, "methods": methods,
            "checks": _checks(methods, cfg)}


def _grid_columns(prompts: list[Prompt], k: int) -> list[int]:
    """Indices of the samples shown: the first half of the columns from the first prompts of one shape, the
    rest from the first of the other, when both shapes have enough prompts; else the first `k` prompts."""
    k = min(k, len(prompts))
    halves = [[i for i, p in enumerate(prompts) if p.shape == s] for s in SHAPES]
    take = ((k + 1) // 2, k // 2)
    if all(len(h) >= n for h, n in zip(halves, take, strict=True)):
        return [i for h, n in zip(halves, take, strict=True) for i in h[:n]]
    return list(range(k))


def _checks(methods: dict[str, dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    """The claims the demo makes, with the numbers they rest on.

    * student close to teacher: the 4-step (largest) student's prompt accuracy is within 0.15 of the
      many-step teacher's and its FD at most twice the teacher's FD plus the held-out data's FD + 1;
    * student far better than the few-step teacher: its FD is under half the few-step teacher's;
    * distillation helped: at every step count the student's FD is below the untrained student's (the
      teacher's weights in the same sampler), and at one step below half of it.
    """
    n, n1 = max(cfg.student_steps), min(cfg.student_steps)
    s, t, tf = (methods[f"student_{n}"], methods[f"teacher_{cfg.teacher_steps}"],
                methods[f"teacher_{cfg.teacher_few_steps}"])
    fd = lambda name: methods[name]["frechet_distance"]
    fd_floor = methods["data_heldout"]["frechet_distance"] + 1.0
    return {
        "student_close_to_teacher": bool(s["prompt_accuracy"] >= t["prompt_accuracy"] - 0.15
                                          and s["frechet_distance"] <= 2 * t["frechet_distance"] + fd_floor),
        "student_far_better_than_few_step_teacher": bool(s["frechet_distance"] < 0.5 * tf["frechet_distance"]),
        "distillation_improved_student": bool(
            all(fd(f"student_{k}") < fd(f"untrained_student_{k}") for k in cfg.student_steps)
            and fd(f"student_{n1}") < 0.5 * fd(f"untrained_student_{n1}")),
        "compared": {"student": f"student_{n}", "teacher": f"teacher_{cfg.teacher_steps}",
                     "few_step_teacher": f"teacher_{cfg.teacher_few_steps}"},
    }


def summarize(report: dict[str, Any], out_dir: str | Path) -> str:
    """A plain-text table of the report for the console."""
    lines = [f"{'method':<22}{'NFE':>5}{'color':>8}{'direction':>11}{'both':>7}{'FD':>10}"]
    for name, m in report["methods"].items():
        lines.append(f"{name:<22}{m['network_evaluations']:>5}{m['color_accuracy']:>8.2f}"
                     f"{m['direction_accuracy']:>11.2f}{m['prompt_accuracy']:>7.2f}{m['frechet_distance']:>10.2f}")
    checks = {k: v for k, v in report["checks"].items() if isinstance(v, bool)}
    lines += [f"{k}: {'yes' if v else 'NO'}" for k, v in checks.items()]
    if "wall_time_s" in report:
        lines.append("wall time (s): " + ", ".join(f"{k} {v}" for k, v in report["wall_time_s"].items()))
    lines.append(f"outputs in {out_dir}/: grid.mp4, grid.gif, loss_curves.png, metrics.json, config.yaml")
    return "\n".join(lines)
