"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<name>.py``, so this folder is on the
import path): random-weight Wan networks built the way training builds them, a wall-clock step timer, a CUDA
event timer, and the
breakdown of a profiled iteration's Chrome trace by stage and kernel category."""

from __future__ import annotations

import statistics
import time

import torch


def random_wan(cls, name: str, mesh, parallel, *, dtype: torch.dtype, precision: str, trainable: bool,
               seed: int, device: str):
    """A ``cls`` (WanDiT or a subclass) of config ``name`` with random weights: meta build, parallelize
    (``parallel``: an ``rcm_train.parallel.ParallelConfig``), materialize on ``device``, Wan init with a non-zero
    head (speed does not depend on the weights)."""
    from rcm_nets.wan import get_config
    from rcm_train.parallel import parallelize  # here: the kernel benchmarks import this module without it

    with torch.device("meta"):
        net = cls(get_config(name, precision=precision), dtype=dtype)
    parallelize(net, mesh, parallel)
    net.to_empty(device=device)
    torch.manual_seed(seed)  # DTensor random init follows the global generator (same on every rank)
    net.init_weights()
    with torch.no_grad():
        net.head.head.weight.normal_(std=net.config.dim**-0.5)
    return net.requires_grad_(trainable)


def wall_time(fn, warmup: int, iters: int, cuda: bool) -> tuple[float, float | None]:
    """``(median ms, peak GiB)`` of ``fn()`` over ``iters`` calls after ``warmup`` untimed ones (host wall clock
    with a device sync per call); on CPU (smoke runs) no memory figure."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), (torch.cuda.max_memory_allocated() / 2**30 if cuda else None)


def event_time(fn, warmup: int, iters: int) -> float:
    """Median ms of ``fn()`` over ``iters`` calls, each between two CUDA events, after ``warmup`` untimed calls
    and a device sync."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ profiles
KERNEL_CATEGORIES = ("gemm", "attention fwd", "JVP attention", "attention bwd", "fused norm/mod/rope",
                     "elementwise / other Triton", "communication", "memcpy/memset", "other")
"""Device-time categories of :func:`kernel_category`, in table order."""

FUSED_KERNELS = ("_ln_mod_", "_rms_rope_", "_gated_", "_gelu_")
"""Name prefixes of the Triton kernels of ``rcm_kernels.fused`` (modulated LayerNorm, RMSNorm + RoPE, gated
residual, GELU; forward with tangent and backward)."""
ATTN_FWD_KERNELS = ("_jvp_attn_fwd", "_cache_attn_fwd")
"""Name prefixes of the attention forward kernels of ``rcm_kernels.attention`` (with or without a tangent one
kernel; ``_jvp_attn_fwd_ws`` is the warp-specialized Hopper one)."""
ATTN_BWD_KERNELS = ("_bwd_delta", "_bwd_dkdv", "_bwd_dq")
"""Triton attention backward kernels of ``rcm_kernels.attention.triton_jvp``."""

_LIB_ATTN_BWD = ("flash_bwd", "flashattnbwd", "fmha_cutlassb", "flash_bprop", "attention_backward", "attn_bwd")
_LIB_ATTN_FWD = ("flash_fwd", "flashattnfwd", "fmha_cutlassf", "flash_fprop", "attention_forward", "attn_fwd")
_GEMM = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "gemv", "splitkreduce", "triton_tem_fused_mm",
         "triton_tem_fused_addmm", "triton_tem_fused_bmm")
_ELEMENTWISE = ("triton_", "elementwise_kernel", "reduce_kernel", "vectorized_")


def kernel_category(name: str, *, jvp: bool = False) -> str:
    """One of :data:`KERNEL_CATEGORIES` for a device kernel (or memcpy) name as the profiler records it.

    Our Triton kernels are matched by function name (``_jvp_attn_fwd`` is the attention forward with or
    without a tangent, so ``jvp=True``, for a kernel launched inside a JVP pass, makes it ``JVP attention``);
    library kernels by name fragments: SDPA / flash-attn / cuDNN attention, cuBLAS / CUTLASS / nvjet GEMMs,
    Inductor ``triton_*`` kernels and aten elementwise / reduction kernels, NCCL."""
    low = name.lower()
    if low.startswith(("memcpy", "memset")):
        return "memcpy/memset"
    if "nccl" in low:
        return "communication"
    if name.startswith(ATTN_FWD_KERNELS):
        return "JVP attention" if jvp else "attention fwd"
    if name.startswith(ATTN_BWD_KERNELS) or any(s in low for s in _LIB_ATTN_BWD):
        return "attention bwd"
    if any(s in low for s in _LIB_ATTN_FWD):
        return "attention fwd"
    if name.startswith(FUSED_KERNELS):
        return "fused norm/mod/rope"
    if any(s in low for s in _GEMM):
        return "gemm"
    if any(s in low for s in _ELEMENTWISE):
        return "elementwise / other Triton"
    return "other"


def _innermost(ranges: list[tuple[float, float, str]], points: list[float]) -> list[str | None]:
    """Label of the innermost of the (properly nested) ``(start, end, label)`` ranges holding each of the
    sorted ``points`` (None: no range), by one sweep."""
    order = sorted(ranges, key=lambda r: (r[0], -r[1]))
    out, stack, i = [], [], 0
    for t in points:
        while i < len(order) and order[i][0] <= t:
            while stack and stack[-1][1] < order[i][0]:
                stack.pop()
            stack.append(order[i])
            i += 1
        while stack and stack[-1][1] < t:
            stack.pop()
        out.append(stack[-1][2] if stack else None)
    return out


