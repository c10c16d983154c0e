"""A streaming session: the causal DiT (+ VAE) loaded once, videos generated block by block, decoded as they
come (overlapped with the next block's DiT on CUDA) and written to mp4 progressively (docs/causal.md).

    session = StreamSession(spec, dit=dit_spec, vae=vae_spec, device=device, dtype=torch.bfloat16)
    for blk in session.frames(context, size=(832, 480), num_frames=161, seeds=[0, 1], negative=neg):
        ...  # blk.frames [B, 3, f, H, W] on the CPU, in order
    rows = session.write(["a.mp4", "b.mp4"], context, size=..., num_frames=..., seeds=[0, 1])

The VAE decode takes ``rcm_nets.wan.vae_fast.VAEDecodeOptions`` (``decode=``; default: the reference decode).
Loading goes through :mod:`rcm_pipelines.components` (``load_dit`` / ``load_vae``); a DiT path of ``random``
builds random weights instead (smoke tests, benchmarks). Pixel-space DiTs (``out_dim`` 3, the tiny test
models) need no VAE: their output is the video.

Decode overlap (``spec.overlap_decode``): the generator runs without host syncs (per-block CUDA events time
the DiT); when block n is finished on the main stream, a side stream waits for it (an event), decodes it and
copies the frames to pinned host memory, recording a done event. Block n >= 1 is handed out only after the
DiT work of block n + 1 has been queued, so the side stream's decode of n runs while the DiT denoises n + 1;
the consumer then waits for n's done event only (block 0 is handed out at once: the time to the first block
is not traded for throughput). On the CPU the same code path runs sequentially.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rcm_nets.wan import WanDiT
from rcm_nets.wan.causal import make_kv_cache
from rcm_nets.wan.configs import WanConfig
from rcm_nets.wan.vae import StreamingDecoder
from rcm_nets.wan.vae_fast import VAEDecodeOptions

from .components import DiTSpec, VAESpec, dit_config, load_dit, load_vae
from .pipeline import causal_first_block
from .stream_spec import StreamSpec, latent_frames_for
from .streaming import StepGraphs, StreamBlock, stream_generate
from .video import VideoWriter

__all__ = ["RANDOM_WEIGHTS", "DecodedBlock", "StreamSession", "decode_blocks", "load_stream_dit", "profiled",
           "stream_dit_config"]

RANDOM_WEIGHTS = "random"
"""``dit.path`` value that builds seeded random weights instead of loading a file."""


def stream_dit_config(spec: DiTSpec) -> WanConfig:
    """The DiT's config, checked to be a T2V network (streaming gives an I2V image as the first block)."""
    cfg = dit_config(spec)
    if cfg.model_type != "t2v" or cfg.in_dim != cfg.out_dim:
        raise ValueError(f"streaming runs a T2V causal DiT (I2V gives the image as the first block); "
                         f"dit.config={spec.config!r} is an I2V network")
    return cfg


def load_stream_dit(spec: DiTSpec, device: torch.device, dtype: torch.dtype, *, init_seed: int = 0) -> WanDiT:
    """The DiT of ``spec`` through ``components.load_dit``; ``spec.path == "random"``: Wan's init seeded with
    ``init_seed`` and the zero head perturbed, so random weights draw something."""
    if spec.path != RANDOM_WEIGHTS:
        return load_dit(spec, device, dtype)
    torch.manual_seed(init_seed)
    net = WanDiT(dit_config(spec), device=device, dtype=dtype)
    net.init_weights()
    with torch.no_grad():
        net.head.head.weight.normal_(std=0.02)
    return net.eval().requires_grad_(False)


@dataclass
class DecodedBlock:
    """One block as pixels: ``frames [B, 3, f, H, W]`` float32 in [-1, 1] on the CPU; ``dit_s`` / ``decode_s``
    the DiT and decode times of the block (CUDA events when overlapped); ``block`` the latent block."""

    block: StreamBlock
    frames: Tensor
    dit_s: float
    decode_s: float

    @property
    def index(self) -> int:
        return self.block.index


