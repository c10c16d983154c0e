"""Benchmark: masked primal attention (forward, forward+backward) through every backend, against our Triton kernel.

Providers (one process, same inputs): ``rcm`` (our masked Triton kernel, ``rcm_kernels.attention.attention``:
tile table from the mask, empty tiles skipped, full tiles unmasked), ``flex`` (compiled FlexAttention, Triton,
``BlockMask`` from ``mask.flex``), ``flex_fa4`` (the same with ``kernel_options={"BACKEND": "FLASH"}``: torch's
flash-attn-4 CuTeDSL backend; only where ``flash_attn.cute`` imports) and ``sdpa_cudnn`` (cuDNN SDPA with the
dense ``[L, L]`` boolean mask; it visits every tile). Geometry: causal rCM on Wan2.1-1.3B, B=1, H=12, D=128,
21 latent frames x 1560 tokens (32760), block-causal with blocks of 3 frames (c3-3), and teacher forcing over
``[clean ; noisy]`` (2x the length: 65520). bf16 inputs, N(0, 1). Timing: ``triton.testing.do_bench`` median;
``fwd`` under ``torch.no_grad``, ``fwd+bwd`` one forward and ``backward`` of a fixed random ``dO``. TFLOP/s
count only allowed (query, key) pairs: ``4·B·H·D·pairs`` for the forward, 3.5x that for forward+backward (the
backward is 5 matmuls to the forward's 2). ``ratio``: ms over our kernel's ms, same mask and mode (< 1: faster
than ours). ``max_abs_vs_rcm``: largest output difference from our kernel (bf16 rounding only). A provider
that cannot run a row records the first line of its error instead.

    PYTHONPATH=packages/rcm-kernels/src python3 benchmarks/masked_attention.py --json masked_attention.json
    ... --masks teacher_forcing --providers rcm,flex_fa4   # a subset (each row compiles its kernels first)
    python3 benchmarks/masked_attention.py --smoke   # CPU, tiny shapes: checks the script end to end
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import statistics
import sys
import time
from datetime import date

import torch

from rcm_kernels import block_causal, teacher_forcing
from rcm_kernels.attention import attention
from rcm_kernels.attention.backends import sdpa_like_attention

FULL = dict(batch=1, heads=12, head_dim=128, tokens_per_frame=1560, frames=21, frames_per_block=3)
SMOKE = dict(batch=1, heads=2, head_dim=16, tokens_per_frame=5, frames=6, frames_per_block=2)
PROVIDERS = ("rcm", "flex", "flex_fa4", "sdpa_cudnn")
MASKS = ("block_causal", "teacher_forcing")
_DENSE: dict[int, tuple] = {}  # id(mask) -> (mask, dense bool mask): sdpa_cudnn's input, built once


def _fa4_importable() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:
        return False


def _call(provider: str, q, k, v, mask):
    if provider == "rcm":
        return attention(q, k, v, block_mask=mask)  # Triton on CUDA, the reference elsewhere
    if provider == "sdpa_cudnn":  # the dense [Lq, Lk] mask is built once per mask object, outside the timing
        dense = _DENSE.setdefault(id(mask), (mask, mask.dense(q.shape[1], k.shape[1], q.device)))[1]
        return sdpa_like_attention(q, k, v, block_mask=dense, backend="cudnn" if q.is_cuda else "math")
    return sdpa_like_attention(q, k, v, block_mask=mask, backend=provider)


def _timer(fn, rep_ms: int, cuda: bool) -> float:
    if cuda:
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {(text.splitlines() or [''])[0][:200]}"


def _row(provider: str, mode: str, q, k, v, d_out, mask, rep_ms: int) -> tuple[dict, torch.Tensor | None]:
    """Time one provider in one mode; returns the row and (forward mode) its output."""
    cuda = q.is_cuda
    try:
        if mode == "fwd":
            def fn():
                with torch.no_grad():
                    return _call(provider, q, k, v, mask)
        else:
            leaves = [x.detach().requires_grad_() for x in (q, k, v)]

            def fn():
                for x in leaves:
                    x.grad = None
                o = _call(provider, *leaves, mask)
                o.backward(d_out)
                return o
        out = fn()  # warm-up: compiles (Flex, FA4 JIT, Triton autotune)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        fn()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else None
        ms = _timer(fn, rep_ms, cuda)
        return {"ms": ms, "peak_extra_mib": peak}, out.detach()
    except Exception as err:  # noqa: BLE001 - a row records why a provider cannot run it
        if cuda:
            torch.cuda.empty_cache()
        return {"ms": None, "peak_extra_mib": None, "error": _first_line(err)}, None


def run(smoke: bool, providers: list[str], rep_ms: int, mask_kinds: tuple[str, ...] = MASKS
        ) -> tuple[list[dict], dict]:
    g = SMOKE if smoke else FULL
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    blocks = g["frames"] // g["frames_per_block"]
    make = {"block_causal": block_causal, "teacher_forcing": teacher_forcing}
    tag = f"c{g['frames_per_block']}-{g['frames_per_block']}"
    masks = {f"{kind}_{tag}": make[kind](blocks, g["frames_per_block"], g["tokens_per_frame"])
             for kind in mask_kinds}
    rows = []
    for mask_name, mask in masks.items():
        L = mask.num_tokens
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v, d_out = (torch.randn(g["batch"], L, g["heads"], g["head_dim"], device=device, dtype=dtype,
                                      generator=gen) for _ in range(4))
        density = mask.density(L, L, device)
        fwd_flops = 4 * g["batch"] * g["heads"] * g["head_dim"] * density * L * L
        for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
            ours_ms, ours_out = None, None
            for provider in providers:
                if provider == "flex_fa4" and not _fa4_importable():
                    r = {"ms": None, "peak_extra_mib": None, "error": "flash_attn.cute not importable"}
                    out = None
                else:
                    r, out = _row(provider, mode, q, k, v, d_out, mask, rep_ms)
                if provider == "rcm":
                    ours_ms, ours_out = r["ms"], out
                row = {"mask": mask_name, "tokens": L, "density": density, "mode": mode, "provider": provider,
                       **r}
                row["tflops"] = None if r["ms"] is None else flops / r["ms"] / 1e9
                row["ratio"] = None if r["ms"] is None or not ours_ms else r["ms"] / ours_ms
                row["max_abs_vs_rcm"] = (None if out is None or ours_out is None
                                         else (out.float() - ours_out.float()).abs().max().item())
                rows.append(row)
                print(json.dumps(row), flush=True)
                del out
            del ours_out
            _DENSE.clear()
            if device == "cuda":
                torch.cuda.empty_cache()
    meta = {"date": date.today().isoformat(), "smoke": smoke, "geometry": g, "dtype": str(dtype),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "python": platform.python_version(), "command": " ".join(["python3", *sys.argv])}
    for key, dist in (("triton", "triton"), ("flash_attn_4", "flash-attn-4"), ("cutlass_dsl", "nvidia-cutlass-dsl")):
        try:  # distribution versions: flash_attn.cute's own __version__ is not set by the flash-attn-4 wheel
            meta[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            meta[key] = None
    return rows, meta


def table(rows: list[dict]) -> str:
    head = f"{'mask':<22} {'mode':<8} {'provider':<11} {'ms':>9} {'TFLOP/s':>8} {'ratio':>6} {'max|d|':>8}  note"
    lines = [head, "-" * len(head)]
    def fmt(x, width: int, spec: str) -> str:
        return f"{'-':>{width}}" if x is None else f"{x:{width}{spec}}"

    for r in rows:
        lines.append(f"{r['mask']:<22} {r['mode']:<8} {r['provider']:<11} {fmt(r['ms'], 9, '.3f')} "
                     f"{fmt(r['tflops'], 8, '.1f')} {fmt(r['ratio'], 6, '.2f')} "
                     f"{fmt(r['max_abs_vs_rcm'], 8, '.1e')}  {r.get('error', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write rows and metadata here")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (fp32): checks the script runs")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list from {PROVIDERS}")
    ap.add_argument("--masks", default=",".join(MASKS), help=f"comma list from {MASKS}")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per row (ms)")
    args = ap.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad or "rcm" not in providers:
        sys.exit(f"masked_attention benchmark: --providers must include 'rcm' and be from {PROVIDERS}, got {bad}")
    mask_kinds = tuple(m for m in args.masks.split(",") if m)
    if not mask_kinds or any(m not in MASKS for m in mask_kinds):
        sys.exit(f"masked_attention benchmark: --masks must be from {MASKS}, got {args.masks!r}")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("masked_attention benchmark: needs a CUDA device (or --smoke for the CPU check)")
    providers = ["rcm"] + [p for p in providers if p != "rcm"]  # ratios need ours first
    rows, meta = run(args.smoke, providers, args.rep_ms, mask_kinds)
    print(table(rows))
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
