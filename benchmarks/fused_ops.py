"""Benchmark: the fused DiT ops (rcm_kernels.fused, Triton) vs the unfused torch ops, at the 1.3B 480p shape (GPU).

Default shape: B=1, L=32760 tokens (21 latent frames of 30x52), C=1536, 12 heads of 128, bf16 activations, fp32
modulation rows (the Wan islands). Ops, each as the DiT calls it:

* ``ln_modulate``            LayerNorm + ``·(1 + scale) + shift``, one modulation row, output bf16 (block input);
* ``ln_modulate_per_frame``  the same with per-frame rows (``[B, 21, C]`` + a token→frame index, causal path);
* ``gated_residual``         ``x + y·gate`` in bf16 (teacher numerics);
* ``gated_residual_fp32``    the same computed in fp32 (rCM student numerics), bf16 out;
* ``residual_add_fp32``      ``x + z`` in fp32, fp32 out (the student's cross-attention residual, ``gate=None``);
* ``rms_norm_rope``          q/k RMSNorm over the full width + 3-D RoPE per head;
* ``rope``                   RoPE alone;
* ``gelu_tanh``              the FFN activation on the hidden ``[B, L, F]`` (F = 8960), bf16.

Modes per op: ``primal`` (no tangents, no grad), ``jvp`` (primal + tangents of every input), ``fwd+bwd`` (primal
with grad, then backward; fused: the Triton backward kernels), ``fwd+bwd:recompute`` (the same with the fused
forward and the recompute backward, ``RCM_FUSED_BACKWARD=reference``: autograd through the reference twin).
``unfused`` runs the reference twins (``impl="reference"``: the same op sequence as the DiT's unfused ``_ops``),
``fused`` the Triton kernels (``impl="triton"``); ``--impl both`` (default) runs both in this process and prints
the ratio unfused/fused; the ``fwd+bwd`` row also gives the ratio recompute/Triton backward (``vs recomp``).
``GB/s`` counts the bytes a fused pass must move (inputs read once, outputs written once; for ``fwd+bwd`` the
forward plus the backward's reads of the saved inputs and the output gradient and writes of the input gradients).
Timing: CUDA events, median of ``--iters`` after ``--warmup``. ``MiB u/f`` (``fwd+bwd`` rows): the device memory
one forward + backward allocates beyond its inputs at its peak, unfused / fused (the graph's saved tensors and
the backward's temporaries).

    python benchmarks/fused_ops.py [--tokens 32760 --dim 1536 --heads 12 --ffn-dim 8960] [--impl both|triton|reference]
                                   [--iters 20] [--json fused_ops.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from datetime import date

import torch
from _common import event_time  # this folder is on the path: scripts run from it

from rcm_kernels.fused import apply_rope, gated_residual, gelu_tanh, layer_norm_modulate, rms_norm_rope


def _peak_mib(fn) -> float:
    """Device memory ``fn()`` allocates at its peak beyond what was allocated before, MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _cases(b: int, length: int, c: int, heads: int, frames: int, ffn: int, dev: str = "cuda", bf=torch.bfloat16):
    """``{op: (call(impl, tangents, grad) -> output to backprop, primal bytes, jvp bytes, fwd+bwd bytes)}``."""
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*shape, dtype=bf):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=g)

    x, tx, y, ty = r(b, length, c), r(b, length, c), r(b, length, c), r(b, length, c)
    m1 = [r(b, 1, c, dtype=torch.float32) for _ in range(4)]
    mf = [r(b, frames, c, dtype=torch.float32) for _ in range(4)]
    idx = torch.arange(length, device=dev) * frames // length
    w = r(c)
    half = c // heads // 2
    ang = torch.rand(length, half, device=dev, dtype=torch.float64, generator=g) * 100
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
    x4, tx4 = x.unflatten(-1, (heads, -1)), tx.unflatten(-1, (heads, -1))
    act = b * length * c * 2  # one bf16 activation tensor, bytes

    def req(t, grad):
        return t.detach().requires_grad_(grad)

    def ln(mods, index):
        def call(impl, tan, grad):
            return layer_norm_modulate(req(x, grad), tx if tan else None, req(mods[0], grad),
                                       mods[1] if tan else None, req(mods[2], grad), mods[3] if tan else None,
                                       eps=1e-6, index=index, out_dtype=bf, impl=impl)[0]
        return call

    def gated(compute):
        def call(impl, tan, grad):
            return gated_residual(req(x, grad), tx if tan else None, req(y, grad), ty if tan else None,
                                  req(m1[0], grad), m1[1] if tan else None, compute=compute, impl=impl)[0]
        return call

    def res_add(impl, tan, grad):
        return gated_residual(req(x, grad), tx if tan else None, req(y, grad), ty if tan else None, None, None,
                              compute=torch.float32, out_dtype=torch.float32, impl=impl)[0]

    def rms(impl, tan, grad):
        return rms_norm_rope(req(x, grad), tx if tan else None, req(w, grad), eps=1e-6, heads=heads, cos=cos,
                             sin=sin, impl=impl)[0]

    def rope(impl, tan, grad):
        return apply_rope(req(x4, grad), tx4 if tan else None, cos, sin, impl=impl)[0]

    def gelu(impl, tan, grad):
        return gelu_tanh(req(hid, grad), thid if tan else None, impl=impl)[0]

    hid, thid = r(b, length, ffn), r(b, length, ffn)
    act_f = b * length * ffn * 2
    rope_b = length * half * 4 * 2
    return {"ln_modulate": (ln(m1, None), 2 * act, 4 * act, 5 * act),
            "ln_modulate_per_frame": (ln(mf, idx), 2 * act, 4 * act, 5 * act),
            "gated_residual": (gated(bf), 3 * act, 6 * act, 6 * act),  # ∂x is the incoming gradient itself
            "gated_residual_fp32": (gated(torch.float32), 3 * act, 6 * act, 6 * act),
            "residual_add_fp32": (res_add, 4 * act, 8 * act, 10 * act),  # backward: two fp32 -> bf16 casts
            "rms_norm_rope": (rms, 2 * act + rope_b, 4 * act + rope_b, 5 * act + 2 * rope_b),
            "rope": (rope, 2 * act + rope_b, 4 * act + rope_b, 4 * act + 2 * rope_b),
            "gelu_tanh": (gelu, 2 * act_f, 4 * act_f, 5 * act_f)}


