"""Benchmark: one rCM student iteration and one critic iteration (GPU): time, tokens/s, MFU, peak memory.

Default: Wan2.1 T2V-1.3B with random weights, 480p (latent 21 x 60 x 104 = 32760 tokens), batch 1 per
data-parallel rank, a 512-row text context and a negative embedding (CFG 5). Networks are built on ``meta``,
``parallelize``d (student and fake score: SAC ``--sac``, teacher: bf16 weights, all FSDP2 over the mesh)
and trained with ``rcm_train.trainer.train_step`` + ``rcm_train.objectives.RCMObjective`` — the real loop:

* student iteration = sCM closure + DMD closure (as after the tangent warmup), backward each, AdamW step;
* critic iteration  = no-grad student rollout + fake-score forward/backward, AdamW step.
``--sim-steps n`` fixes the backward-simulation length (the loop cycles 1..4).

Launch on 1 GPU with ``python``, on several with ``torchrun --nproc_per_node N`` (``--cp`` sets the Ulysses
size; the rest of the world is FSDP data parallel).

FLOPs (model FLOPs, multiply-add = 2; activation recomputation is not counted): per DiT call the formula of
``benchmarks/dit_forward.py::flops`` — per block ``2·L·(6C² + 2C·F)`` (self q,k,v,o; cross q,o; FFN) +
``2·Lc·2C²`` (cross k,v) + ``4·L²·C + 4·L·Lc·C`` (attention), plus embeddings and head; a JVP counts linears
twice and attention 3x; a call with backward 3x the forward. Per sample:

* student = teacher fwd x2 (CFG) + student JVP + student fwd+bwd            (sCM)
          + student fwd x(n-1) + student fwd+bwd + fake fwd + teacher fwd x2  (DMD)
* critic  = student fwd x n + fake fwd+bwd

MFU = FLOPs of the global batch / (iteration time x GPUs x peak dense bf16 FLOP/s of one GPU: 989 TFLOP/s
for H100/H200 SXM, or ``--peak-tflops``). tokens/s = global samples x L / time. Peak memory: the allocator
peak of rank 0 during the timed iterations (weights, optimizer state and activations; GiB).

``--compile`` compiles every block of the three networks (regional ``torch.compile``, ``ParallelConfig.compile``);
per case, a ``--sac`` entry may end in ``+compile`` and/or ``+unfused`` (the network's fused norm / modulation
kernels off, ``rcm_nets.wan._ops.fused_ops("off")``, so a compiled block hands those ops to Inductor), and its
mode may carry ``@K`` (``ParallelConfig.sac_blocks``: only the first K blocks checkpointed, e.g.
``attn_only@17+compile``).
``--profile DIR``: after the timed iterations, one more iteration per phase runs under ``torch.profiler``
(CPU + CUDA): Chrome traces ``DIR/<phase>.json`` and a breakdown by stage (teacher / student / fake-score
forward, student ``forward_jvp``, backward, SAC recompute, optimizer, other) and, on GPU, by kernel category
(``_common.kernel_category``), printed and written to the JSON row under ``profile`` (docs/train.md, Benchmark).
``--compare`` runs the old path (``--baseline``, default ``block_wise`` SAC, eager) and then each new case
(``--sac`` modes, with ``--compile`` if given) in the same process, same inputs, and prints new / old ratios of
s/it, MFU and peak memory per phase (warmup 1, 3 timed iterations unless given). ``--smoke``: a CPU run of the
whole script on the tiny config (gloo, Dynamo backend ``aot_eager``), for the test suite; numbers meaningless.

    python benchmarks/train_step.py [--sac mm_only,block_wise] [--frames 21] [--json train_step.json]
    python benchmarks/train_step.py --compare --sac attention,attention+compile,attention+compile+unfused
    torchrun --nproc_per_node 2 benchmarks/train_step.py --cp 2      # or --cp 1: FSDP over 2 GPUs
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
import traceback
from datetime import date

import torch
import torch.distributed as dist
from _common import print_breakdown, random_wan, trace_breakdown, wall_time

from rcm_nets.wan import WanDiT, get_config
from rcm_nets.wan.flops import dit_flops
from rcm_train.objectives import RCMObjective, RCMObjectiveConfig
from rcm_train.parallel import ParallelConfig, build_mesh, init_distributed
from rcm_train.trainer import OptimizerConfig, ScheduleConfig, StepContext, build_optimizer, train_step

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}
DEVICE = "cuda"


def iteration_flops(cfg, tokens: int, text_rows: int, sim_steps: int) -> dict[str, float]:
    """Model FLOPs of one sample's student and critic iterations (see the module docstring)."""
    f = dit_flops(cfg, tokens, text_rows)
    fwd, jvp, train = f["forward"], f["forward_jvp"], f["fwd+bwd"]
    scm = 2 * fwd + jvp + train
    dmd = (sim_steps - 1) * fwd + train + fwd + 2 * fwd
    return {"student": scm + dmd, "critic": sim_steps * fwd + train}


