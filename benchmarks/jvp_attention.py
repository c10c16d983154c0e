"""Benchmark: fused JVP attention vs the reference, naive torch.func.jvp over SDPA-math, and cuDNN SDPA forward.

"ours_jvp" is the default route (on sm_90 with triton 3.6 the warp-specialized Hopper kernel, masked calls
included), "ours_jvp_portable" the portable Triton kernel (``RCM_JVP_FWD_KERNEL=triton``), timed in the same process.
Shapes (B=1, H=12, D=128, bf16): self-attention L=8190 and L=32760, cross-attention 32760 x 512, and
block-causal self-attention (3 frames/block, 1560 tokens/frame, 21 frames = 32760 tokens). FLOPs: a forward is
``4·B·H·Lq·Lk·D`` (two matmuls); a JVP counts ``3x`` that (six matmuls); the backward ``2.5x`` (five matmuls);
masked runs count dense FLOPs (so their TFLOP/s is "dense-equivalent"). The ratio column is time / cuDNN
SDPA forward at the same shape. Peak memory is the allocator peak during the call above what was allocated
before it. Timing: ``triton.testing.do_bench`` median after warm-up.

    python benchmarks/jvp_attention.py --json out.json [--sweep] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from datetime import date

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from rcm_kernels import block_causal, jvp_attention
from rcm_kernels.attention import attention_reference
from rcm_kernels.attention import triton_jvp as tj

B, H, D = 1, 12, 128
DT = torch.bfloat16


def _inputs(lq: int, lk: int, tangents: bool = True):
    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda L: torch.randn(B, L, H, D, device="cuda", dtype=DT, generator=g)  # noqa: E731
    q, k, v = mk(lq), mk(lk), mk(lk)
    return (q, k, v, mk(lq), mk(lk), mk(lk)) if tangents else (q, k, v)


def _measure(fn, rep_ms: int = 200):
    """(median ms, peak extra MiB) or (None, reason) when the provider cannot run."""
    torch.cuda.synchronize()
    try:
        fn()  # warm-up / compile
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")
        return ms, peak
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "OOM"
    except Exception as err:  # noqa: BLE001 - a benchmark row records why a provider failed
        torch.cuda.empty_cache()
        return None, f"{type(err).__name__}: {str(err)[:120]}"


def _sdpa_fwd(q, k, v, backend=SDPBackend.CUDNN_ATTENTION):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


@contextlib.contextmanager
def _env(switches: dict[str, str]):
    """The kernels' environment switches set for the body (they read them per call), then restored."""
    old = {key: os.environ.get(key) for key in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for key, val in old.items():
            if val is None:
                del os.environ[key]
            else:
                os.environ[key] = val


def _under(switches: dict[str, str], fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with ``switches`` set (a provider for :func:`_measure`)."""
    with _env(switches):
        return fn(*args, **kwargs)


def _naive_jvp(q, k, v, tq, tk, tv):
    def f(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    return torch.func.jvp(f, (q, k, v), (tq, tk, tv))


def bench_shape(name: str, lq: int, lk: int, mask=None, skip_slow: bool = False) -> list[dict]:
    q, k, v, tq, tk, tv = _inputs(lq, lk)
    fwd_flops = 4 * B * H * lq * lk * D
    providers = {
        "cudnn_sdpa_fwd": (lambda: _sdpa_fwd(q, k, v), 1),
        "ours_jvp": (lambda: jvp_attention(q, k, v, tq, tk, tv, block_mask=mask), 3),
        "ours_jvp_portable": (lambda: _under({"RCM_JVP_FWD_KERNEL": "triton"}, jvp_attention, q, k, v, tq, tk, tv,
                                             block_mask=mask), 3),
        "ours_fwd": (lambda: jvp_attention(q, k, v, block_mask=mask), 1),
    }
    if mask is None:
        providers["flash_sdpa_fwd"] = (lambda: _sdpa_fwd(q, k, v, SDPBackend.FLASH_ATTENTION), 1)
    if not skip_slow:
        providers["reference_jvp"] = (lambda: attention_reference(q, k, v, tq, tk, tv, mask=mask), 3)
        if mask is None:
            providers["naive_func_jvp_sdpa_math"] = (lambda: _naive_jvp(q, k, v, tq, tk, tv), 3)
    rows = []
    for prov, (fn, mult) in providers.items():
        ms, peak = _measure(fn)
        rows.append({"shape": name, "provider": prov, "lq": lq, "lk": lk, "ms": ms,
                     "tflops": None if ms is None else mult * fwd_flops / ms / 1e9,
                     "peak_mib": peak if ms is not None else None, "error": None if ms is not None else peak})
    base = next(r["ms"] for r in rows if r["provider"] == "cudnn_sdpa_fwd")
    for r in rows:
        r["ratio_to_cudnn_fwd"] = None if (r["ms"] is None or base is None) else r["ms"] / base
    rows += bench_backward(name, q, k, v, mask)
    return rows


def bench_backward(name: str, q, k, v, mask) -> list[dict]:
    """Backward of the primal: ours (Triton) and SDPA flash-fed-our-LSE vs SDPA cuDNN/flash backward."""
    lq, lk = q.shape[1], k.shape[1]
    r = tj.jvp_attention_fwd(q, k, v, block_mask=mask)
    do = torch.randn_like(r.out)
    flops = 2.5 * 4 * B * H * lq * lk * D
    def ours(which):
        return lambda: _under({"RCM_ATTN_BWD": which}, tj.attention_bwd, do, q, k, v, r.out, r.lse, block_mask=mask)

    provs = {"ours_bwd_triton": ours("triton")}
    if mask is None:
        provs["ours_bwd_cudnn_fed_lse"] = ours("cudnn")
        provs["ours_bwd_flash_fed_lse"] = ours("flash")
        for label, be in (("cudnn_sdpa_bwd", SDPBackend.CUDNN_ATTENTION), ("flash_sdpa_bwd",
                                                                          SDPBackend.FLASH_ATTENTION)):
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            out = _sdpa_fwd(qq, kk, vv, be)
            dot = do.transpose(1, 2)
            provs[label] = (lambda out=out, qq=qq, kk=kk, vv=vv, dot=dot:
                            torch.autograd.grad(out, (qq, kk, vv), dot, retain_graph=True))
    rows = []
    for prov, fn in provs.items():
        ms, peak = _measure(fn)
        rows.append({"shape": name, "provider": prov, "lq": lq, "lk": lk, "ms": ms,
                     "tflops": None if ms is None else flops / ms / 1e9,
                     "peak_mib": peak if ms is not None else None, "error": None if ms is not None else peak})
    base = next((x["ms"] for x in rows if x["provider"] == "cudnn_sdpa_bwd"), None)
    for x in rows:
        x["ratio_to_cudnn_bwd"] = None if (x["ms"] is None or base is None) else x["ms"] / base
    return rows


def first_call_latency() -> dict:
    """Seconds for the first JVP call in the process (compile) and the first call at a new length."""
    out = {}
    for label, L in (("first_call_s", 4096 + 17), ("new_length_s", 8190 - 33)):
        q, k, v, tq, tk, tv = _inputs(L, L)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        jvp_attention(q, k, v, tq, tk, tv)
        torch.cuda.synchronize()
        out[label] = time.perf_counter() - t0
    return out


SWEEP = [  # (kernel, environment) pairs; each entry overrides the fixed block-config table / switches
    *(("jvp", {"RCM_JVP_FWD_CFG": c}) for c in ("128,64,8,2", "256,32,16,2", "256,32,16,3", "256,64,16,1")),
    ("jvp", {"RCM_JVP_FWD_CFG": "128,64,8,2", "RCM_JVP_TMA": "0"}),
    *(("fwd", {"RCM_ATTN_FWD_CFG": c}) for c in ("128,128,8,3", "256,64,16,2", "256,128,16,2")),
]


def compile_stats() -> list[dict]:
    """Registers, spills and shared memory of every compiled variant of our kernels (the compiler's report)."""
    rows = []
    for kern in (tj._jvp_attn_fwd, tj._bwd_dkdv, tj._bwd_dq):
        for entry in getattr(kern, "device_caches", {}).values():
            for compiled in entry[0].values():
                md = compiled.metadata
                rows.append({"kernel": kern.__name__, "n_regs": getattr(compiled, "n_regs", None),
                             "n_spills": getattr(compiled, "n_spills", None), "shared": getattr(md, "shared", None),
                             "num_warps": getattr(md, "num_warps", None), "num_stages": getattr(md, "num_stages", None),
                             "constants": str(getattr(md, "constants", ""))[:200]})
    return rows


def sweep(L: int = 32760) -> list[dict]:
    """Time each alternative of the fixed block-config table (and the lazy rescale switch) at one length."""
    q, k, v, tq, tk, tv = _inputs(L, L)
    r = tj.jvp_attention_fwd(q, k, v)
    do = torch.randn_like(r.out)
    fns = {"jvp": lambda: tj.jvp_attention_fwd(q, k, v, tq, tk, tv), "fwd": lambda: tj.jvp_attention_fwd(q, k, v),
           "bwd": lambda: tj.attention_bwd(do, q, k, v, r.out, r.lse)}
    rows = []
    for kernel, env in SWEEP:
        with _env(env):
            ms, info = _measure(fns[kernel], rep_ms=100)
        rows.append({"kernel": kernel, "env": env, "ms": ms, "error": None if ms else info})
        print(f"sweep {kernel} {env}: {ms if ms else info}", flush=True)
    return rows


def _print(rows: list[dict]) -> None:
    print(f"{'shape':<22}{'provider':<28}{'ms':>9}{'TFLOP/s':>9}{'ratio':>8}{'peak MiB':>10}")
    for r in rows:
        ratio = r.get("ratio_to_cudnn_fwd", r.get("ratio_to_cudnn_bwd"))
        cells = ("—" if r["ms"] is None else f"{r['ms']:.2f}", "—" if r["tflops"] is None else f"{r['tflops']:.0f}",
                 "—" if ratio is None else f"{ratio:.2f}", r["error"] or f"{r['peak_mib']:.0f}")
        print(f"{r['shape']:<22}{r['provider']:<28}{cells[0]:>9}{cells[1]:>9}{cells[2]:>8}{cells[3]:>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="jvp_attention.json")
    ap.add_argument("--sweep", action="store_true", help="also time the block-config table's alternatives")
    ap.add_argument("--quick", action="store_true", help="skip the slow eager providers at L=32760")
    ap.add_argument("--profile", action="store_true",
                    help="only run one JVP and one plain forward at L=8190 (for ncu --launch-skip 1)")
    args = ap.parse_args()
    if args.profile:
        q, k, v, tq, tk, tv = _inputs(8190, 8190)
        for _ in range(2):
            jvp_attention(q, k, v, tq, tk, tv)
            jvp_attention(q, k, v)
        torch.cuda.synchronize()
        return
    meta = {"date": str(date.today()), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "B": B, "H": H, "D": D,
            "dtype": str(DT)}
    meta.update(first_call_latency())
    mask = block_causal(7, 3, 1560)  # c3-3: 21 frames, 32760 tokens
    rows = []
    for name, lq, lk, m in (("self_8190", 8190, 8190, None), ("self_32760", 32760, 32760, None),
                            ("cross_32760x512", 32760, 512, None), ("blockcausal_c3-3_32760", 32760, 32760, mask)):
        rows += bench_shape(name, lq, lk, m, skip_slow=args.quick and lq > 8190)
        print(f"done {name}", flush=True)
    meta["mask_density"] = mask.density(32760, 32760)
    dense = next(r["ms"] for r in rows if r["shape"] == "self_32760" and r["provider"] == "ours_jvp")
    masked = next(r["ms"] for r in rows if r["shape"].startswith("blockcausal") and r["provider"] == "ours_jvp")
    if dense and masked:
        meta["masked_over_density_times_dense"] = masked / (meta["mask_density"] * dense)
    result = {"meta": meta, "rows": rows, "sweep": sweep() if args.sweep else []}
    try:
        result["compile_stats"] = compile_stats()
    except Exception as err:  # noqa: BLE001 - diagnostics only
        result["compile_stats"] = f"unavailable: {err}"
    for row in result["compile_stats"] if isinstance(result["compile_stats"], list) else []:
        print("compiled", row["kernel"], "regs", row["n_regs"], "spills", row["n_spills"], "smem", row["shared"],
              "warps", row["num_warps"], "stages", row["num_stages"])
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(meta, indent=1))
    _print(rows)


if __name__ == "__main__":
    main()