def _runner(call, impl: str, mode: str):
    """A no-argument function running one op once in ``mode``."""
    if mode.startswith("fwd+bwd"):
        def fn():
            out = call(impl, False, True)
            out.backward(torch.ones_like(out))
    else:
        def fn():
            with torch.no_grad():
                call(impl, mode == "jvp", False)
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32760, help="21 frames x 30 x 52 at 480p")
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn-dim", type=int, default=8960)
    ap.add_argument("--frames", type=int, default=21, help="modulation rows of the per-frame case")
    ap.add_argument("--impl", choices=("both", "triton", "reference"), default="both")
    ap.add_argument("--ops", default="all", help="comma-separated op names, or all")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default="fused_ops.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fused_ops.py needs a CUDA device")
    cases = _cases(args.batch, args.tokens, args.dim, args.heads, args.frames, args.ffn_dim)
    ops = list(cases) if args.ops == "all" else args.ops.split(",")
    impls = ["reference", "triton"] if args.impl == "both" else [args.impl]
    modes = ("primal", "jvp", "fwd+bwd") + (("fwd+bwd:recompute",) if "triton" in impls else ())
    rows = []
    for op in ops:
        call, *nbytes = cases[op]
        for mode in modes:
            row = dict(op=op, mode=mode)
            for impl in impls:
                if mode == "fwd+bwd:recompute" and impl == "reference":  # unfused: no fused backward to switch
                    row[impl], row["reference_peak_mib"] = rows[-1][impl], rows[-1]["reference_peak_mib"]
                    continue
                # the fused forward reads the backward switch
                os.environ["RCM_FUSED_BACKWARD"] = "reference" if mode == "fwd+bwd:recompute" else "triton"
                fn = _runner(call, impl, mode)
                row[impl] = event_time(fn, args.warmup, args.iters)
                if mode.startswith("fwd+bwd"):
                    row[f"{impl}_peak_mib"] = _peak_mib(fn)
            if "triton" in row and mode != "fwd+bwd:recompute":
                row["triton_gbps"] = nbytes[modes.index(mode)] / row["triton"] / 1e6
            if len(impls) == 2:
                row["speedup"] = row["reference"] / row["triton"]
            if mode == "fwd+bwd:recompute":
                rows[-1]["vs_recompute"] = row["triton"] / rows[-1]["triton"]
            rows.append(row)
    os.environ.pop("RCM_FUSED_BACKWARD", None)
    meta = dict(date=str(date.today()), device=torch.cuda.get_device_name(), torch=torch.__version__,
                python=platform.python_version(), batch=args.batch, tokens=args.tokens, dim=args.dim,
                heads=args.heads, ffn_dim=args.ffn_dim, frames=args.frames, iters=args.iters)
    print(f"fused DiT ops, B={args.batch} L={args.tokens} C={args.dim} H={args.heads}, bf16, {meta['device']}")
    print(f"{'op':<24}{'mode':<19}{'unfused ms':>11}{'fused ms':>10}{'fused GB/s':>11}{'speedup':>9}{'vs recomp':>10}"
          f"{'MiB u/f':>12}")
    for r in rows:
        cells = [f"{r[k]:.3f}" if k in r else "-" for k in ("reference", "triton")]
        gbps = f"{r['triton_gbps']:.0f}" if "triton_gbps" in r else "-"
        sp, vs = (f"{r[k]:.2f}x" if k in r else "-" for k in ("speedup", "vs_recompute"))
        mib = "/".join(f"{r[k]:.0f}" if k in r else "-" for k in ("reference_peak_mib", "triton_peak_mib"))
        print(f"{r['op']:<24}{r['mode']:<19}{cells[0]:>11}{cells[1]:>10}{gbps:>11}{sp:>9}{vs:>10}"
              f"{mib if r['mode'].startswith('fwd+bwd') else '-':>12}")
    with open(args.json, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