class _Decoding:
    """A block whose decode is queued (CUDA side stream) or done (CPU); ``result()`` waits for it."""

    def __init__(self, blk: StreamBlock, decoder: StreamingDecoder, side: torch.cuda.Stream | None):
        self.blk, self.side = blk, side
        if side is None:
            tic = time.perf_counter()
            self.frames = decoder(blk.x0).cpu()
            self.seconds = time.perf_counter() - tic
            return
        ready = torch.cuda.Event()
        ready.record()  # the DiT of this block, on the current stream
        side.wait_event(ready)
        with torch.cuda.stream(side):
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
            out = decoder(blk.x0)
            self.frames = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            self.frames.copy_(out, non_blocking=True)
            self.end.record()
        blk.x0.record_stream(side)  # x0 was made on the main stream: keep its memory until the side used it

    def result(self) -> DecodedBlock:
        if self.side is None:
            return DecodedBlock(self.blk, self.frames, self.blk.dit_seconds(), self.seconds)
        self.end.synchronize()
        return DecodedBlock(self.blk, self.frames, self.blk.dit_seconds(), self.start.elapsed_time(self.end) / 1e3)


def decode_blocks(blocks: Iterable[StreamBlock], decoder: StreamingDecoder, *, overlap: bool) -> Iterator[DecodedBlock]:
    """Decode each block in order. ``overlap``: block n >= 1 is decoded (on a CUDA side stream) while the next
    block is generated and handed out after that block's work is queued; block 0 is handed out at once (the
    time to the first block is the latency that matters). On the CPU the same path runs sequentially (same
    frames, same order of hand-out)."""
    side, pending = None, None
    for blk in blocks:
        if overlap and blk.x0.is_cuda and side is None:
            side = torch.cuda.Stream(blk.x0.device)
        item = _Decoding(blk, decoder, side if overlap else None)
        if pending is not None:
            yield pending.result()
            pending = None
        if overlap and blk.index > 0:
            pending = item
        else:
            yield item.result()
    if pending is not None:
        yield pending.result()


@contextlib.contextmanager
def profiled(path: str | Path | None, device: torch.device):
    """Run the body under the torch profiler and write a Chrome trace (JSON) to ``path`` (``None``: no-op)."""
    if path is None:
        yield None
        return
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=False) as prof:
        yield prof
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


