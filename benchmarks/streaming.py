"""Benchmark: streaming (causal, block-by-block, KV-cached) generation vs the bidirectional few-step sampler (GPU).

Default: the T2V-1.3B config with random weights in bf16 (speed does not depend on the weights), 480p
(latent 60x104 = 1560 tokens per frame), blocks of 3 latent frames (c3-3), 4 denoising steps per block
plus one cache-refresh pass (5 forwards of 4680 query tokens per block), trained length 21 latent frames
(81 px frames); a rolling cache of 3 sink + 15 window frames (each block attends to at most 21 frames),
stored in bf16 / int8 / fp8; lengths 1x, 4x and 10x the trained length (7, 28, 70 blocks).

What is timed:
* ``dit``: the DiT of a block (its denoising steps + the cache-writing re-run; CUDA events); text encoding
  excluded (the prompt's cross-attention k/v are computed once before the timer starts);
* ``+vae``: wall clock until the block's frames are on the host: the streaming VAE decode (Wan2.1 VAE, causal
  feature cache, random bf16 weights) and the copy to the host, as a live viewer needs it. mp4 encoding is
  excluded.
Metrics: time to first block (block 0 ready; DiT only, and frames on the host), steady frames/s (pixel frames
of blocks 1.. over their time: 1 + 4(n - 1) px frames for the first block of n latents, 4n afterwards; ``fps
dit`` over the blocks' DiT times, ``fps`` over the wall clock between the first and the last block delivered),
peak allocated memory over the whole run (weights included) and the KV-cache bytes.
Decode overlap (``rcm_pipelines.stream_session.decode_blocks``): each streaming run is made twice in the same
process, decode after each block (``stream``) and decode of block n on a side CUDA stream while the DiT makes
block n + 1 (``stream+ovl``); the overlap row carries ``ovl x`` = its overall frames/s over the sequential
one's (``--overlap off|on|both``).
The bidirectional rows run the same network over the whole video at once, 4 steps (RF: ``x0 = x − t·v``,
re-noise), then decode it with the VAE: there the first frame is available only when everything is done.
Its attention is quadratic in the length, so by default it runs at 1x and 4x only (``--bidir-factors``).
CUDA graphs (``--cuda_graph``): every streaming row gets a twin in the same process with ``stream_generate(cuda_graph=StepGraphs)`` (``+graph`` in the mode), its ``graph x`` = fps dit
over the eager row's. The graphs are captured in two warm-up videos of the trained length (first video:
eager warm-up of each cache length; second: capture) on a cache that all graph rows of a storage type share,
so the timed rows replay only.
``--profile trace.json``: the torch profiler over one steady block (window full, the last block of a 1x
video; eager, and with ``--cuda_graph`` also replayed to ``trace.graph.json``), a Chrome trace and the
top-15 CUDA kernels by total time (CPU: the top-15 operators by self time).

    python benchmarks/streaming.py                       # full table (several minutes on one H100)
    python benchmarks/streaming.py --quick               # 1x and 4x, bf16 + int8, bidirectional 1x only
    python benchmarks/streaming.py --steps 2 --kv-dtypes bfloat16 --factors 1        # the 2-step goal
    python benchmarks/streaming.py --steps 1 --frames-per-block 1 --factors 1    # frame-wise latency
    python benchmarks/streaming.py --smoke               # tiny sizes, CPU if there is no GPU (does it run?)
    python benchmarks/streaming.py --steps 2 --kv-dtypes bfloat16 --factors 1 --cuda_graph --profile t.json
    [--vae-fast (the fast streaming VAE decode)] [--no-vae] [--layers N (smoke test)] [--refresh last_step] [--overlap both] [--json streaming.json]
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
from rcm_nets.wan.vae import StreamingDecoder, VAEDecodeOptions
from rcm_pipelines.stream_session import decode_blocks, profiled
from rcm_pipelines.streaming import DEFAULT_STREAM_TIMES, StepGraphs, stream_generate, wan_timestep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA = DEVICE == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32  # bf16 matmuls are slow on CPUs
_TIMES = {1: DEFAULT_STREAM_TIMES[:1], 2: (DEFAULT_STREAM_TIMES[0], 5 / 6), 3: DEFAULT_STREAM_TIMES[:3],
          4: DEFAULT_STREAM_TIMES}


def build_net(name: str, layers: int | None) -> WanDiT:
    """Random weights (bf16 on the GPU; meta build, materialize, Wan init, non-zero head)."""
    overrides = {} if layers is None else {"num_layers": layers}
    with torch.device("meta"):
        net = WanDiT.from_config(name, dtype=DTYPE, **overrides)
    net.to_empty(device=DEVICE)
    net.init_weights(generator=torch.Generator(device=DEVICE).manual_seed(0))
    with torch.no_grad():
        net.head.head.weight.normal_(std=net.config.dim**-0.5)
    return net.eval().requires_grad_(False)


def build_vae(dim: int = 96) -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(dim=dim).to(device=DEVICE, dtype=DTYPE).eval().requires_grad_(False)


def _reset() -> None:
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if CUDA else math.nan


def px_frames(latent_frames: int, first: bool) -> int:
    return 1 + 4 * (latent_frames - 1) if first else 4 * latent_frames


def vae_options(args) -> VAEDecodeOptions | None:
    """The streaming decoder's speed options: ``VAEDecodeOptions.fastest()`` with ``--vae-fast`` on CUDA, else the
    plain decode."""
    return VAEDecodeOptions.fastest() if args.vae_fast and CUDA else None


_GRAPH_CACHES: dict[str, object] = {}  # kv dtype -> the cache the graph rows share (graphs bind to its storage)


def _cache(net, args, layout: BlockLayout, kv_dtype: str, graphs: StepGraphs | None):
    sink = layout.first
    window = args.trained_frames - sink - layout.frames_per_block
    if graphs is not None and kv_dtype in _GRAPH_CACHES:
        return _GRAPH_CACHES[kv_dtype]
    cache = make_kv_cache(net, batch=1, height=args.height, width=args.width, layout=layout, window_frames=window,
                          sink_frames=sink, kv_dtype=kv_dtype, device=DEVICE)
    if graphs is not None:
        _GRAPH_CACHES[kv_dtype] = cache
    return cache


def _blocks(net, prompt, args, layout: BlockLayout, latent_frames: int, cache, graphs: StepGraphs | None,
            synchronize: bool):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    return stream_generate(net, prompt, cache, num_frames=latent_frames, layout=layout,
                           latent_shape=(1, net.config.out_dim, args.height, args.width), generator=gen,
                           times=_TIMES[args.steps], refresh=args.refresh, synchronize=synchronize,
                           cuda_graph=graphs or False)


def stream_run(net, vae, prompt, args, layout: BlockLayout, latent_frames: int, kv_dtype: str,
               overlap: bool = False, graphs: StepGraphs | None = None) -> dict:
    """One streaming generation, frames delivered to the host block by block; per-block DiT times (CUDA
    events), delivery times, peak memory. ``overlap``: decode on a side stream while the next block runs;
    ``graphs``: replay the DiT calls' CUDA graphs (on the cache the graph rows of ``kv_dtype`` share)."""
    _reset()
    cache = _cache(net, args, layout, kv_dtype, graphs)
    decoder = StreamingDecoder(vae, options=vae_options(args))
    blocks = _blocks(net, prompt, args, layout, latent_frames, cache, graphs, synchronize=not CUDA)

    def to_vae(blocks):
        for blk in blocks:
            blk.x0 = blk.x0.to(DTYPE)
            yield blk

    dit, done, frames = [], [], []
    tic = time.perf_counter()
    for d in decode_blocks(to_vae(blocks), decoder, overlap=overlap):
        done.append(time.perf_counter() - tic)
        dit.append(d.dit_s)
        frames.append(px_frames(d.block.x0.shape[2], d.index == 0))
        del d
    rest = sum(frames[1:])
    mode = ("stream+ovl" if overlap else "stream") + ("+graph" if graphs is not None else "")
    return dict(mode=mode, kv_dtype=kv_dtype, latent_frames=latent_frames,
                px_frames=sum(frames), blocks=len(dit), ttfb_dit_s=dit[0], ttfb_s=done[0],
                steady_fps_dit=rest / sum(dit[1:]) if len(dit) > 1 else math.nan,
                steady_fps=rest / (done[-1] - done[0]) if len(done) > 1 else math.nan,
                overall_fps=sum(frames) / done[-1], mean_block_dit_s=sum(dit) / len(dit),
                peak_gib=_peak_gib(), cache_gib=cache.nbytes() / 2**30)


