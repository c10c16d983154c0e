"""Streaming T2V / causal I2V generation with a causal WanDiT, block by block, written to mp4 as it is made.

    uv run recipes/stream.py                                    # tiny pixel-space model, CPU, random weights
    uv run recipes/stream.py --model.name=t2v-1.3B --model.checkpoint=student.safetensors \
        --vae_checkpoint=Wan2.1_VAE.pth --text_encoder=umt5 --t5_checkpoint=... --tokenizer=... \
        --height=480 --width=832 --max_frames=1000 --kv_dtype=int8

Each block of ``frames_per_block`` latent frames is denoised in ``len(steps)`` steps attending to a rolling
KV cache (``sink_frames`` + the most recent ``window_frames``, constant memory for any ``--max_frames``),
re-run at ``context_noise`` to write its k/v, decoded with the Wan VAE's causal feature cache (or taken as
pixels for a pixel-space model) and appended to the open mp4 writer. Per-block latency, time to first block
and frames/s are printed and written to ``timings.json`` next to the video and the resolved config.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from rcm_kernels.blockmask import BlockLayout
from rcm_kernels.devices import parse_dtype, resolve_device
from rcm_nets.checkpoint import load_checkpoint
from rcm_nets.wan import WanDiT
from rcm_nets.wan.causal import make_kv_cache
from rcm_nets.wan.vae import StreamingDecoder
from rcm_pipelines.streaming import DEFAULT_STREAM_TIMES, stream_generate
from rcm_pipelines.video import VideoWriter, load_image
from rcm_recipes.config import RecipeConfig, parse_config, run_main, write_config


class ModelConfig(RecipeConfig):
    """The causal DiT."""

    name: str = "tiny-pixel"
    """Named WanDiT config (rcm_nets.wan.configs): tiny-pixel generates RGB directly (no VAE)."""
    checkpoint: str | None = None
    """DiT weights (.pth / .safetensors / DCP dir); None = random init (smoke tests, benchmarks)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype."""
    init_seed: int = 0
    """Seed of the random init when no checkpoint is given."""


class StreamConfig(RecipeConfig):
    """Streaming causal video generation: block by block, N steps per block, rolling KV cache, live mp4."""

    model: ModelConfig = ModelConfig()
    vae_checkpoint: str | None = None
    """Wan2.1_VAE.pth: decode each block with the causal feature cache; None = the model works in pixels."""
    vae_dim: int = 96
    """Base width of the VAE (96 = the released Wan2.1 VAE; smaller only for tests)."""
    text_encoder: Literal["tiny", "umt5", "file"] = "tiny"
    """'tiny' (the CPU demo's word-vector encoder), 'umt5' (t5_checkpoint + tokenizer) or 'file'."""
    t5_checkpoint: str | None = None
    """umT5-xxl encoder weights (text_encoder=umt5)."""
    tokenizer: str | None = None
    """Local umT5 tokenizer directory or spiece .model file (text_encoder=umt5)."""
    context_file: str | None = None
    """Precomputed text embeddings [1, L, text_dim] (.pt or .safetensors key 'context'; text_encoder=file)."""
    prompt: str = "a red square moving right"
    """Text prompt."""
    image: str | None = None
    """Causal I2V: image file of the first frame (resized to height x width); needs first_block_frames=1."""
    height: int = 32
    """Output height in pixels (latent height = height / 8 with a VAE)."""
    width: int = 32
    """Output width in pixels."""
    frames_per_block: int = 3
    """Latent frames per block."""
    first_block_frames: int | None = None
    """Latent frames of the first block (default frames_per_block; 1 for c1-N layouts and I2V)."""
    steps: list[float] = Field(default_factory=lambda: list(DEFAULT_STREAM_TIMES))
    """RF times of the denoising steps of every block (strictly decreasing in (0, 1])."""
    context_noise: float = 0.0
    """RF time of the cache-writing re-run of each denoised block (0 = clean context)."""
    max_frames: int = 48
    """Output frames to generate (rounded up to whole blocks); may be far beyond trained_frames."""
    trained_frames: int = 21
    """Latent frames the model was trained on (sets the default attention window)."""
    sink_frames: int | None = None
    """Latent frames kept forever at the start of the cache (default: the first block)."""
    window_frames: int | None = None
    """Most recent latent frames kept in the cache (default: trained_frames - sink - one block)."""
    kv_dtype: Literal["bfloat16", "float16", "float32", "int8", "fp8"] = "bfloat16"
    """KV cache storage (int8/fp8: quantized on write, read tile by tile)."""
    position_policy: Literal["absolute", "reindexed"] = "absolute"
    """RoPE positions of cached frames after eviction (docs/kv_cache.md)."""
    timestep_bf16: bool = False
    """Round the network time 1000 t through bf16 as rcm does."""
    fps: int = 16
    """Frame rate written to the mp4."""
    seed: int = 0
    """Noise seed."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    out_dir: str = "outputs/stream"
    """Directory of video.mp4, config.yaml and timings.json."""

    @model_validator(mode="after")
    def _check(self) -> StreamConfig:
        if self.image is not None and (self.first_block_frames or self.frames_per_block) != 1:
            raise ValueError("--image (causal I2V) needs --first_block_frames=1: the image is the first block")
        if self.text_encoder == "umt5" and (self.t5_checkpoint is None or self.tokenizer is None):
            raise ValueError("--text_encoder=umt5 needs --t5_checkpoint and --tokenizer")
        if self.text_encoder == "file" and self.context_file is None:
            raise ValueError("--text_encoder=file needs --context_file")
        if self.max_frames < 1 or self.height < 1 or self.width < 1:
            raise ValueError("--max_frames, --height and --width must be >= 1")
        return self


# ------------------------------------------------------------------------------------------------- setup
def _load_net(cfg: ModelConfig, device: torch.device) -> WanDiT:
    dtype = parse_dtype(cfg.dtype)
    if cfg.checkpoint is None:
        torch.manual_seed(cfg.init_seed)
        net = WanDiT.from_config(cfg.name, device=device, dtype=dtype)
        net.init_weights()
        with torch.no_grad():  # the official init zeroes the head: perturb it so random weights draw something
            net.head.head.weight.normal_(std=0.02)
    else:
        with torch.device("meta"):
            net = WanDiT.from_config(cfg.name, dtype=dtype)
        load_checkpoint(net, cfg.checkpoint, device=device, dtype=dtype)
    return net.eval().requires_grad_(False)


def _text_context(cfg: StreamConfig, net: WanDiT, device: torch.device) -> torch.Tensor:
    """``[1, L, text_dim]`` embeddings of the prompt."""
    text_dim, text_len = net.config.text_dim, net.config.text_len
    if cfg.text_encoder == "tiny":
        from rcm_recipes.shapes import TinyTextEncoder

        ctx = TinyTextEncoder(text_dim, length=min(8, text_len))([cfg.prompt])
    elif cfg.text_encoder == "file":
        path = Path(cfg.context_file)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ctx = load_file(path)["context"]
        else:
            ctx = torch.load(path, map_location="cpu", weights_only=True)
        ctx = ctx if ctx.dim() == 3 else ctx[None]
    else:
        from rcm_nets.wan import Tokenizer, UMT5Encoder

        tok = Tokenizer(cfg.tokenizer, max_length=text_len)
        with torch.device("meta"):
            t5 = UMT5Encoder()
        load_checkpoint(t5, cfg.t5_checkpoint, device=device, dtype=torch.bfloat16)
        ids, mask = tok(cfg.prompt)
        with torch.no_grad():
            ctx = t5.eval()(ids.to(device), mask.to(device))
        del t5
    if ctx.shape[-1] != text_dim:
        raise ValueError(f"text embeddings have width {ctx.shape[-1]}, the model expects text_dim={text_dim}")
    return ctx.to(device)


def _load_vae(path: str | None, dim: int, device: torch.device):
    if path is None:
        return None
    from rcm_nets.wan import WanVAE

    vae = WanVAE(dim=dim)
    load_checkpoint(vae, path, device=device)
    return vae.to(device).eval().requires_grad_(False)


def _first_frame(cfg: StreamConfig, vae, device: torch.device) -> torch.Tensor | None:
    """Causal I2V: the image as the first latent block ``[1, C, 1, h, w]``."""
    if cfg.image is None:
        return None
    img = torch.nn.functional.interpolate(load_image(cfg.image)[None], size=(cfg.height, cfg.width),
                                          mode="bicubic", align_corners=False).clamp(-1, 1)
    if vae is None:
        return img[:, :, None].to(device)
    with torch.no_grad():
        return vae.encode(img[:, :, None].to(device)).float()


# -------------------------------------------------------------------------------------------------- main
def run(cfg: StreamConfig) -> dict:
    """Generate, write ``video.mp4`` progressively; returns the timing summary (also in timings.json)."""
    device = resolve_device(cfg.device)
    out = Path(cfg.out_dir)
    write_config(cfg, out / "config.yaml")
    net = _load_net(cfg.model, device)
    vae = _load_vae(cfg.vae_checkpoint, cfg.vae_dim, device)
    if vae is None and net.config.out_dim != 3:
        raise ValueError(f"model {cfg.model.name} makes {net.config.out_dim}-channel latents: give --vae_checkpoint "
                         "(or use a pixel-space model such as tiny-pixel)")
    scale = vae.spatial_factor if vae is not None else 1
    if cfg.height % (scale * 2) or cfg.width % (scale * 2):
        raise ValueError(f"--height/--width must be multiples of {scale * 2} (VAE factor x patch)")
    h, w = cfg.height // scale, cfg.width // scale
    layout = BlockLayout(cfg.frames_per_block, cfg.first_block_frames)
    lat_needed = 1 + math.ceil((cfg.max_frames - 1) / 4) if vae is not None else cfg.max_frames
    num_frames = layout.block_start(layout.num_blocks(lat_needed))
    sink = layout.first if cfg.sink_frames is None else cfg.sink_frames
    window = cfg.window_frames or max(cfg.trained_frames - sink - cfg.frames_per_block, layout.frames_per_block)
    cache = make_kv_cache(net, batch=1, height=h, width=w, layout=layout, window_frames=window, sink_frames=sink,
                          rolling=True, kv_dtype=cfg.kv_dtype, position_policy=cfg.position_policy, device=device)
    prompt = net.encode_prompt(_text_context(cfg, net, device))
    first = _first_frame(cfg, vae, device)
    decoder = StreamingDecoder(vae)
    writer = VideoWriter(out / "video.mp4", fps=cfg.fps)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    c = net.config.out_dim
    print(f"stream: {num_frames} latent frames in {layout.num_blocks(num_frames)} blocks of {layout}, "
          f"{len(cfg.steps)} steps, cache sink {sink} + window {window} frames ({cfg.kv_dtype}, "
          f"{cache.nbytes() / 2**20:.1f} MiB), device {device}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows, t_start = [], time.perf_counter()
    blocks = stream_generate(net, prompt, cache, num_frames=num_frames, layout=layout, latent_shape=(1, c, h, w),
                             generator=gen, times=cfg.steps, context_noise=cfg.context_noise, initial_latent=first,
                             timestep_dtype=torch.bfloat16 if cfg.timestep_bf16 else None)
    try:
        for blk in blocks:
            tic = time.perf_counter()
            video = decoder(blk.x0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_dec = time.perf_counter() - tic
            writer.append(video[0])  # [3, T, H, W] in [-1, 1]
            done = time.perf_counter() - t_start
            rows.append(dict(block=blk.index, latent_frames=blk.x0.shape[2], frames=video.shape[2], dit_s=blk.seconds,
                             decode_s=t_dec, latency_s=blk.seconds + t_dec, elapsed_s=done))
            print(f"  block {blk.index:4d}  frames {writer.frames:6d}  DiT {blk.seconds * 1e3:8.1f} ms  "
                  f"decode {t_dec * 1e3:7.1f} ms  elapsed {done:8.2f} s" + ("  (given)" if blk.prefill else ""))
    finally:
        writer.close()
    summary = _summary(rows, cfg, cache, device)
    (out / "timings.json").write_text(json.dumps({"summary": summary, "blocks": rows}, indent=2) + "\n")
    print(f"wrote {out / 'video.mp4'} ({writer.frames} frames): time to first block "
          f"{summary['time_to_first_block_s']:.3f} s, steady {summary['steady_fps']:.2f} frames/s, "
          f"overall {summary['overall_fps']:.2f} frames/s, cache {summary['cache_mib']:.1f} MiB"
          + (f", peak {summary['peak_mib']:.0f} MiB" if summary["peak_mib"] is not None else ""))
    return summary


def _summary(rows: list[dict], cfg: StreamConfig, cache, device: torch.device) -> dict:
    total = rows[-1]["elapsed_s"]
    frames = sum(r["frames"] for r in rows)
    rest = rows[1:]
    steady_t = sum(r["latency_s"] for r in rest)
    return dict(frames=frames, blocks=len(rows), time_to_first_block_s=rows[0]["elapsed_s"],
                steady_fps=(sum(r["frames"] for r in rest) / steady_t) if rest and steady_t > 0 else float("nan"),
                overall_fps=frames / total, mean_block_latency_s=sum(r["latency_s"] for r in rows) / len(rows),
                cache_mib=cache.nbytes() / 2**20, kv_dtype=cfg.kv_dtype,
                peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                timed="DiT (incl. cache refresh) + VAE decode per block; mp4 encoding excluded from latency")


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(StreamConfig, argv, prog="stream.py"))


if __name__ == "__main__":
    run_main(main)
