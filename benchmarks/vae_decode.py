"""Benchmark: streaming Wan2.1 VAE decode per block, for each fast-path option (``rcm_nets.wan.vae_fast``).

What the streaming pipeline does after each generated block (benchmarks/streaming.py): decode a latent block
``[1, 16, 3, 60, 104]`` (480x832, blocks of 3 latent frames) with the VAE's causal feature cache, giving 9 pixel
frames for the first block and 12 for every later one. Rows, cumulative except where named, all in this one
process on the same random full-size VAE (``WanVAE()``, default init, seed 0) and the same random latents:

* ``eager fp32``: the reference decode (``StreamingDecoder(vae)``, float32; cuDNN may use TF32, as by default);
* ``bf16``: compute dtype bfloat16 (a bf16 copy of the decoder);
* ``+channels_last``: ``channels_last_3d`` weights and activations;
* ``+conv padding``: rows / columns zero-padded inside each 3-D conv (no padded copy of the activation);
* ``+cudnn.benchmark``: cuDNN algorithm search, scoped to the decode;
* ``+fused norm``: RMS-norm + SiLU as one Triton kernel;
* ``+block step``: a block's latent frames in one decoder step instead of one step per frame;
* ``+compile``: ``torch.compile`` of the steady-state per-frame step (over ``+cudnn.benchmark``; the norm
  fused by inductor instead);
* ``+CUDA graph``: the steady-state per-frame step with its feature cache captured and replayed (over
  ``+fused norm``, no compile);
* ``+compile +CUDA graph``: both, per frame; ``+block step +CUDA graph``: the graph of a whole-block step.

Per row: ``setup_s`` (the warm-up stream: algorithm search, compilation, capture), ``first_s`` (block 0 of a
fresh stream: a new video, the feature cache empty; its steps run eagerly), ``block_s`` (median of the later
blocks, CUDA-synchronized wall clock), ``fps`` (12 frames / ``block_s``), ``speedup`` (eager fp32 ``block_s``
over the row's), ``max_err`` (max |frames − eager fp32 frames| over the timed stream, frames in [-1, 1]) and the
peak allocated memory. Latents are float32 inputs; the output is float32 [-1, 1].

    python benchmarks/vae_decode.py                        # H200 / H100: all rows, ~minutes (compile)
    python benchmarks/vae_decode.py --rows "eager fp32" bf16 "+CUDA graph"
    python benchmarks/vae_decode.py --smoke                # CPU, tiny VAE and latent: the script runs
    [--blocks 6] [--height 60 --width 104 --frames-per-block 3] [--json vae_decode.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

import torch

from rcm_nets.wan import WanVAE
from rcm_nets.wan.vae import StreamingDecoder, VAEDecodeOptions
from rcm_nets.wan.vae_fast import release_fast_decode

_BF16 = dict(dtype="bfloat16")
_CL = dict(_BF16, channels_last=True)
_PAD = dict(_CL, conv_padding=True)
_BENCH = dict(_PAD, cudnn_benchmark=True)
_FUSED = dict(_BENCH, fused_norm="triton")
ROWS: dict[str, dict | None] = {
    "eager fp32": None,
    "bf16": _BF16,
    "+channels_last": _CL,
    "+conv padding": _PAD,
    "+cudnn.benchmark": _BENCH,
    "+fused norm": _FUSED,
    "+block step": dict(_FUSED, block_step=True),
    "+compile": dict(_BENCH, fused_norm="torch", compile=True),
    "+CUDA graph": dict(_FUSED, cuda_graph=True),
    "+compile +CUDA graph": dict(_BENCH, fused_norm="torch", compile=True, cuda_graph=True),
    "+block step +CUDA graph": dict(_FUSED, block_step=True, cuda_graph=True),
}
_NEEDS_CUDA = ("compile", "cuda_graph")  # compile on CPU works but takes minutes; graphs need CUDA


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_row(vae: WanVAE, options: VAEDecodeOptions | None, latents: list[torch.Tensor], device: torch.device,
            ref: list[torch.Tensor] | None) -> tuple[dict, list[torch.Tensor]]:
    """Warm-up stream (setup), then a timed stream of every block; returns the row and the timed frames."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dec = StreamingDecoder(vae, options)
    _sync(device)
    tic = time.perf_counter()
    for z in latents[: min(3, len(latents))]:  # reaches the steady state (compile, capture, cuDNN search)
        dec(z)
    _sync(device)
    setup = time.perf_counter() - tic
    dec.reset()
    times, frames = [], []
    for z in latents:
        _sync(device)
        tic = time.perf_counter()
        frames.append(dec(z))
        _sync(device)
        times.append(time.perf_counter() - tic)
    del dec
    release_fast_decode(vae)  # free this row's decoder copy and graph pools before the next row
    err = max((a - b).abs().max().item() for a, b in zip(frames, ref)) if ref is not None else 0.0
    block = statistics.median(times[1:]) if len(times) > 1 else float("nan")
    row = dict(setup_s=setup, first_s=times[0], block_s=block, times_s=times, fps=frames[-1].shape[2] / block,
               max_err=err, first_frames=frames[0].shape[2], block_frames=frames[-1].shape[2],
               peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"))
    return row, frames


def print_table(rows: list[dict], base: float | None, header: bool = True) -> None:
    if header:
        print(f"{'option':<26}{'setup s':>9}{'first s':>9}{'block s':>9}{'fps':>8}{'speedup':>9}{'max err':>10}"
          f"{'peak GiB':>10}")
    for r in rows:
        if "skipped" in r or "error" in r:
            print(f"{r['name']:<26}  {r.get('skipped') or r['error']}")
            continue
        ratio = base / r["block_s"] if base else float("nan")
        print(f"{r['name']:<26}{r['setup_s']:>9.3f}{r['first_s']:>9.3f}{r['block_s']:>9.4f}{r['fps']:>8.1f}"
              f"{ratio:>9.2f}{r['max_err']:>10.2e}{r['peak_gib']:>10.2f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
    ap.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
    ap.add_argument("--frames-per-block", type=int, default=3, help="latent frames per block")
    ap.add_argument("--blocks", type=int, default=6, help="blocks per timed stream (block 0 = first block)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                    help=f"rows to run, of: {', '.join(ROWS)}")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny VAE (dim 8) and latent 2x3, 3 blocks")
    ap.add_argument("--json", default="vae_decode.json")
    args = ap.parse_args(argv)
    if args.smoke:
        device, dim, args.height, args.width, args.blocks = torch.device("cpu"), 8, 2, 3, 3
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton norm on CPU (read when the kernel is defined)
    elif torch.cuda.is_available():
        device, dim = torch.device("cuda"), 96
    else:
        raise SystemExit("vae_decode.py needs a CUDA device (or --smoke for the CPU smoke run)")
    if args.blocks < 2:
        raise SystemExit("--blocks must be >= 2 (block 0 is the first block; later blocks give block_s)")
    torch.manual_seed(0)
    vae = WanVAE(dim=dim).to(device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(1)
    latents = [torch.randn(1, 16, args.frames_per_block, args.height, args.width, device=device, generator=gen)
               for _ in range(args.blocks)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"Wan2.1 VAE (dim {dim}) streaming decode, latent block [1, 16, {args.frames_per_block}, {args.height}, "
          f"{args.width}], {args.blocks} blocks, {name}, torch {torch.__version__}, "
          f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}")
    names = ["eager fp32"] + [n for n in args.rows if n != "eager fp32"]  # the baseline always runs first
    rows, ref = [], None
    for n in names:
        kw = ROWS[n]
        if device.type != "cuda" and kw and any(kw.get(k) for k in _NEEDS_CUDA):
            rows.append(dict(name=n, options=kw, skipped="skipped (needs CUDA)"))
        else:
            try:
                row, frames = run_row(vae, None if kw is None else VAEDecodeOptions(**kw), latents, device, ref)
                rows.append(dict(name=n, options=kw, **row))
                if ref is None:
                    ref = frames
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(dict(name=n, options=kw, error="OOM"))
        print_table(rows[-1:], rows[0].get("block_s"), header=len(rows) == 1)
    base = rows[0].get("block_s")
    for r in rows:
        if "block_s" in r and base:
            r["speedup"] = base / r["block_s"]
    print()
    print_table(rows, base)
    meta = dict(date=str(date.today()), device=name, torch=torch.__version__, python=platform.python_version(),
                smoke=args.smoke, vae_dim=dim, latent_block=[1, 16, args.frames_per_block, args.height, args.width],
                blocks=args.blocks, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                timed="per block: StreamingDecoder call (latent block in, float32 frames out), CUDA-synchronized")
    with open(args.json, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
