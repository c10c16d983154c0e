"""Benchmark: WanDiT forward and forward_jvp at 480p (GPU): time, TFLOP/s and peak memory.

Default: the T2V-1.3B config with random weights in bf16, one sample of 21 latent frames at 60x104
(30x52 = 1560 tokens per frame, 32760 tokens), a 512-row text context, one timestep. Rows:

* ``forward``       plain forward under ``no_grad`` (teacher numerics: bf16 FFN and residual adds);
* ``forward_student`` the same with the rCM student's fp32 FFN + residual adds (``precision="student"``);
* ``forward_jvp``   the sCM student's JVP pass (tangents in x and t, student numerics, ``no_grad``);
* ``fwd+bwd``       (``--backward``) a student forward with grad plus backward (training cost; large memory).

FLOPs (written out in ``flops()``): per block, linears ``2·L·(6C² + 2C·F)`` (self q,k,v,o; cross q,o; FFN)
plus ``2·Lc·2C²`` (cross k,v on the context), self-attention ``4·L²·C`` and cross-attention ``4·L·Lc·C``;
plus the patch embedding, head and text/time embeddings. JVP: linears on x twice (primal + tangent; the
context k,v once), attention 3x (the fused JVP kernel's six matmuls). Backward: 2x the forward.
Timing: CUDA events, median of ``--iters`` after ``--warmup``. Peak memory: allocator peak during the call
above what was allocated before it (weights and inputs excluded).
Fused DiT ops (``--fused``): ``auto`` (default: the fused Triton norm/modulation/residual/RoPE kernels of
rcm_kernels.fused on CUDA), ``off`` (the unfused torch ops), ``compare`` (each case both ways in this process,
with the ratio unfused ms / fused ms).

    python benchmarks/dit_forward.py [--config t2v-1.3B] [--frames 21 --height 60 --width 104]
                                     [--iters 5] [--backward] [--fused auto|off|compare] [--json dit_forward.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch
from _common import event_time  # this folder is on the path: scripts run from it

from rcm_nets.wan import WanDiT, get_config
from rcm_nets.wan._ops import fused_ops
from rcm_nets.wan.flops import dit_flops as flops


def _measure(fn, warmup: int, iters: int) -> tuple[float | None, float | str]:
    """(median ms, peak extra GiB) or (None, reason)."""
    try:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = event_time(fn, 0, iters)
        return ms, (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "OOM"


def build(name: str, dtype: torch.dtype) -> WanDiT:
    """Random weights on the GPU: meta build, materialize, Wan init, then a non-zero head."""
    with torch.device("meta"):
        net = WanDiT.from_config(name, dtype=dtype)
    net.to_empty(device="cuda")
    net.init_weights(generator=torch.Generator(device="cuda").manual_seed(0))
    with torch.no_grad():
        net.head.head.weight.normal_(std=net.config.dim**-0.5)
    return net


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="t2v-1.3B")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
    ap.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
    ap.add_argument("--text-rows", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backward", action="store_true", help="also time a student forward+backward")
    ap.add_argument("--fused", choices=("auto", "off", "compare"), default="auto",
                    help="fused DiT ops: auto (on CUDA), off, or compare both in one run")
    ap.add_argument("--json", default="dit_forward.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("dit_forward.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True  # the reference trainer enables TF32 (student fp32 FFN)
    dt = torch.bfloat16
    cfg = get_config(args.config)
    net = build(args.config, dt)
    g = torch.Generator(device="cuda").manual_seed(1)
    shape = (1, cfg.in_dim, args.frames, args.height, args.width)
    x = torch.randn(shape, device="cuda", dtype=dt, generator=g)
    tx = torch.randn(shape, device="cuda", dtype=dt, generator=g)
    t = torch.tensor([875.0], device="cuda")
    tt = torch.tensor([310.0], device="cuda")
    ctx = torch.randn(1, args.text_rows, cfg.text_dim, device="cuda", dtype=dt, generator=g)
    tokens = args.frames * args.height * args.width // (cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
    fl = flops(cfg, tokens, args.text_rows)

    def run(precision: str, jvp: bool = False, backward: bool = False):
        net.precision = precision
        if backward:
            net(x, t, ctx).float().square().mean().backward()
            net.zero_grad(set_to_none=True)
            return
        with torch.no_grad():
            net.forward_jvp(x, t, ctx, tx, tt) if jvp else net(x, t, ctx)

    cases = [("forward", "teacher", dict()), ("forward_student", "student", dict()),
             ("forward_jvp", "student", dict(jvp=True))]
    if args.backward:
        cases.append(("fwd+bwd", "student", dict(backward=True)))
    rows = []
    modes = ("off", "auto") if args.fused == "compare" else (args.fused,)
    for name, precision, kw in cases:
        f = fl["forward_jvp" if kw.get("jvp") else "fwd+bwd" if kw.get("backward") else "forward"]
        for mode in modes:
            with fused_ops(mode):
                ms, peak = _measure(lambda p=precision, k=kw: run(p, **k), args.warmup, args.iters)
            rows.append(dict(case=name, precision=precision, fused=mode, ms=ms, peak_gib=peak,
                             tflops=None if ms is None else f / ms / 1e9, flops=f))
        if len(modes) == 2 and rows[-1]["ms"] and rows[-2]["ms"]:
            rows[-1]["speedup"] = rows[-2]["ms"] / rows[-1]["ms"]
    meta = dict(date=str(date.today()), device=torch.cuda.get_device_name(), torch=torch.__version__,
                python=platform.python_version(), config=args.config, dtype="bfloat16", latent=list(shape),
                tokens=tokens, text_rows=args.text_rows, iters=args.iters, fused=args.fused,
                params=sum(p.numel() for p in net.parameters()),
                weights_gib=sum(p.numel() * p.element_size() for p in net.parameters()) / 2**30)
    print(f"WanDiT {args.config} bf16, latent {list(shape)} = {tokens} tokens, {meta['device']}")
    print(f"{'case':<18}{'precision':<10}{'fused':<7}{'ms':>10}{'TFLOP/s':>10}{'peak GiB':>10}{'speedup':>9}")
    for r in rows:
        ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.0f}"
        pk = r["peak_gib"] if isinstance(r["peak_gib"], str) else f"{r['peak_gib']:.2f}"
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(f"{r['case']:<18}{r['precision']:<10}{r['fused']:<7}{ms:>10}{tf:>10}{pk:>10}{sp:>9}")
    with open(args.json, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