def build(name: str, mesh, parallel: ParallelConfig, *, dtype: torch.dtype, precision: str, trainable: bool,
          seed: int) -> WanDiT:
    """A random-weight WanDiT on the benchmark's device (``_common.random_wan``)."""
    return random_wan(WanDiT, name, mesh, parallel, dtype=dtype, precision=precision, trainable=trainable, seed=seed,
                      device=DEVICE)


def _time(fn, warmup: int, iters: int) -> tuple[float, float | None]:
    """(median ms, peak GiB); on CPU (``--device cpu``, a smoke run of the script) wall time and no memory."""
    return wall_time(fn, warmup, iters, cuda=torch.cuda.is_available() and DEVICE == "cuda")


def _stepper(models, batch, optimizers, objective, ctx):
    return lambda: train_step(models, [batch], optimizers, objective, ctx)


# ------------------------------------------------------------------------------------------ --profile
_MARK = "rcm: "  # prefix of the stage ranges this script adds
_ROOT = "rcm: iteration"


def stage_of(name: str) -> str | None:
    """The stage of a host range of the profiled iteration (None: not a stage): our ``rcm: <stage>`` ranges,
    the autograd engine's nodes and FSDP's backward hooks (``backward``), the optimizer's step and zero_grad."""
    if name.startswith(_MARK) and name != _ROOT:
        return name.removeprefix(_MARK)
    if name.startswith("autograd::engine::evaluate_function") or (name.startswith("FSDP::") and "backward" in name):
        return "backward"
    if name.startswith(("Optimizer.step#", "Optimizer.zero_grad#")):
        return "optimizer"
    return None


def _marked_forward(name: str, forward):
    def call(*args, tangents=None, **kwargs):
        mode = " forward_jvp" if tangents is not None else " forward" if torch.is_grad_enabled() else " forward (no grad)"
        with torch.profiler.record_function(_MARK + name + mode):
            return forward(*args, tangents=tangents, **kwargs)
    return call


def _marked_checkpoint(checkpoint_fn):
    def recomputed(fn):  # the checkpointed block; called again inside backward to recompute its activations
        def call(*args, **kwargs):
            if torch._C._current_graph_task_id() == -1:  # the forward itself
                return fn(*args, **kwargs)
            # not record_function: its enter/exit are torch ops, which a selective-checkpoint recompute
            # would look for among the ops saved in the forward (and fail); this range bypasses the dispatcher
            with torch._C._profiler._RecordFunctionFast(_MARK + "recompute (SAC)"):
                return fn(*args, **kwargs)
        return call
    return lambda fn, *args, **kwargs: checkpoint_fn(recomputed(fn), *args, **kwargs)


@contextlib.contextmanager
def stage_ranges(models: dict):
    """While open: every call of a network is a ``rcm: <name> forward[_jvp| (no grad)]`` range and every
    activation recomputation of a checkpointed block (SAC) inside backward an ``rcm: recompute (SAC)`` one
    (instance attributes set on the networks and their checkpoint wrappers, removed on exit)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    patched = []
    for name, net in models.items():
        net.forward = _marked_forward(name, net.forward)
        patched.append((net, "forward"))
        for m in net.modules():
            if isinstance(m, CheckpointWrapper):
                m.checkpoint_fn, m._rcm_checkpoint_fn = _marked_checkpoint(m.checkpoint_fn), m.checkpoint_fn
                patched.append((m, "checkpoint_fn"))
    try:
        yield
    finally:
        for obj, attr in patched:
            if attr == "forward":
                del obj.forward  # back to the class's method
            else:
                obj.checkpoint_fn = obj._rcm_checkpoint_fn
                del obj._rcm_checkpoint_fn


def profile_phase(step, models: dict, path: str) -> dict:
    """One ``step()`` under the torch profiler with :func:`stage_ranges`: Chrome trace at ``path`` (rank 0)
    and its :func:`_common.trace_breakdown`, plus ``measured_ms`` (host wall clock of the step, synced)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = DEVICE == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with stage_ranges(models), profile(activities=acts) as prof:
        t0 = time.perf_counter()
        with record_function(_ROOT):
            step()
            if cuda:
                torch.cuda.synchronize()
        measured = (time.perf_counter() - t0) * 1e3
    if dist.get_rank() != 0:
        return {}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    prof.export_chrome_trace(path)
    with open(path) as fh:
        out = trace_breakdown(json.load(fh), stage_of, _ROOT)
    return dict(trace=path, measured_ms=measured, **out)


