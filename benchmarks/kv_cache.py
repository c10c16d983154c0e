"""Benchmark: KV cache storage formats (bytes per token, attention error vs the exact cache, speed) and the
length-extrapolation policies over a run of 10x the trained length.

Formats: bf16, int8, fp8 (e4m3), int8/fp8 with smoothed keys (``key_smoothing="first_block"``), int4 with groups
of 64 and 32 (``rcm_kernels.quant``, docs/kv_cache.md). Per format:

* ``bytes_per_token``: ``KVCache.nbytes()`` of one layer / stored tokens (codes + scales of k and v, all heads),
  and the ratio to bf16;
* ``rel_err_gauss`` / ``rel_err_outlier``: ``‖o' − o‖ / ‖o‖`` of ``cache_attention`` over the stored cache vs
  float64 attention over the unquantized k/v (the first ``--err-queries`` queries of the block). "gauss":
  standard normal q, k, v; "outlier": key channels with log-normal magnitudes (σ 0.8) and offsets of 2x their
  magnitude, q scaled by 2 (a peakier softmax);
* ``ms_torch`` / ``ms_triton``: median time of ``cache_attention(impl=...)`` for one block of queries
  (``triton.testing.do_bench`` on CUDA; the Triton row is absent on CPU).

Long run, per policy (``sink_window`` with absolute or re-indexed positions, ``infinity_rope``,
``rolling_sink``): a model "trained" on ``L`` frames generates ``10·L`` frames in blocks; each block attends to
the cache (random q and block k/v, keys pre-RoPE rotated by the policy's positions) and is written and
committed. Rows: cache bytes at start and end, the most visible frames, the largest RoPE frame offset a query
sees (the trained maximum is ``L − 1``), ms per block, and on CUDA the peak allocated bytes of the first and the
last tenth of the run.

Geometry: Wan2.1-1.3B (H=12, D=128, 1560 tokens per latent frame, blocks of 3 frames, L = 21, one layer) on
CUDA; ``--smoke`` uses tiny shapes that run on CPU in seconds (H=2, D=32, 16 tokens, blocks of 2, L = 8).
The long-run cache stores int8.

    python benchmarks/kv_cache.py [--smoke] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date

import torch

from rcm_kernels.attention.cache_attention import cache_attention
from rcm_kernels.attention.reference import attention_reference
from rcm_kernels.kv_cache import KVCache

FORMATS = [("bfloat16", {}), ("int8", {}), ("fp8", {}), ("int8+smooth", {"key_smoothing": "first_block"}),
           ("fp8+smooth", {"key_smoothing": "first_block"}), ("int4/64", {"group_size": 64}),
           ("int4/32", {"group_size": 32})]


def _geometry(smoke: bool) -> dict:
    if smoke:
        return dict(h=2, d=32, t=16, n=2, trained=8, sink=2, window=4, err_queries=16)
    return dict(h=12, d=128, t=1560, n=3, trained=21, sink=3, window=15, err_queries=256)


def _policies(g: dict) -> dict[str, dict]:
    """Each policy at an attention span of the trained length (sink + window + block = L); rolling_sink at the
    released defaults in blocks (bank 6 blocks, sink 5, recent 1) where L allows."""
    s, w, n, L = g["sink"], g["window"], g["n"], g["trained"]
    bank = L - n
    return {
        "sink_window/absolute": dict(sink_frames=s, window_frames=w),
        "sink_window/reindexed": dict(sink_frames=s, window_frames=w, position_policy="reindexed"),
        "infinity_rope": dict(sink_frames=s, window_frames=w, extrapolation="infinity_rope", trained_frames=L),
        "rolling_sink": dict(sink_frames=bank - n, window_frames=n, extrapolation="rolling_sink",
                             sink_bank_frames=bank),
    }


def _rope(pos_frames: torch.Tensor, t: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal-only RoPE table ``[F·T, D/2]`` for frame positions (the kernel's rotation cost is the same)."""
    freq = 10000.0 ** (-torch.arange(d // 2, device=pos_frames.device, dtype=torch.float64) / (d // 2))
    ang = pos_frames.double().repeat_interleave(t)[:, None] * freq
    return ang.cos().float(), ang.sin().float()


def _time_ms(fn, dev: torch.device) -> float:
    if dev.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
    fn()
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def _data(kind: str, g: dict, frames: int, dev, gen) -> tuple[torch.Tensor, ...]:
    h, d, t = g["h"], g["d"], g["t"]
    k = torch.randn(1, frames * t, h, d, device=dev, generator=gen)
    v = torch.randn(1, frames * t, h, d, device=dev, generator=gen)
    q = torch.randn(1, g["n"] * t, h, d, device=dev, generator=gen)
    if kind == "outlier":
        mag = torch.exp(0.8 * torch.randn(h, d, device=dev, generator=gen))
        k = (k + 2 * torch.randn(h, d, device=dev, generator=gen)) * mag
        q = 2 * q
    return q, k, v


def bench_formats(g: dict, dev: torch.device, dt: torch.dtype, rows: list) -> None:
    h, d, t, n = g["h"], g["d"], g["t"], g["n"]
    frames = g["sink"] + g["window"]  # visible frames; filled by blocks of n
    gen = torch.Generator(device=dev).manual_seed(0)
    data = {kind: _data(kind, g, frames, dev, gen) for kind in ("gauss", "outlier")}
    bf16_bytes = None
    for name, kw in FORMATS:
        fmt = name.split("+")[0].split("/")[0]
        row: dict = {"table": "formats", "format": name}
        for kind, (q, k, v) in data.items():
            c = KVCache(1, batch=1, heads=h, head_dim=d, tokens_per_frame=t, window_frames=frames,
                        max_block_frames=n, kv_dtype=fmt, device=dev, **kw)
            for i in range(0, frames, n):
                c.append([k[:, i * t:(i + n) * t].to(dt)], [v[:, i * t:(i + n) * t].to(dt)])
            lay = c.layer(0)
            qe = q[:, :g["err_queries"]]
            exact = attention_reference(qe.double(), k.double(), v.double()).out
            got = cache_attention(qe.to(dt), lay).double()
            row[f"rel_err_{kind}"] = ((got - exact).norm() / exact.norm()).item()
            if kind == "gauss":
                row["bytes_per_token"] = c.nbytes() / (c.storage()[0].shape[2] * t)
                bf16_bytes = bf16_bytes or row["bytes_per_token"]
                row["vs_bf16"] = row["bytes_per_token"] / bf16_bytes
                qd = q.to(dt)
                row["ms_torch"] = _time_ms(lambda qd=qd, lay=lay: cache_attention(qd, lay, impl="torch"), dev)
                row["ms_triton"] = (_time_ms(lambda qd=qd, lay=lay: cache_attention(qd, lay, impl="triton"), dev)
                                    if dev.type == "cuda" else None)
            del c
        rows.append(row)
        print(json.dumps(row), flush=True)


def bench_long_run(g: dict, dev: torch.device, dt: torch.dtype, rows: list) -> None:
    h, d, t, n, L = g["h"], g["d"], g["t"], g["n"], g["trained"]
    gen = torch.Generator(device=dev).manual_seed(1)
    blocks = 10 * L // n
    for name, kw in _policies(g).items():
        pre = name != "sink_window/absolute"
        c = KVCache(1, batch=1, heads=h, head_dim=d, tokens_per_frame=t, max_block_frames=n, kv_dtype="int8",
                    keys_pre_rope=pre, device=dev, **kw)
        q, kb, vb = (torch.randn(1, n * t, h, d, device=dev, dtype=dt, generator=gen) for _ in range(3))
        start_bytes, max_vis, max_off, peaks = c.nbytes(), 0, 0, []
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(blocks):
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            blk = c.begin_block(n)
            keys = c.frame_positions().tolist() + list(blk.positions)
            max_off = max(max_off, max(blk.positions) - min(keys))
            lay = c.layer(0)
            kr = _rope(c.frame_positions(), t, d) if pre else None
            cache_attention(q, lay, extra_k=kb, extra_v=vb, k_rope=kr)
            c.write(0, blk, kb, vb)
            c.commit(blk)
            max_vis = max(max_vis, c.num_cached_frames)
            if dev.type == "cuda":
                peaks.append(torch.cuda.max_memory_allocated())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / blocks * 1e3
        tenth = max(1, blocks // 10)
        row = {"table": "long_run", "policy": name, "frames": c.frames_written, "trained_frames": L,
               "cache_bytes_start": start_bytes, "cache_bytes_end": c.nbytes(), "max_visible_frames": max_vis,
               "max_rope_offset": max_off, "offset_within_trained": max_off <= L - 1, "ms_per_block": ms,
               "peak_alloc_first_tenth": max(peaks[:tenth]) if peaks else None,
               "peak_alloc_last_tenth": max(peaks[-tenth:]) if peaks else None}
        rows.append(row)
        print(json.dumps(row), flush=True)


def _table(rows: list) -> str:
    out = ["| format | bytes/token | vs bf16 | rel err gauss | rel err outlier | ms torch | ms triton |",
           "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["table"] == "formats"):
        tri = "—" if r["ms_triton"] is None else f"{r['ms_triton']:.3f}"
        out.append(f"| {r['format']} | {r['bytes_per_token']:.0f} | {r['vs_bf16']:.3f} | "
                   f"{100 * r['rel_err_gauss']:.2f} % | {100 * r['rel_err_outlier']:.2f} % | "
                   f"{r['ms_torch']:.3f} | {tri} |")
    out += ["", "| policy | frames (trained) | cache bytes start = end | max visible | max RoPE offset | "
                "ms/block | peak alloc first/last tenth |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["table"] == "long_run"):
        peak = ("—" if r["peak_alloc_first_tenth"] is None
                else f"{r['peak_alloc_first_tenth']} / {r['peak_alloc_last_tenth']}")
        out.append(f"| {r['policy']} | {r['frames']} ({r['trained_frames']}) | {r['cache_bytes_start']} = "
                   f"{r['cache_bytes_end']} | {r['max_visible_frames']} | {r['max_rope_offset']} | "
                   f"{r['ms_per_block']:.2f} | {peak} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU in seconds)")
    ap.add_argument("--json", help="write rows and metadata here")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda" and not args.smoke:
        sys.exit("kv_cache benchmark: Wan shapes need a CUDA device; use --smoke on CPU")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = _geometry(args.smoke)
    rows: list = []
    bench_formats(g, dev, dt, rows)
    bench_long_run(g, dev, dt, rows)
    print(_table(rows))
    meta = {"date": date.today().isoformat(), "device": torch.cuda.get_device_name() if dev.type == "cuda" else
            platform.processor() or "cpu", "torch": torch.__version__, "python": platform.python_version(),
            "command": " ".join(["python", *sys.argv]), "geometry": g, "compute_dtype": str(dt)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