def top_kernels(prof, k: int = 15) -> list[dict]:
    """The ``k`` CUDA kernels with the largest total time in a profile (CPU run: the operators by self time)."""
    from torch.autograd import DeviceType

    totals: dict[str, list] = {}
    if CUDA:
        for e in prof.events():
            if e.device_type == DeviceType.CUDA:
                t = totals.setdefault(e.name, [0.0, 0])
                t[0] += e.time_range.elapsed_us()
                t[1] += 1
    else:
        for e in prof.key_averages():
            totals[e.key] = [e.self_cpu_time_total, e.count]
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:k]
    whole = sum(t for t, _ in totals.values()) or 1.0
    return [dict(name=n, total_ms=t / 1e3, calls=c, share=t / whole) for n, (t, c) in rows]


def profile_block(net, prompt, args, layout: BlockLayout, kv_dtype: str, path: str,
                  graphs: StepGraphs | None) -> list[dict]:
    """Profile the last block of a 1x video (window full): Chrome trace at ``path``, top-15 kernels printed."""
    n = layout.block_start(layout.num_blocks(args.trained_frames))
    cache = _cache(net, args, layout, kv_dtype, graphs)
    it = _blocks(net, prompt, args, layout, n, cache, graphs, synchronize=True)
    for _ in range(layout.num_blocks(n) - 1):
        next(it)
    with profiled(path, torch.device(DEVICE)) as prof:
        blk = next(it)
        _sync()
    it.close()
    top = top_kernels(prof)
    what = "CUDA kernels" if CUDA else "operators (self CPU time)"
    print(f"\nprofile of block {blk.index} ({'graph replay' if graphs is not None else 'eager'}, kv {kv_dtype}): "
          f"top-{len(top)} {what}; trace {path}")
    print(f"{'ms':>9}{'share':>7}{'calls':>7}  name")
    for r in top:
        print(f"{r['total_ms']:>9.3f}{r['share']:>7.1%}{r['calls']:>7}  {r['name'][:110]}")
    return top