class StreamSession:
    """The loaded causal DiT and VAE; streams videos of a batch of prompts (see the module docstring)."""

    def __init__(self, spec: StreamSpec, *, dit: DiTSpec, vae: VAESpec, device: torch.device,
                 dtype: torch.dtype, init_seed: int = 0, decode: VAEDecodeOptions | None = None):
        self.spec, self.device, self.dtype = spec, device, dtype
        self.decode_options = None if decode == VAEDecodeOptions() else decode  # defaults = the reference decode
        cfg = stream_dit_config(dit)
        self.pixel_space = cfg.out_dim == 3
        self.net = load_stream_dit(dit, device, dtype, init_seed=init_seed)
        self.vae = None if self.pixel_space else load_vae(vae, device, dtype)
        # spec.cuda_graph: graphs kept across videos; they bind to the caches, reused while the geometry holds
        self.graphs = StepGraphs(self.net) if spec.cuda_graph else None
        self._cache_key: tuple | None = None

    def cache_bytes(self) -> int:
        """Bytes of the KV cache(s) of the last video (two with CFG)."""
        return sum(c.nbytes() for c in getattr(self, "caches", []))

    @property
    def scale(self) -> int:
        """Pixels per latent pixel (8 with the VAE, 1 in pixel space)."""
        return 1 if self.vae is None else self.vae.spatial_factor

    def first_block(self, image_chw: Tensor, size: tuple[int, int]) -> Tensor:
        """Causal I2V: the image resized to ``size`` (width, height) as the first block ``[1, C, 1, h, w]``
        (its VAE latent, or the pixels themselves for a pixel-space DiT): `pipeline.causal_first_block`."""
        return causal_first_block(image_chw, size, self.vae, self.device)

    def plan(self, num_frames: int, i2v: bool = False) -> tuple:
        """``(layout, latent frames)`` of a video of at least ``num_frames`` pixel frames."""
        layout = self.spec.layout(i2v)
        return layout, latent_frames_for(num_frames, layout, vae=self.vae is not None)

    def blocks(self, context: Tensor, *, size: tuple[int, int], num_frames: int, seeds: Sequence[int],
               negative: Tensor | None = None, image: Tensor | None = None, record: bool = False,
               synchronize: bool | None = None) -> Iterator[StreamBlock]:
        """Latent blocks of the batch ``context [B, L, D]`` (one prompt per row), ``seeds[b]`` drawing sample b's
        noise (a CPU generator: the same on every device); ``negative [L, D]`` for CFG (guidance > 1);
        ``image [3, H, W]`` in [-1, 1]: causal I2V, the same first frame for every prompt. ``synchronize``:
        time blocks with device syncs (default: unless the decode overlaps on CUDA; then CUDA events)."""
        s, net, b = self.spec, self.net, context.shape[0]
        if len(seeds) != b:
            raise ValueError(f"{b} prompts but {len(seeds)} seeds")
        w, h = size
        if w % (2 * self.scale) or h % (2 * self.scale):
            raise ValueError(f"video size {w}x{h} must be a multiple of {2 * self.scale} (VAE factor x patch)")
        lh, lw = h // self.scale, w // self.scale
        layout, frames = self.plan(num_frames, image is not None)
        sink, window = s.cache_frames(layout)

        def cache():
            return make_kv_cache(net, batch=b, height=lh, width=lw, layout=layout, window_frames=window,
                                 sink_frames=sink, rolling=True, device=self.device, **s.cache_options())

        ctx = context.to(device=self.device, dtype=self.dtype)
        cfg = s.uses_cfg()
        if cfg and negative is None:
            raise ValueError(f"stream.guidance={s.guidance} needs the negative prompt's embedding")
        neg = net.encode_prompt(negative.to(device=self.device, dtype=self.dtype)[None].expand(b, -1, -1)) \
            if cfg else None
        first = None if image is None else self.first_block(image, size).expand(b, -1, -1, -1, -1)
        key = (b, lh, lw, layout, sink, window, cfg)
        if self.graphs is None or key != self._cache_key:
            self.caches = [cache() for _ in range(1 + cfg)]
            self._cache_key = key
        return stream_generate(net, net.encode_prompt(ctx), self.caches[0], num_frames=frames, layout=layout,
                               latent_shape=(b, net.config.out_dim, lh, lw),
                               generator=[torch.Generator().manual_seed(int(x)) for x in seeds],
                               times=s.block_times(), context_noise=s.context_noise, refresh=s.refresh,
                               clean_refresh_blocks=s.clean_refresh_blocks, solver=s.solver, negative=neg,
                               uncond_cache=self.caches[1] if cfg else None, guidance=s.guidance, initial_latent=first,
                               timestep_dtype=torch.bfloat16 if s.timestep_bf16 else None, record=record,
                               synchronize=not s.overlap_decode if synchronize is None else synchronize,
                               cuda_graph=self.graphs or False)

    def frames(self, context: Tensor, *, overlap: bool | None = None, **kw) -> Iterator[DecodedBlock]:
        """:meth:`blocks` decoded block by block (``overlap`` defaults to ``spec.overlap_decode`` on CUDA; on the
        CPU there is nothing to overlap, so the default there is off: hand-out right after each block)."""
        if overlap is None:
            overlap = self.spec.overlap_decode and self.device.type == "cuda"
        decoder = StreamingDecoder(self.vae, self.decode_options if self.vae is not None else None)
        blocks = (self._decoder_input(blk) for blk in self.blocks(context, synchronize=not overlap, **kw))
        return decode_blocks(blocks, decoder, overlap=overlap)

    def _decoder_input(self, blk: StreamBlock) -> StreamBlock:
        if self.vae is not None:
            blk.x0 = blk.x0.to(next(self.vae.parameters()).dtype)
        return blk

    def write(self, paths: Sequence[str | Path], context: Tensor, *, fps: int = 16, log=print, **kw) -> list[dict]:
        """Stream ``context [B, L, D]`` into one mp4 per prompt (``paths[b]``), appending each block as it is
        decoded; returns one timing row per block (DiT, decode, elapsed; the mp4 encoding is excluded)."""
        if len(paths) != context.shape[0]:
            raise ValueError(f"{context.shape[0]} prompts but {len(paths)} output paths")
        writers = [VideoWriter(p, fps=fps) for p in paths]
        rows, t0 = [], time.perf_counter()
        try:
            for d in self.frames(context, **kw):
                done = time.perf_counter() - t0
                for wr, video in zip(writers, d.frames):
                    wr.append(video)  # [3, f, H, W] in [-1, 1]
                rows.append(dict(block=d.index, latent_frames=d.block.x0.shape[2], frames=d.frames.shape[2],
                                 dit_s=d.dit_s, decode_s=d.decode_s, latency_s=d.dit_s + d.decode_s, elapsed_s=done))
                log(f"  block {d.index:4d}  frames {writers[0].frames:6d}  DiT {d.dit_s * 1e3:8.1f} ms  decode "
                    f"{d.decode_s * 1e3:7.1f} ms  elapsed {done:8.2f} s" + ("  (given)" if d.block.prefill else ""))
        finally:
            for wr in writers:
                wr.close()
        return rows