def run_case(args, frames: int, sac: str, compiled: bool = False, unfused: bool = False) -> list[dict]:
    """One (SAC mode, compile, unfused) case: builds its networks and times both phases."""
    from rcm_nets.wan._ops import fused_ops

    with fused_ops("off" if unfused else "auto"):
        return _run_case(args, frames, sac, compiled, unfused)


def _run_case(args, frames: int, sac: str, compiled: bool, unfused: bool) -> list[dict]:
    world = dist.get_world_size()
    # memory still held from an earlier case (should be ~0: otherwise later peaks are inflated)
    left_gib = torch.cuda.memory_allocated() / 2**30 if DEVICE == "cuda" else None
    mesh = build_mesh(1, -1, args.cp)
    cfg = get_config(args.config)
    comp = dict(compile=compiled, compile_backend=args.compile_backend)
    mode, sac_blocks = split_sac(sac)
    par = dict(param_dtype="bfloat16", sac=mode, sac_blocks=sac_blocks, **comp)
    models = {
        "student": build(args.config, mesh, ParallelConfig(**par), dtype=torch.float32,
                         precision="student", trainable=True, seed=0),
        "fake_score": build(args.config, mesh, ParallelConfig(**par), dtype=torch.float32,
                            precision="teacher", trainable=True, seed=1),
        "teacher": build(args.config, mesh, ParallelConfig(param_dtype=None, **comp), dtype=torch.bfloat16,
                         precision="teacher", trainable=False, seed=2),
    }
    oc = OptimizerConfig(lr=1e-6, warmup_steps=0)
    optimizers = {n: build_optimizer(models[n], oc) for n in ("student", "fake_score")}
    g = torch.Generator(device=DEVICE).manual_seed(mesh.dp_rank)
    shape = (args.batch, cfg.in_dim, frames, args.height, args.width)
    batch = {"latent": torch.randn(shape, device=DEVICE, generator=g),
             "embed": torch.randn(args.batch, args.text_rows, cfg.text_dim, device=DEVICE, generator=g).bfloat16()}
    negative = torch.randn(args.text_rows, cfg.text_dim, device=DEVICE, generator=g).bfloat16()
    objective = RCMObjective(RCMObjectiveConfig(), negative_embed=negative)
    schedule = ScheduleConfig(tangent_warmup=0, student_update_freq=5)
    tokens = frames * args.height * args.width // (cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
    fl = iteration_flops(cfg, tokens, args.text_rows, args.sim_steps)
    samples = args.batch * mesh.dp_size
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if DEVICE == "cuda" and k in torch.cuda.get_device_name()), None)
    rows, steps = [], {}
    for phase, trained in (("student", ["student"]), ("critic", ["fake_score"])):
        ctx = StepContext(phase, 0, args.sim_steps - 1, schedule,
                          torch.Generator(device=DEVICE).manual_seed(mesh.dp_rank), has_critic=True)
        step = _stepper(models, batch, {n: optimizers[n] for n in trained}, objective, ctx)
        row = dict(phase=phase, config=args.config, frames=frames, tokens=tokens, world=world, dp=mesh.dp_size,
                   cp=mesh.cp_size, sac=sac, compile=compiled, unfused=unfused, sim_steps=args.sim_steps,
                   batch_per_dp_rank=args.batch, gib_left_from_earlier_cases=left_gib)
        try:
            ms, peak_gib = _time(step, args.warmup, args.iters)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append({**row, "ms": None, "peak_gib": "OOM"})
            continue
        total = fl[phase] * samples
        steps[phase] = step
        rows.append({**row, "ms": ms, "tokens_per_s": samples * tokens / ms * 1e3, "flops": total,
                     "tflops_per_gpu": total / world / ms / 1e9,
                     "mfu": None if peak is None else total / (ms / 1e3) / world / peak, "peak_gib": peak_gib})
    if args.profile:  # after both phases are timed
        for row in rows:
            if row["phase"] in steps:
                _profile_row(args, row, steps[row["phase"]], models)
    return rows