def bidirectional_run(net, vae, ctx, args, latent_frames: int) -> dict:
    """The 4-step rCM-style sampler over the whole video at once (same steps as a block), then a VAE decode."""
    cfg = net.config
    _reset()
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
        _sync()
        t_dit = time.perf_counter() - tic
        if vae is not None:
            vae.decode(x0.to(DTYPE)).cpu()
        _sync()
    total = time.perf_counter() - tic
    n = px_frames(latent_frames, True)
    return dict(mode="bidirectional", kv_dtype="-", latent_frames=latent_frames, px_frames=n, blocks=1,
                ttfb_dit_s=t_dit, ttfb_s=total, steady_fps_dit=n / t_dit, steady_fps=n / total, overall_fps=n / total,
                mean_block_dit_s=t_dit, peak_gib=_peak_gib(), cache_gib=0.0)


def _fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows: list[dict], vae: bool) -> None:
    hdr = (f"{'mode':<18}{'kv':<9}{'lat':>5}{'px':>6}{'TTFB dit s':>11}{'TTFB s':>9}{'fps dit':>9}"
           f"{'fps' + ('+vae' if vae else ''):>9}{'overall':>9}{'ovl x':>7}{'graph x':>8}{'peak GiB':>10}"
           f"{'cache GiB':>10}")
    print(hdr)
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<18}{r['kv_dtype']:<9}{r['latent_frames']:>5}  {r['error']}")
            continue
        print(f"{r['mode']:<18}{r['kv_dtype']:<9}{r['latent_frames']:>5}{r['px_frames']:>6}"
              f"{_fmt(r['ttfb_dit_s'], '.3f'):>11}{_fmt(r['ttfb_s'], '.3f'):>9}{_fmt(r['steady_fps_dit'], '.2f'):>9}"
              f"{_fmt(r['steady_fps'], '.2f'):>9}{_fmt(r['overall_fps'], '.2f'):>9}{_fmt(r.get('overlap_x'), '.2f'):>7}"
              f"{_fmt(r.get('graph_x'), '.2f'):>8}"
              f"{_fmt(r['peak_gib'], '.2f'):>10}"
              f"{r['cache_gib']:>10.3f}")


