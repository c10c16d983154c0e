"""Benchmark: ``cache_attention`` (Triton, dequantizing tile by tile) vs the torch path (gather + dequantize +
SDPA) over a bf16 / int8 / fp8 KV cache, at Wan2.1-1.3B geometry.

Geometry: B=1, H=12, D=128, 1560 tokens per latent frame; the queries are one block of 3 frames (4680 tokens),
the cache holds 21 visible frames (3 sink + 18 window; 32760 tokens), and the block's own k/v (4680 tokens, bf16)
come as ``extra_k/extra_v``: 37440 keys in all. FLOPs ``4·B·H·Lq·Lk·D``. Random normal bf16 inputs; the cache
is filled by 7 appends of 3 frames (quantized on write). Timing: ``triton.testing.do_bench`` median. "Extra"
memory: peak bytes *requested* from the CUDA caching allocator during the call above those before it, less the
output (``requested_bytes``, not ``memory_allocated``, which counts the allocator's rounded blocks). The
``sdpa_dense`` row is cuDNN SDPA on contiguous bf16 k/v of the same length (no cache, nothing to gather): the
speed of light for this attention.

    python benchmarks/cache_attention.py --json out.json [--sweep] [--rope]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from rcm_kernels.attention.cache_attention import cache_attention, cache_attention_triton
from rcm_kernels.kv_cache import KVCache

B, H, D, T = 1, 12, 128, 1560
Q_FRAMES, SINK, WINDOW = 3, 3, 18
DT = torch.bfloat16
SWEEP = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 4, 2), (128, 128, 8, 2), (128, 32, 4, 3),
         (64, 64, 4, 2), (64, 128, 4, 2), (64, 64, 4, 3)]


def _cache(kv_dtype: str, rope: bool) -> KVCache:
    c = KVCache(1, batch=B, heads=H, head_dim=D, tokens_per_frame=T, window_frames=WINDOW, sink_frames=SINK,
                max_block_frames=Q_FRAMES, kv_dtype=kv_dtype, keys_pre_rope=rope, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    for _ in range((SINK + WINDOW) // Q_FRAMES):
        k, v = (torch.randn(B, Q_FRAMES * T, H, D, device="cuda", dtype=DT, generator=g) for _ in range(2))
        c.append([k], [v])
    assert c.num_cached_frames == SINK + WINDOW
    return c


def _rope(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    ang = torch.arange(num_tokens, device="cuda", dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(D // 2, device="cuda", dtype=torch.float64) / (D // 2))
    return ang.cos().float(), ang.sin().float()


def _requested(which: str) -> int:
    return torch.cuda.memory_stats()[f"requested_bytes.all.{which}"]


def _measure(fn, rep_ms: int) -> dict:
    """ms (median), extra MiB (peak requested bytes above the start, less the output), or the error."""
    try:
        fn()  # warm-up / compile
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = _requested("current")
        out = fn()
        torch.cuda.synchronize()
        extra = (_requested("peak") - base - out.numel() * out.element_size()) / 2**20
        ms = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
        return {"ms": ms, "extra_mib": extra}
    except Exception as err:  # noqa: BLE001 - a row records why a configuration failed (e.g. shared memory)
        torch.cuda.empty_cache()
        return {"ms": None, "extra_mib": None, "error": f"{type(err).__name__}: {str(err)[:160]}"}


def _bench_cache(kv: str, rope: bool, q, ek, ev, sweep: bool, add) -> None:
    """torch path, Triton kernel (default tiles) and, with ``sweep``, the kernel with each tile config."""
    lay = _cache(kv, rope).layer(0)
    kr = _rope(lay.num_tokens) if rope else None
    ref = cache_attention(q, lay, extra_k=ek, extra_v=ev, k_rope=kr, impl="torch").float()
    add(kv, "torch", lambda: cache_attention(q, lay, extra_k=ek, extra_v=ev, k_rope=kr, impl="torch"), rope)
    add(kv, "triton", lambda: cache_attention(q, lay, extra_k=ek, extra_v=ev, k_rope=kr, impl="triton"), rope,
        ref=ref)
    for cfg in SWEEP if sweep else ():
        add(kv, "triton_sweep",
            lambda cfg=cfg: cache_attention_triton(q, lay, extra_k=ek, extra_v=ev, k_rope=kr, blocks=cfg),
            rope, list(cfg), ref, quick=True)


def _bench_sdpa_dense(q, lk: int, add) -> None:
    g = torch.Generator(device="cuda").manual_seed(2)
    k, v = (torch.randn(B, lk, H, D, device="cuda", dtype=DT, generator=g) for _ in range(2))

    def sdpa():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return o.transpose(1, 2)

    add("bfloat16", "sdpa_dense", sdpa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write rows and metadata here")
    ap.add_argument("--sweep", action="store_true", help="also time the Triton kernel for each tile config")
    ap.add_argument("--rope", action="store_true", help="also pre-RoPE caches (keys rotated in the kernel)")
    ap.add_argument("--rep-ms", type=int, default=100)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("cache_attention benchmark: needs a CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, ek, ev = (torch.randn(B, Q_FRAMES * T, H, D, device="cuda", dtype=DT, generator=g) for _ in range(3))
    lk = (SINK + WINDOW) * T + ek.shape[1]
    flops = 4 * B * H * q.shape[1] * lk * D
    rows: list[dict] = []

    def add(kv, provider, fn, rope=False, blocks=None, ref=None, quick=False):
        rep = args.rep_ms // 2 if quick else args.rep_ms  # sweep rows: shorter timing
        r = {"kv_dtype": kv, "provider": provider, "rope": rope, "blocks": blocks, **_measure(fn, rep)}
        r["tflops"] = None if r["ms"] is None else flops / r["ms"] / 1e9
        if ref is not None and r["ms"] is not None:  # sanity: same result as the torch path (bf16 rounding)
            r["max_abs_diff_vs_torch"] = (fn().float() - ref).abs().max().item()
        rows.append(r)
        print(json.dumps(r), flush=True)

    _bench_sdpa_dense(q, lk, add)
    for rope in (False, True) if args.rope else (False,):
        for kv in ("bfloat16", "int8", "fp8"):
            _bench_cache(kv, rope, q, ek, ev, args.sweep, add)
            torch.cuda.empty_cache()
    meta = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "command": " ".join(["python", *sys.argv]), "lq": q.shape[1], "lk": lk}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
