"""Benchmark: where the time of one generated video goes, stage by stage, for every sampler of the project.

Samplers (``--samplers``, ``kind:steps``): ``rcm:N`` the distilled bidirectional student (N consistency steps,
one DiT forward each, no CFG); ``euler:N`` / ``unipc:N`` the bidirectional teacher with CFG (two DiT forwards
per step); ``causal:N`` the causal streaming student (blocks of ``--frames-per-block`` latent frames, N
denoising steps per block + one cache-refresh pass, KV cache of the whole video).

What each figure is (one video, batch 1; wall clock; on CUDA ``torch.cuda.synchronize`` at the start and end
of every figure, so a figure holds exactly the GPU work queued inside it; weights are resident: loading is
never timed; mp4 encoding is never timed):

* ``text_encoder``: tokenize (padded to the DiT's text_len) + umT5 forward of the prompt, plus the negative
  prompt for CFG samplers (one batch of 2); the embedding stays on the device.
* ``dit_step[k]`` (bidirectional): step k of the sampler, from the end of step k-1 (k = 0: from the start of
  the sampler call, after the initial noise draw): the DiT forward(s)
  (rcm: 1, CFG: 2 sequential calls, cond then uncond), the CFG combination and the solver update, and for rcm
  the fresh noise of the next step (CPU generator draw + host-to-device copy).
* ``dit_step[k]`` (causal): the ``forward_block`` call of denoising step k, averaged over the blocks (the
  solver arithmetic and noise draws between calls are in ``dit_total`` only); ``cache_refresh``: the
  cache-writing re-run of a block at ``context_noise``, averaged over the blocks.
* ``dit_total``: noise draw + every step (+ refresh passes): the whole sampler call.
* ``vae_decode``: Wan VAE decode of the whole latent video to pixels in [-1, 1] (frame-chunked causal decode).
* ``end_to_end``: prompt string to decoded pixels on the device, i.e. the interval enclosing the three stages
  above (it includes the per-step synchronizations the step figures need: one host round trip per step).

Every figure is the median over ``--iters`` runs after ``--warmup`` runs; ``peak GiB`` is the CUDA allocator's
peak over the timed runs of a sampler, resident weights (DiT, VAE, umT5) included. GPU mode builds the named DiT config,
the released-size VAE and umT5-xxl with random weights (speed does not depend on the values) and a small
sentencepiece tokenizer trained on the fly (prompts are padded to text_len either way). ``--tiny`` runs the
tiny test configurations on the CPU (a smoke test of the harness; its numbers say nothing about GPUs).

    python benchmarks/generation.py                            # 1.3B, 480p, 81 frames, bf16 (one GPU)
    python benchmarks/generation.py --samplers rcm:1,rcm:4,unipc:50,causal:4 --iters 3 --json generation.json
    python benchmarks/generation.py --tiny                     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from torch import nn

from rcm_kernels.blockmask import BlockLayout  # noqa: E402
from rcm_nets.wan import Tokenizer, UMT5Encoder, WanDiT, WanVAE  # noqa: E402
from rcm_nets.wan.causal import make_kv_cache  # noqa: E402
from rcm_pipelines.generation import latent_shape, rcm_generate, teacher_generate, velocity_fn  # noqa: E402
from rcm_pipelines.streaming import DEFAULT_STREAM_TIMES, stream_generate  # noqa: E402
from rcm_pipelines.testing import TINY_T5, TINY_VAE, train_tiny_tokenizer  # noqa: E402

PROMPT = "A cat walks on the grass, realistic style."
NEGATIVE = "static, blurred details, worst quality, low quality"
WHAT = {
    "text_encoder": "tokenize + umT5 forward of the prompt (+ negative prompt for CFG, batch of 2), weights resident",
    "dit_step": "bidirectional: one sampler step (DiT forward(s) + CFG + update + rcm re-noise draw); causal: one "
                "forward_block call of that step, mean over blocks",
    "cache_refresh": "causal: the cache-writing re-run of one block, mean over blocks",
    "dit_total": "the whole sampler call: initial noise + all steps (+ refresh passes)",
    "vae_decode": "Wan VAE decode of the whole latent video to pixels (no mp4 encoding)",
    "end_to_end": "prompt string -> decoded pixels on the device (the three stages in one interval; loading and "
                  "mp4 encoding excluded)",
}


# ------------------------------------------------------------------------------------------ components
def _random_init(module: nn.Module, generator: torch.Generator) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02, generator=generator)
    return module


def build(args) -> dict:
    """Random-weight DiT, VAE, umT5 (+ tokenizer) on ``args.device``: tiny configs, or the released sizes."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    tok_dir = train_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="rcm_bench_tok_")))
    with torch.device("meta"):
        net = WanDiT.from_config(args.config, dtype=dtype)
        t5 = UMT5Encoder(**({**TINY_T5, "vocab": 320} if args.tiny else {})).to(dtype)  # cast on meta: free
        vae = WanVAE(**(TINY_VAE if args.tiny else {})).to(getattr(torch, args.vae_dtype))
    net.to_empty(device=device)
    net.init_weights(generator=g)
    nn.init.normal_(net.head.head.weight, std=0.02, generator=g)  # a zero head would make every output 0
    t5 = _random_init(t5.to_empty(device=device), g)
    vae = _random_init(vae.to_empty(device=device), g)
    tok = Tokenizer(tok_dir, max_length=net.config.text_len)
    return {"net": net.eval(), "t5": t5.eval(), "vae": vae.eval(), "tok": tok, "device": device, "dtype": dtype}