def _guard(fn, mode: str, kv: str, frames: int) -> dict:
    try:
        return fn()
    except torch.OutOfMemoryError:
        if CUDA:
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
    ap.add_argument("--vae-fast", action="store_true",
                    help="decode with VAEDecodeOptions.fastest() (bf16, channels-last, fused norm, block step)")
    ap.add_argument("--quick", action="store_true", help="factors 1 4, kv bf16 int8, bidirectional 1x only")
    ap.add_argument("--overlap", choices=["off", "on", "both"], default="both",
                    help="decode overlap rows: sequential only, overlapped only, or both (same process, ratio)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes (does it run? CPU when there is no GPU): 1-layer tiny DiT, 4x4 latents, "
                         "dim-4 VAE, blocks of 2, trained 6 frames, 1x and 2x")
    ap.add_argument("--cuda-graph", "--cuda_graph", dest="cuda_graph", action="store_true",
                    help="also replay CUDA graphs of the DiT calls: +graph rows, graph x = fps dit ratio")
    ap.add_argument("--profile", default=None, metavar="TRACE.json",
                    help="profile one steady block: Chrome trace + top-15 CUDA kernels by total time")
    ap.add_argument("--json", default="streaming.json")
    args = ap.parse_args()
    if args.smoke:
        args.config, args.layers, args.height, args.width = "tiny", 1, 4, 4
        args.frames_per_block, args.trained_frames, args.factors, args.bidir_factors = 2, 6, [1, 2], [1]
        args.kv_dtypes = ["float32", "int8"]
    elif not CUDA:
        raise SystemExit("streaming.py needs a CUDA device (or --smoke for a CPU run at tiny sizes)")
    if args.quick:
        args.factors, args.kv_dtypes, args.bidir_factors = [1, 4], ["bfloat16", "int8"], [1]
    layout = BlockLayout(args.frames_per_block, args.first_block_frames)
    if args.trained_frames - layout.first - layout.frames_per_block < layout.frames_per_block:
        raise SystemExit("--trained-frames leaves no room for a window of one block after the sink and the block")

    def length(f: float) -> int:  # latent frames: whole blocks, at least f x trained
        return layout.block_start(layout.num_blocks(math.ceil(f * args.trained_frames)))

    net = build_net(args.config, args.layers)
    vae = None if args.no_vae else build_vae(4 if args.smoke else 96)
    cfg = net.config
    g = torch.Generator(device=DEVICE).manual_seed(1)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=DEVICE, dtype=DTYPE, generator=g)
    prompt = net.encode_prompt(ctx)
    weights_gib = torch.cuda.memory_allocated() / 2**30 if CUDA else math.nan
    device_name = torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor() or platform.machine()})"
    print(f"WanDiT {args.config} {str(DTYPE)[6:]} ({cfg.num_layers} layers), latent {args.height}x{args.width} "
          f"({args.height * args.width // 4} tokens/frame), blocks {layout}, {args.steps} steps + "
          f"{'refresh pass' if args.refresh == 'clean' else 'no refresh pass'}, {device_name}; "
          f"timed: DiT per block{'' if args.no_vae else ' + streaming VAE decode'}")
    rows = []
    overlaps = {"off": [False], "on": [True], "both": [False, True]}[args.overlap]
    graphs = StepGraphs(net) if args.cuda_graph else None
    profiles = {}
    for kv in args.kv_dtypes:
        use = [None] + ([graphs] if graphs is not None else [])
        for ov in overlaps:  # warm-up: kernels, allocator, side stream
            stream_run(net, vae, prompt, args, layout, layout.block_start(2), kv, ov)
        if len(use) == 2:  # graph warm-up: each cache length eager once, then captured
            for _ in range(2):
                stream_run(net, vae, prompt, args, layout, length(1), kv, False, graphs)
        for f in args.factors:
            n = length(f)
            for ov in overlaps:
                for gr in use:
                    mode = ("stream+ovl" if ov else "stream") + ("+graph" if gr is not None else "")
                    rows.append(_guard(lambda n=n, kv=kv, ov=ov, gr=gr: stream_run(net, vae, prompt, args, layout,
                                                                                  n, kv, ov, gr), mode, kv, n))
                    rows[-1]["factor"] = f
                    if gr is not None and "error" not in rows[-1] and "error" not in rows[-2]:
                        rows[-1]["graph_x"] = rows[-1]["steady_fps_dit"] / rows[-2]["steady_fps_dit"]
                    print_table(rows[-1:], vae is not None)
            if len(overlaps) == 2:  # the overlap ratio: same graph setting, overlap on over off
                tail = rows[-2 * len(use):]
                for a, b in zip(tail[:len(use)], tail[len(use):]):
                    if "error" not in a and "error" not in b:
                        b["overlap_x"] = b["overall_fps"] / a["overall_fps"]
        if args.profile and kv == args.kv_dtypes[0]:
            profiles["eager"] = profile_block(net, prompt, args, layout, kv, args.profile, None)
            if len(use) == 2:
                gpath = args.profile[:-5] + ".graph.json" if args.profile.endswith(".json") else args.profile + ".graph"
                profiles["graph"] = profile_block(net, prompt, args, layout, kv, gpath, graphs)
    if args.bidir_factors:
        bidirectional_run(net, vae, ctx, args, layout.block_start(1))  # warm-up
    for f in args.bidir_factors:
        n = length(f)
        rows.append(_guard(lambda n=n: bidirectional_run(net, vae, ctx, args, n), "bidirectional", "-", n))
        rows[-1]["factor"] = f
        print_table(rows[-1:], vae is not None)
    print()
    print_table(rows, vae is not None)
    meta = dict(date=str(date.today()), device=device_name, torch=torch.__version__,
                python=platform.python_version(), config=args.config, num_layers=cfg.num_layers,
                latent_hw=[args.height, args.width], layout=[layout.first, layout.frames_per_block],
                steps=args.steps, times=list(_TIMES[args.steps]), refresh=args.refresh, overlap=args.overlap,
                smoke=args.smoke, cuda_graph=args.cuda_graph, profile=args.profile,
                trained_frames=args.trained_frames, sink_frames=layout.first,
                window_frames=args.trained_frames - layout.first - layout.frames_per_block,
                vae_decode=vae is not None, weights_and_prompt_gib=weights_gib,
                vae_options=None if vae_options(args) is None else vae_options(args).model_dump(),
                timed=("per block: DiT (denoising steps + cache refresh, CUDA events) and wall clock until the frames "
                       "are on the host" + ("" if args.no_vae else " (streaming VAE decode, overlapped with the next "
                       "block's DiT in stream+ovl rows)") + "; text encoding and mp4 writing excluded"))
    with open(args.json, "w") as fh:
        json.dump(dict(meta=meta, rows=rows, profiles=profiles), fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