def _profile_row(args, row: dict, step, models: dict) -> None:
    """``row["profile"]``: the breakdown of one more iteration (printed), or the error that stopped it."""
    multi = len(args.cases) > 1 or "," in args.frames
    name = f"{row['phase']}-{_label(row)}-{row['frames']}f.json" if multi else f"{row['phase']}.json"
    try:
        row["profile"] = profile_phase(step, models, os.path.join(args.profile, name))
    except Exception as err:  # noqa: BLE001  (the timed row stands without its profile)
        traceback.print_exc()
        row["profile"] = {"error": f"{type(err).__name__}: {err}"}
    if "stages" in row["profile"]:
        print_breakdown(f"{row['phase']} iteration, {_label(row)}, {row['frames']} frames", row["profile"])


def _print(rows: list[dict]) -> None:
    head = f"{'phase':<8}{'frames':>7}{'GPUs':>5}{'dp':>4}{'cp':>4}{'case':>28}{'ms':>10}{'tok/s':>10}" \
           f"{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}"
    print(head)
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.0f}"
        tps = "-" if r["ms"] is None else f"{r['tokens_per_s']:.0f}"
        tf = "-" if r["ms"] is None else f"{r['tflops_per_gpu']:.0f}"
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        pk = r["peak_gib"] if isinstance(r["peak_gib"], str) else "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"{r['phase']:<8}{r['frames']:>7}{r['world']:>5}{r['dp']:>4}{r['cp']:>4}{_label(r):>28}{ms:>10}"
              f"{tps:>10}{tf:>9}{mfu:>7}{pk:>10}")


def _key(r: dict) -> tuple[str, bool, bool]:
    return r["sac"], bool(r.get("compile")), bool(r.get("unfused"))


def _label(r: dict) -> str:
    return f"{r['sac']}{'+compile' if r.get('compile') else ''}{'+unfused' if r.get('unfused') else ''}"


def split_sac(sac: str) -> tuple[str, int | None]:
    """``mode[@K]`` -> (SAC mode, ``ParallelConfig.sac_blocks``: checkpoint only the first K blocks)."""
    mode, _, k = sac.partition("@")
    if k and not k.isdigit():
        raise SystemExit(f"--sac entry {sac!r}: the block count after '@' must be an integer >= 0")
    return mode, int(k) if k else None


def parse_case(entry: str, compile_all: bool) -> tuple[str, bool, bool]:
    """``mode[@K][+compile][+unfused]`` -> (SAC mode, compile, unfused)."""
    mode, *flags = entry.split("+")
    bad = set(flags) - {"compile", "unfused"}
    if bad:
        raise SystemExit(f"--sac entry {entry!r}: unknown suffix(es) {sorted(bad)}; use +compile and/or +unfused")
    return mode, compile_all or "compile" in flags, "unfused" in flags


def compare_rows(rows: list[dict], baseline: tuple[str, bool, bool]) -> list[dict]:
    """New / old ratios per (frames, phase): s/it (< 1 is faster), MFU (> 1 is better), peak memory."""
    def ok(r):
        return r is not None and r["ms"] is not None

    out = []
    for r in rows:
        if _key(r) == baseline:
            continue
        old = next((b for b in rows if _key(b) == baseline and b["phase"] == r["phase"]
                    and b["frames"] == r["frames"]), None)
        ratio = dict(phase=r["phase"], frames=r["frames"], new=_label(r), old=None if old is None else _label(old))
        if ok(r) and ok(old):
            ratio["s_per_it"] = r["ms"] / old["ms"]
            ratio["mfu"] = None if r.get("mfu") is None else r["mfu"] / old["mfu"]
            ratio["peak"] = None if r["peak_gib"] is None else r["peak_gib"] / old["peak_gib"]
        out.append(ratio)
    return out