# ------------------------------------------------------------------------------------------ timing
class _Clock:
    """Synchronized wall clock: ``now()`` waits for the device first."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def _encode(c: dict, texts: list[str]) -> torch.Tensor:
    ids, mask = c["tok"](texts)
    return c["t5"](ids.to(c["device"]), mask.to(c["device"])).to(c["dtype"])


def _bidirectional(c: dict, kind: str, steps: int, shape, ctx, unc, clock: _Clock) -> tuple[torch.Tensor, dict]:
    marks: list[float] = []
    g = torch.Generator().manual_seed(0)
    t0 = clock.now()
    noise = torch.randn((1, *shape), generator=g).to(c["device"])
    vel = velocity_fn(c["net"])
    t1 = clock.now()
    cb: Callable[[dict], None] = lambda _: marks.append(clock.now())  # noqa: E731
    if kind == "rcm":
        x0 = rcm_generate(vel, noise, ctx, generator=g, num_steps=steps, input_dtype=c["dtype"], callback=cb)
    else:
        x0 = teacher_generate(vel, noise, ctx, unc, sampler=kind, num_steps=steps, input_dtype=c["dtype"],
                              callback=cb)
    edges = [t1, *marks]
    return x0, {"dit_step": [b - a for a, b in zip(edges, edges[1:])], "dit_total": marks[-1] - t0}


def _causal(c: dict, steps: int, shape, ctx, clock: _Clock, fpb: int) -> tuple[torch.Tensor, dict]:
    net, (ch, t, h, w) = c["net"], shape
    layout = BlockLayout(fpb)
    if not layout.covers_exactly(t):
        raise SystemExit(f"{t} latent frames are not whole blocks of {fpb}: change --frames or --frames-per-block")
    times = {1: DEFAULT_STREAM_TIMES[:1], 2: (DEFAULT_STREAM_TIMES[0], 5 / 6)}.get(steps, DEFAULT_STREAM_TIMES[:steps])
    if len(times) != steps:
        raise SystemExit(f"causal supports 1-{len(DEFAULT_STREAM_TIMES)} steps, got {steps}")
    cache = make_kv_cache(net, batch=1, height=h, width=w, layout=layout, window_frames=t, rolling=False,
                          kv_dtype="float32" if c["dtype"] == torch.float32 else "bfloat16", device=c["device"])
    calls: list[tuple[bool, float]] = []
    inner = net.forward_block

    def timed(*a, **kw):  # times each network call of the streaming sampler
        t0 = clock.now()
        out = inner(*a, **kw)
        calls.append((kw.get("write", False), clock.now() - t0))
        return out

    net.forward_block = timed
    try:
        t0 = clock.now()
        blocks = stream_generate(net, net.encode_prompt(ctx), cache, num_frames=t, layout=layout,
                                 latent_shape=(1, ch, h, w), generator=torch.Generator().manual_seed(0), times=times)
        x0 = torch.cat([b.x0 for b in blocks], dim=2)
        total = clock.now() - t0
    finally:
        del net.forward_block
    n_blocks = layout.num_blocks(t)
    denoise = [s for write, s in calls if not write]
    per_step = [statistics.fmean(denoise[k::steps]) for k in range(steps)]
    refresh = statistics.fmean(s for write, s in calls if write)
    assert len(denoise) == steps * n_blocks, (len(denoise), steps, n_blocks)
    return x0, {"dit_step": per_step, "cache_refresh": refresh, "dit_total": total, "blocks": n_blocks}


@torch.no_grad()
def run_once(c: dict, kind: str, steps: int, args) -> dict:
    """One timed generation; returns ``{figure: seconds}`` (``dit_step`` a list)."""
    clock = _Clock(c["device"])
    shape = latent_shape(args.frames, args.width, args.height, channels=c["net"].config.out_dim)
    cfg = kind in ("euler", "unipc")
    start = clock.now()
    emb = _encode(c, [PROMPT, NEGATIVE] if cfg else [PROMPT])
    t_text = clock.now() - start
    ctx, unc = emb[:1], (emb[1:] if cfg else None)
    if kind == "causal":
        x0, fig = _causal(c, steps, shape, ctx, clock, args.frames_per_block)
    else:
        x0, fig = _bidirectional(c, kind, steps, shape, ctx, unc, clock)
    t0 = clock.now()
    p = next(c["vae"].parameters())
    video = c["vae"].decode(x0.to(device=p.device, dtype=p.dtype))
    end = clock.now()
    assert video.shape[2] == args.frames, (tuple(video.shape), args.frames)
    return {"text_encoder": t_text, **fig, "vae_decode": end - t0, "end_to_end": end - start}


def _median(runs: list[dict]) -> dict:
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, list):
            out[key] = [statistics.median(r[key][i] for r in runs) for i in range(len(value))]
        elif isinstance(value, float):
            out[key] = statistics.median(r[key] for r in runs)
        else:
            out[key] = value
    return out


def benchmark(args) -> dict:
    """Every sampler of ``args.samplers``: median figures, peak memory, and what each figure includes."""
    c = build(args)
    rows = []
    for spec in args.samplers.split(","):
        kind, _, steps = spec.partition(":")
        if kind not in ("rcm", "euler", "unipc", "causal") or not steps.isdigit():
            raise SystemExit(f"--samplers: {spec!r} is not kind:steps with kind in rcm, euler, unipc, causal")
        for _ in range(args.warmup):
            run_once(c, kind, int(steps), args)
        if c["device"].type == "cuda":
            torch.cuda.reset_peak_memory_stats(c["device"])
        runs = [run_once(c, kind, int(steps), args) for _ in range(args.iters)]
        peak = torch.cuda.max_memory_allocated(c["device"]) / 2**30 if c["device"].type == "cuda" else None
        rows.append({"sampler": spec, **_median(runs), "peak_gib": peak})
    env = {"date": str(date.today()), "device": torch.cuda.get_device_name(c["device"]) if c["device"].type == "cuda"
           else platform.processor() or "cpu", "torch": torch.__version__, "python": platform.python_version()}
    setup = {k: getattr(args, k) for k in ("config", "dtype", "vae_dtype", "width", "height", "frames",
                                          "frames_per_block", "iters", "warmup", "tiny")}
    return {"env": env, "setup": setup, "what": WHAT, "rows": rows}


def format_rows(result: dict) -> str:
    head = f"{'sampler':<11} {'text enc':>9} {'DiT step (median)':>18} {'DiT total':>10} {'VAE dec':>9} " \
           f"{'end to end':>11} {'peak GiB':>9}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"{r['sampler']:<11} {r['text_encoder']:9.3f} {statistics.median(r['dit_step']):18.4f} "
                     f"{r['dit_total']:10.3f} {r['vae_decode']:9.3f} {r['end_to_end']:11.3f} {peak:>9}")
    for r in result["rows"]:
        steps = ", ".join(f"{x:.4f}" for x in r["dit_step"])
        refresh = f" + refresh {r['cache_refresh']:.4f} per block, {r['blocks']} blocks" if "cache_refresh" in r else ""
        lines.append(f"  {r['sampler']}: DiT steps [{steps}] s{refresh}")
    lines.append("what each figure includes (seconds, median of the timed runs):")
    lines += [f"  {k}: {v}" for k, v in result["what"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke test of the harness)")
    p.add_argument("--config", default=None, help="WanDiT config (default t2v-1.3B; tiny with --tiny)")
    p.add_argument("--samplers", default="rcm:1,rcm:4,unipc:50,causal:4")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="pixel frames, 1 + 4k (default 81; --tiny 9)")
    p.add_argument("--frames-per-block", type=int, default=None, help="causal (default 3; --tiny 1)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="DiT and umT5 dtype")
    p.add_argument("--vae-dtype", default="float32", choices=["bfloat16", "float32"])
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {"config": "tiny" if tiny else "t2v-1.3B", "width": 32 if tiny else 832, "height": 32 if tiny else 480,
                "frames": 9 if tiny else 81, "frames_per_block": 1 if tiny else 3,
                "dtype": "float32" if tiny else "bfloat16", "device": "cpu" if tiny else "cuda"}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if tiny and args.samplers == p.get_default("samplers"):
        args.samplers = "rcm:1,rcm:4,euler:4,causal:4"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny (CPU smoke test) or on a GPU machine")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = benchmark(args)
    print(format_rows(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
