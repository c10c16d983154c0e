"""Benchmark: streaming (causal, block-by-block, KV-cached) generation vs the bidirectional few-step sampler (GPU).

Default: the T2V-1.3B config with random weights in bf16 (speed does not depend on the weights), 480p
(latent 60x104 = 1560 tokens per frame), blocks of 3 latent frames (c3-3), 4 denoising steps per block
plus one cache-refresh pass (5 forwards of 4680 query tokens per block), trained length 21 latent frames
(81 px frames); a rolling cache of 3 sink + 15 window frames (each block attends to at most 21 frames),
stored in bf16 / int8 / fp8; lengths 1x, 4x and 10x the trained length (7, 28, 70 blocks).

What is timed (CUDA-synchronized wall clock per block):
* ``dit``: the DiT of a block (its denoising steps + the cache-writing re-run); text encoding excluded
  (the prompt's cross-attention k/v are computed once before the timer starts);
* ``+vae``: plus the streaming VAE decode of the block (Wan2.1 VAE, causal feature cache, random bf16 weights),
  as a live viewer needs it. mp4 encoding is excluded.
Metrics: time to first block (block 0 ready; DiT only and DiT + VAE), steady frames/s (pixel frames of
blocks 1.. over their time: 1 + 4(n - 1) px frames for the first block of n latents, 4n afterwards), peak
allocated memory over the whole run (weights included) and the KV-cache bytes.
The bidirectional rows run the same network over the whole video at once, 4 steps (RF: ``x0 = x − t·v``,
re-noise), then decode it with the VAE: there the first frame is available only when everything is done.
Its attention is quadratic in the length, so by default it runs at 1x and 4x only (``--bidir-factors``).

    python benchmarks/streaming.py                       # full table (several minutes on one H100)
    python benchmarks/streaming.py --quick               # 1x and 4x, bf16 + int8, bidirectional 1x only
    python benchmarks/streaming.py --steps 2 --kv-dtypes bfloat16 --factors 1        # the 2-step goal
    python benchmarks/streaming.py --steps 1 --frames-per-block 1 --factors 1    # frame-wise latency
    [--no-vae] [--layers N (smoke test)] [--refresh last_step] [--json streaming.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from datetime import date

import torch

from rcm_kernels.blockmask import BlockLayout
from rcm_nets.wan import WanDiT, WanVAE
from rcm_nets.wan.causal import make_kv_cache
from rcm_nets.wan.vae import StreamingDecoder
from rcm_pipelines.streaming import DEFAULT_STREAM_TIMES, stream_generate, wan_timestep

DEVICE = "cuda"
_TIMES = {1: DEFAULT_STREAM_TIMES[:1], 2: (DEFAULT_STREAM_TIMES[0], 5 / 6), 3: DEFAULT_STREAM_TIMES[:3],
          4: DEFAULT_STREAM_TIMES}


def build_net(name: str, layers: int | None) -> WanDiT:
    """Random bf16 weights on the GPU (meta build, materialize, Wan init, non-zero head)."""
    overrides = {} if layers is None else {"num_layers": layers}
    with torch.device("meta"):
        net = WanDiT.from_config(name, dtype=torch.bfloat16, **overrides)
    net.to_empty(device=DEVICE)
    net.init_weights(generator=torch.Generator(device=DEVICE).manual_seed(0))
    with torch.no_grad():
        net.head.head.weight.normal_(std=net.config.dim**-0.5)
    return net.eval().requires_grad_(False)


def build_vae() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE().to(device=DEVICE, dtype=torch.bfloat16).eval().requires_grad_(False)


def px_frames(latent_frames: int, first: bool) -> int:
    return 1 + 4 * (latent_frames - 1) if first else 4 * latent_frames


def stream_run(net, vae, prompt, args, layout: BlockLayout, latent_frames: int, kv_dtype: str) -> dict:
    """One streaming generation; per-block DiT and decode times, peak memory."""
    cfg = net.config
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    sink = layout.first
    window = args.trained_frames - sink - layout.frames_per_block
    cache = make_kv_cache(net, batch=1, height=args.height, width=args.width, layout=layout, window_frames=window,
                          sink_frames=sink, kv_dtype=kv_dtype, device=DEVICE)
    decoder = StreamingDecoder(vae) if vae is not None else None
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    dit, dec, frames = [], [], []
    for blk in stream_generate(net, prompt, cache, num_frames=latent_frames, layout=layout,
                               latent_shape=(1, cfg.out_dim, args.height, args.width), generator=gen,
                               times=_TIMES[args.steps], refresh=args.refresh):
        dit.append(blk.seconds)
        tic = time.perf_counter()
        if decoder is not None:
            decoder(blk.x0.to(torch.bfloat16))
            torch.cuda.synchronize()
        dec.append(time.perf_counter() - tic)
        frames.append(px_frames(blk.x0.shape[2], blk.index == 0))
        del blk
    tot = [a + b for a, b in zip(dit, dec)]
    rest = sum(frames[1:])
    return dict(mode="stream", kv_dtype=kv_dtype, latent_frames=latent_frames, px_frames=sum(frames),
                blocks=len(dit), ttfb_dit_s=dit[0], ttfb_s=tot[0],
                steady_fps_dit=rest / sum(dit[1:]) if len(dit) > 1 else math.nan,
                steady_fps=rest / sum(tot[1:]) if len(tot) > 1 else math.nan,
                overall_fps=sum(frames) / sum(tot), mean_block_dit_s=sum(dit) / len(dit),
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, cache_gib=cache.nbytes() / 2**30)


def bidirectional_run(net, vae, ctx, args, latent_frames: int) -> dict:
    """The 4-step rCM-style sampler over the whole video at once (same steps as a block), then a VAE decode."""
    cfg = net.config
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (1, cfg.out_dim, latent_frames, args.height, args.width)
    times = _TIMES[args.steps]
    tic = time.perf_counter()
    with torch.no_grad():
        x = times[0] * torch.randn(shape, device=DEVICE, generator=gen)
        for k, tk in enumerate(times):
            v = net(x, wan_timestep(tk, 1, DEVICE), ctx).float()
            x0 = x - tk * v
            if k + 1 < len(times):
                x = (1 - times[k + 1]) * x0 + times[k + 1] * torch.randn(shape, device=DEVICE, generator=gen)
        torch.cuda.synchronize()
        t_dit = time.perf_counter() - tic
        if vae is not None:
            vae.decode(x0.to(torch.bfloat16))
        torch.cuda.synchronize()
    total = time.perf_counter() - tic
    n = px_frames(latent_frames, True)
    return dict(mode="bidirectional", kv_dtype="-", latent_frames=latent_frames, px_frames=n, blocks=1,
                ttfb_dit_s=t_dit, ttfb_s=total, steady_fps_dit=n / t_dit, steady_fps=n / total, overall_fps=n / total,
                mean_block_dit_s=t_dit, peak_gib=torch.cuda.max_memory_allocated() / 2**30, cache_gib=0.0)


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows: list[dict], vae: bool) -> None:
    hdr = (f"{'mode':<14}{'kv':<6}{'lat':>5}{'px':>6}{'TTFB dit s':>11}{'TTFB s':>9}{'fps dit':>9}"
           f"{'fps' + ('+vae' if vae else ''):>9}{'overall':>9}{'peak GiB':>10}{'cache GiB':>10}")
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<14}{r['kv_dtype']:<6}{r['latent_frames']:>5}  {r['error']}")
            continue
        print(f"{r['mode']:<14}{r['kv_dtype']:<6}{r['latent_frames']:>5}{r['px_frames']:>6}"
              f"{_fmt(r['ttfb_dit_s'], '.3f'):>11}{_fmt(r['ttfb_s'], '.3f'):>9}{_fmt(r['steady_fps_dit'], '.2f'):>9}"
              f"{_fmt(r['steady_fps'], '.2f'):>9}{_fmt(r['overall_fps'], '.2f'):>9}{r['peak_gib']:>10.2f}"
              f"{r['cache_gib']:>10.3f}")


def _guard(fn, mode: str, kv: str, frames: int) -> dict:
    try:
        return fn()
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return dict(mode=mode, kv_dtype=kv, latent_frames=frames, error="OOM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="t2v-1.3B")
    ap.add_argument("--layers", type=int, default=None, help="override num_layers (quick smoke test)")
    ap.add_argument("--height", type=int, default=60, help="latent height (480 px / 8)")
    ap.add_argument("--width", type=int, default=104, help="latent width (832 px / 8)")
    ap.add_argument("--frames-per-block", type=int, default=3)
    ap.add_argument("--first-block-frames", type=int, default=None)
    ap.add_argument("--steps", type=int, default=4, choices=sorted(_TIMES))
    ap.add_argument("--refresh", choices=["clean", "last_step"], default="clean",
                    help="clean: extra t=0 pass per block writes the cache; last_step: the last step writes")
    ap.add_argument("--trained-frames", type=int, default=21, help="trained length in latent frames")
    ap.add_argument("--factors", type=float, nargs="+", default=[1, 4, 10], help="lengths x trained length")
    ap.add_argument("--kv-dtypes", nargs="+", default=["bfloat16", "int8", "fp8"])
    ap.add_argument("--bidir-factors", type=float, nargs="*", default=[1, 4],
                    help="lengths for the bidirectional sampler (quadratic attention: 10x takes very long)")
    ap.add_argument("--no-vae", action="store_true", help="DiT only (no VAE decode)")
    ap.add_argument("--quick", action="store_true", help="factors 1 4, kv bf16 int8, bidirectional 1x only")
    ap.add_argument("--json", default="streaming.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("streaming.py needs a CUDA device")
    if args.quick:
        args.factors, args.kv_dtypes, args.bidir_factors = [1, 4], ["bfloat16", "int8"], [1]
    layout = BlockLayout(args.frames_per_block, args.first_block_frames)
    if args.trained_frames - layout.first - layout.frames_per_block < layout.frames_per_block:
        raise SystemExit("--trained-frames leaves no room for a window of one block after the sink and the block")

    def length(f: float) -> int:  # latent frames: whole blocks, at least f x trained
        return layout.block_start(layout.num_blocks(math.ceil(f * args.trained_frames)))

    net = build_net(args.config, args.layers)
    vae = None if args.no_vae else build_vae()
    cfg = net.config
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=DEVICE, dtype=torch.bfloat16, generator=g)
    prompt = net.encode_prompt(ctx)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    print(f"WanDiT {args.config} bf16 ({cfg.num_layers} layers), latent {args.height}x{args.width} "
          f"({args.height * args.width // 4} tokens/frame), blocks {layout}, {args.steps} steps + "
          f"{'refresh pass' if args.refresh == 'clean' else 'no refresh pass'}, {torch.cuda.get_device_name()}; "
          f"timed: DiT per block{'' if args.no_vae else ' + streaming VAE decode'}")
    rows = []
    for kv in args.kv_dtypes:
        stream_run(net, vae, prompt, args, layout, layout.block_start(2), kv)  # warm-up: kernels, allocator
        for f in args.factors:
            n = length(f)
            rows.append(_guard(lambda n=n, kv=kv: stream_run(net, vae, prompt, args, layout, n, kv), "stream", kv, n))
            rows[-1]["factor"] = f
            print_table(rows[-1:], vae is not None)
    if args.bidir_factors:
        bidirectional_run(net, vae, ctx, args, layout.block_start(1))  # warm-up
    for f in args.bidir_factors:
        n = length(f)
        rows.append(_guard(lambda n=n: bidirectional_run(net, vae, ctx, args, n), "bidirectional", "-", n))
        rows[-1]["factor"] = f
        print_table(rows[-1:], vae is not None)
    print()
    print_table(rows, vae is not None)
    meta = dict(date=str(date.today()), device=torch.cuda.get_device_name(), torch=torch.__version__,
                python=platform.python_version(), config=args.config, num_layers=cfg.num_layers,
                latent_hw=[args.height, args.width], layout=[layout.first, layout.frames_per_block],
                steps=args.steps, times=list(_TIMES[args.steps]), refresh=args.refresh,
                trained_frames=args.trained_frames, sink_frames=layout.first,
                window_frames=args.trained_frames - layout.first - layout.frames_per_block,
                vae_decode=vae is not None, weights_and_prompt_gib=weights_gib,
                timed=("per block: DiT (denoising steps + cache refresh)" + ("" if args.no_vae else
                       " + streaming VAE decode") + "; text encoding and mp4 writing excluded"))
    with open(args.json, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