def _print_ratios(ratios: list[dict]) -> None:
    print(f"{'phase':<8}{'frames':>7}{'new':>28}{'old':>22}{'s/it x':>9}{'MFU x':>8}{'peak x':>8}")
    for q in ratios:
        cells = [("-" if q.get(k) is None else f"{q[k]:.3f}") for k in ("s_per_it", "mfu", "peak")]
        print(f"{q['phase']:<8}{q['frames']:>7}{q['new']:>28}{q['old'] or '-':>22}{cells[0]:>9}{cells[1]:>8}{cells[2]:>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="t2v-1.3B")
    ap.add_argument("--frames", default="21", help="latent frames, comma-separated list (e.g. 21,11)")
    ap.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
    ap.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
    ap.add_argument("--text-rows", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="samples per data-parallel rank")
    ap.add_argument("--cp", type=int, default=1, help="Ulysses context-parallel size")
    ap.add_argument("--sac", default="block_wise",
                    help="student and fake-score activation checkpointing, comma-separated list; suffixes: +compile "
                         "(compile the blocks), +unfused (RCM fused norm kernels off, e.g. for Inductor to fuse "
                         "the norms itself); mode@K checkpoints the first K blocks only: "
                         "attention,attention+compile,attention+compile+unfused,attn_only@17+compile")
    ap.add_argument("--sim-steps", type=int, default=1, help="backward simulation steps (1..4)")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of every block (new path)")
    ap.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"])
    ap.add_argument("--compare", action="store_true",
                    help="also run the old path (--baseline, eager) in this process first and print new/old ratios")
    ap.add_argument("--baseline", default="block_wise", help="SAC mode of the old path in --compare")
    ap.add_argument("--smoke", action="store_true", help="CPU run of the script on the tiny config (tests)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 2; 1 with --compare)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of one GPU")
    ap.add_argument("--json", default="train_step.json")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="after timing, profile one more iteration per phase: Chrome traces DIR/<phase>.json and "
                         "a breakdown by stage and kernel category (printed and in the JSON rows)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a functional smoke run of this script (tiny config, gloo), no meaningful numbers")
    args = ap.parse_args()
    if args.warmup is None:
        args.warmup = 1 if args.compare else 2
    if args.smoke:  # tiny net, 2 latent frames of 8 x 8, no timing value
        args.device, args.config, args.frames, args.height, args.width = "cpu", "tiny", "2", 8, 8
        args.text_rows, args.warmup, args.iters, args.compile_backend = 16, 0, 1, "aot_eager"
    new = [parse_case(s, args.compile) for s in args.sac.split(",")]
    base = (args.baseline, False, False)
    cases = [base] + [c for c in new if c != base] if args.compare else new
    args.cases = cases
    from rcm_train.parallel.checkpointing import SAC_MODES

    bad = [c[0] for c in cases if split_sac(c[0])[0] not in SAC_MODES]
    if bad:
        raise SystemExit(f"--sac / --baseline: unknown mode(s) {bad}; choose from {', '.join(SAC_MODES)}")
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train_step.py needs CUDA GPUs (or --device cpu for a smoke run)")
    init_distributed("nccl" if DEVICE == "cuda" else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = True  # the reference trainer enables TF32 (student fp32 FFN)
    rows = []
    for frames in map(int, args.frames.split(",")):
        for sac, compiled, unfused in cases:
            try:
                rows += run_case(args, frames, sac, compiled, unfused)
            except Exception as err:  # noqa: BLE001  (a failing new path must not lose the other rows)
                traceback.print_exc()
                rows += [dict(phase=p, config=args.config, frames=frames, world=dist.get_world_size(), dp=0, cp=args.cp,
                              sac=sac, compile=compiled, unfused=unfused, ms=None, peak_gib=f"ERR {type(err).__name__}")
                         for p in ("student", "critic")]
            gc.collect()  # FSDP hooks make reference cycles: free this case's networks before the next
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu"
        meta = dict(date=str(date.today()), device=name, gpus=dist.get_world_size(),
                    torch=torch.__version__, python=platform.python_version(), command=" ".join(sys.argv),
                    text_rows=args.text_rows, latent_hw=[args.height, args.width])
        print(f"rCM train step, {args.config}, {meta['device']} x {meta['gpus']}")
        _print(rows)
        result = dict(meta=meta, rows=rows)
        if args.compare:
            result["ratios"] = compare_rows(rows, base)
            print(f"new / old (old = {args.baseline}, eager; same process, same inputs)")
            _print_ratios(result["ratios"])
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.json}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
