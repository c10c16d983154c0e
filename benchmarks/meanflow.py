"""Benchmark: one MeanFlow student iteration, exact JVP vs finite difference (GPU): time, peak memory, and
the tangent error of the finite difference against the exact JVP (docs/meanflow.md).

Default: Wan2.1 T2V-1.3B with random weights (nonzero head), 480p (latent 21 x 60 x 104 = 32760 tokens),
batch 1, a 512-row text context, distillation from a bf16 teacher with CFG 5. The student is a
``MeanFlowWanDiT`` (fp32 master weights, bf16 compute, FSDP2 over one GPU, SAC ``--sac``), trained with
``rcm_train.trainer.train_step`` + ``rcm_train.objectives.meanflow.MeanFlowObjective`` (every sample with
r < t). One iteration:

* exact: teacher fwd x2 (CFG) + student JVP (no grad) + student fwd+bwd + AdamW step;
* fd:    teacher fwd x2 (CFG) + student fwd+bwd + one student fwd at ``(z + h v, r, t + h)`` + AdamW step.

Tangent error: for one batch, ``du/dt`` by the exact JVP and by the forward difference with each ``--fd-eps``
(``h``), both from the same bf16-compute student: ``||fd - exact|| / ||exact||`` (and the max abs error).
``--tiny`` runs the same code on CPU with the tiny config (a smoke run; numbers meaningless).

    python benchmarks/meanflow.py [--sac block_wise] [--fd-eps 5e-3,1e-3] [--json meanflow.json]
    python benchmarks/meanflow.py --tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date

import torch
from _common import random_wan, wall_time

from rcm_losses.meanflow import meanflow_tangent, rf_add_noise, teacher_velocity
from rcm_nets.wan import WanDiT, get_config
from rcm_nets.wan.meanflow import MeanFlowWanDiT
from rcm_train.objectives.meanflow import MeanFlowObjective, MeanFlowObjectiveConfig, meanflow_adapter
from rcm_train.parallel import ParallelConfig, build_mesh, init_distributed
from rcm_train.trainer import OptimizerConfig, ScheduleConfig, StepContext, build_optimizer, train_step

NOT_UNITS = ["patch_embedding", "time_embedding", "time_projection", "text_embedding", "interval_embedding"]


def build(cls, name: str, mesh, parallel: ParallelConfig, *, dtype, precision: str, trainable: bool, seed: int,
          device: str):
    """Random weights (``_common.random_wan``); a MeanFlow student also gets interval-MLP weights."""
    net = random_wan(cls, name, mesh, parallel, dtype=dtype, precision=precision, trainable=trainable, seed=seed,
                     device=device)
    if isinstance(net, MeanFlowWanDiT):  # a trained student depends on r: give the interval MLP weights
        with torch.no_grad():
            net.interval_embedding[2].weight.normal_(std=0.02)
    return net


def run(args) -> dict:
    dev = args.device
    cuda = dev == "cuda"
    mesh = build_mesh(1, -1, 1)
    cfg = get_config(args.config)
    student = build(MeanFlowWanDiT, args.config, mesh,
                    ParallelConfig(sac=args.sac, param_dtype="bfloat16", not_fsdp_units=NOT_UNITS),
                    dtype=torch.float32, precision="student", trainable=True, seed=0, device=dev)
    teacher = build(WanDiT, args.config, mesh, ParallelConfig(param_dtype=None), dtype=torch.bfloat16,
                    precision="teacher", trainable=False, seed=1, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (args.batch, cfg.in_dim, args.frames, args.height, args.width)
    batch = {"latent": torch.randn(shape, device=dev, generator=g),
             "embed": torch.randn(args.batch, args.text_rows, cfg.text_dim, device=dev, generator=g).bfloat16()}
    negative = torch.randn(args.text_rows, cfg.text_dim, device=dev, generator=g).bfloat16()
    opt = {"student": build_optimizer(student, OptimizerConfig(lr=1e-7, warmup_steps=0))}
    tokens = args.frames * args.height * args.width // (cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
    rows = []
    for mode in ("exact", "fd"):
        obj = MeanFlowObjective(MeanFlowObjectiveConfig(jvp=mode, fd_eps=float(args.fd_eps.split(",")[0]),
                                                        ratio_r_neq_t=1.0), negative_embed=negative)
        ctx = StepContext("student", 0, 0, ScheduleConfig(), torch.Generator(device=dev).manual_seed(1))
        step = lambda obj=obj, ctx=ctx: train_step({"student": student, "teacher": teacher}, [batch], opt, obj, ctx)  # noqa: E731
        row = dict(mode=mode, config=args.config, frames=args.frames, tokens=tokens, sac=args.sac, batch=args.batch)
        try:
            ms, peak = wall_time(step, args.warmup, args.iters, cuda)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({**row, "ms": None, "peak_gib": "OOM"})
            continue
        rows.append({**row, "ms": ms, "peak_gib": peak})
        if cuda:
            torch.cuda.empty_cache()
    # tangent error of the finite difference against the exact JVP, same student, same point
    u_fn = meanflow_adapter(student, torch.bfloat16)
    gen = torch.Generator(device=dev).manual_seed(2)
    x = batch["latent"].double()
    eps = torch.randn(shape, device=dev, generator=gen, dtype=torch.float64)
    t = torch.full((args.batch,), 0.8, device=dev, dtype=torch.float64)
    r = torch.full((args.batch,), 0.3, device=dev, dtype=torch.float64)
    errors = []
    with torch.no_grad():
        z = rf_add_noise(x, eps, t)
        v = teacher_velocity(lambda a, b, c: teacher(a, b, c), z, t, batch["embed"], input_dtype=torch.bfloat16)
        _, exact = meanflow_tangent(u_fn.jvp, z, r, t, batch["embed"], v)
        for h in map(float, args.fd_eps.split(",")):
            _, fd = meanflow_tangent(None, z, r, t, batch["embed"], v, mode="fd", fd_eps=h, student=u_fn)
            errors.append(dict(fd_eps=h, rel_l2=((fd - exact).norm() / exact.norm()).item(),
                               max_abs=(fd - exact).abs().max().item(), exact_rms=exact.pow(2).mean().sqrt().item()))
    return dict(rows=rows, tangent_error=errors)


def _print(res: dict) -> None:
    print(f"{'mode':<7}{'frames':>7}{'tokens':>8}{'sac':>12}{'ms':>10}{'peak GiB':>10}")
    for r in res["rows"]:
        ms = "-" if r["ms"] is None else f"{r['ms']:.0f}"
        pk = r["peak_gib"] if isinstance(r["peak_gib"], str) else "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"{r['mode']:<7}{r['frames']:>7}{r['tokens']:>8}{r['sac']:>12}{ms:>10}{pk:>10}")
    print(f"{'fd_eps':<10}{'rel L2 err':>12}{'max abs err':>13}{'|du/dt| rms':>13}")
    for e in res["tangent_error"]:
        print(f"{e['fd_eps']:<10.1e}{e['rel_l2']:>12.3e}{e['max_abs']:>13.3e}{e['exact_rms']:>13.3e}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="t2v-1.3B")
    ap.add_argument("--frames", type=int, default=21, help="latent frames")
    ap.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
    ap.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
    ap.add_argument("--text-rows", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sac", default="block_wise", help="student activation checkpointing")
    ap.add_argument("--fd-eps", default="5e-3,1e-3,2e-2", help="finite-difference steps (the first is timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json", default="meanflow.json")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny config, small latent, gloo")
    args = ap.parse_args(argv)
    args.device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.config, args.frames, args.height, args.width, args.text_rows = "tiny", 2, 4, 4, 8
        args.warmup, args.iters = 0, 1
    elif not torch.cuda.is_available():
        raise SystemExit("benchmarks/meanflow.py needs a CUDA GPU (or --tiny for a CPU smoke run)")
    init_distributed("nccl" if args.device == "cuda" else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = True
    res = run(args)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    meta = dict(date=str(date.today()), device=name, torch=torch.__version__, python=platform.python_version(),
                command=" ".join(sys.argv), text_rows=args.text_rows, latent_hw=[args.height, args.width])
    print(f"MeanFlow student iteration, {args.config}, {name}")
    _print(res)
    with open(args.json, "w") as fh:
        json.dump(dict(meta=meta, **res), fh, indent=1)
    print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