def trace_breakdown(trace: dict, stage_of, root: str) -> dict:
    """Where one profiled iteration spent its time, from its Chrome trace (``prof.export_chrome_trace``).

    ``stage_of(range name) -> stage | None`` names the stage of a host range (``record_function`` or operator;
    None: not a stage boundary); ``root`` is the name of the range around the iteration. Device kernels (CUDA
    runs) go to the stage of their launch, i.e. the innermost stage range around the launch call on the
    launching thread (the autograd thread in backward), and to a :func:`kernel_category`; ``ms`` of a stage is
    then the summed device time of its kernels. Without device kernels (CPU runs) the root range's host
    wall time is split: each instant goes to the innermost stage range of the root's thread, the rest to
    ``other``. Returns ``{basis, wall_ms, device_busy_ms (union of the kernel intervals; None on CPU),
    stages: [{stage, ms, pct}], categories: [{category, ms, pct}], stage_categories: {stage: {category: ms}}}``,
    rows by decreasing ms, ``pct`` of the rows' sum."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    ranges = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation")]  # host side only
    top = next((e for e in ranges if e["name"] == root), None)
    if top is None:
        raise ValueError(f"the trace has no host range named {root!r}")
    t0, t1 = top["ts"], top["ts"] + top["dur"]
    host: dict[object, list] = {}
    for e in ranges:
        if (stage := stage_of(e["name"])) is not None:
            host.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"], stage))
    device = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    stages: dict[str, float] = {}
    cats: dict[str, float] = {}
    cross: dict[str, dict[str, float]] = {}
    if device:
        launch = {e["args"]["correlation"]: e for e in events
                  if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
        where: dict[int, str] = {}
        for tid, ranges in host.items():
            calls = sorted((e["ts"], c) for c, e in launch.items() if e["tid"] == tid)
            where.update(zip((c for _, c in calls), _innermost(ranges, [t for t, _ in calls])))
        for k in device:
            stage = where.get(k.get("args", {}).get("correlation")) or "other"
            cat = kernel_category(k["name"], jvp="jvp" in stage)
            ms = k["dur"] / 1e3
            stages[stage] = stages.get(stage, 0.0) + ms
            cats[cat] = cats.get(cat, 0.0) + ms
            cross.setdefault(stage, {})[cat] = cross.setdefault(stage, {}).get(cat, 0.0) + ms
        spans = sorted((k["ts"], k["ts"] + k["dur"]) for k in device)
        busy, end = 0.0, -float("inf")
        for a, b in spans:  # union of the kernel intervals (streams overlap)
            busy += max(0.0, b - max(a, end))
            end = max(end, b)
        basis, busy_ms = "device kernel time", busy / 1e3
    else:
        ranges = [(max(a, t0), min(b, t1), s) for a, b, s in host.get(top["tid"], []) if b > t0 and a < t1]
        cuts = sorted({t0, t1, *(a for a, _, _ in ranges), *(b for _, b, _ in ranges)})
        mids = [(a + b) / 2 for a, b in zip(cuts, cuts[1:])]
        for (a, b), stage in zip(zip(cuts, cuts[1:]), _innermost(ranges, mids)):
            stages[stage or "other"] = stages.get(stage or "other", 0.0) + (b - a) / 1e3
        basis, busy_ms = "host wall time", None

    def rows(d, key):
        whole = sum(d.values()) or 1.0
        return [{key: k, "ms": v, "pct": 100 * v / whole} for k, v in sorted(d.items(), key=lambda kv: -kv[1])]

    return dict(basis=basis, wall_ms=(t1 - t0) / 1e3, device_busy_ms=busy_ms, stages=rows(stages, "stage"),
                categories=rows(cats, "category"),
                stage_categories={r["stage"]: cross[r["stage"]] for r in rows(stages, "stage") if r["stage"] in cross})


_SHORT = {"gemm": "gemm", "attention fwd": "attn", "JVP attention": "jvp-attn", "attention bwd": "attn-bwd",
          "fused norm/mod/rope": "fused", "elementwise / other Triton": "elemwise", "communication": "comm",
          "memcpy/memset": "memcpy", "other": "other"}


def print_breakdown(title: str, b: dict) -> None:
    """The stage table (ms, %; on device runs also ms per kernel category) and the category table of a
    :func:`trace_breakdown`."""
    busy = "" if b["device_busy_ms"] is None else f", device busy {b['device_busy_ms']:.1f} ms"
    print(f"\n{title}: {b['basis']} by stage (iteration wall {b['wall_ms']:.1f} ms{busy})")
    cats = [c for c in KERNEL_CATEGORIES if any(r["category"] == c for r in b["categories"])]
    print(f"{'stage':<30}{'ms':>10}{'%':>7}" + "".join(f"{_SHORT[c]:>10}" for c in cats))
    for r in b["stages"]:
        row = b["stage_categories"].get(r["stage"], {})
        print(f"{r['stage']:<30}{r['ms']:>10.2f}{r['pct']:>6.1f}%" + "".join(f"{row.get(c, 0.0):>10.2f}" for c in cats))
    if cats:
        print(f"{'kernel category':<30}{'ms':>10}{'%':>7}")
        for r in sorted(b["categories"], key=lambda r: KERNEL_CATEGORIES.index(r["category"])):
            print(f"{r['category']:<30}{r['ms']:>10.2f}{r['pct']:>6.1f}%")
