"""Streaming T2V / causal I2V with a causal WanDiT, block by block, each prompt's mp4 written as it is made.

    uv run recipes/stream.py                                    # tiny pixel-space model, CPU, random weights
    uv run recipes/stream.py --dit.config=t2v-1.3B --dit.path=student.safetensors --dtype=bfloat16 \
        --vae.path=Wan2.1_VAE.pth --text_encoder=umt5 --umt5.path=T5.pth --umt5.tokenizer=DIR \
        --video.size='[832,480]' --video.num_frames=1000 --stream.kv_dtype=int8

The streaming settings (steps per block, refresh mode, context noise, CFG, cache) are `--stream.*`
(:class:`rcm_pipelines.stream_spec.StreamSpec`); loading, decoding (overlapped with the next block's DiT on
CUDA) and the progressive mp4s are :class:`rcm_pipelines.stream_session.StreamSession`. Several prompts
(``--prompts``, ``--prompt_file``) run as one batch, prompt i with seed ``seed + i``, one mp4 each. Per-block
latency, time to first block and frames/s are printed and written to ``timings.json`` next to the videos and
the resolved config; ``--profile`` also writes a torch profiler trace (``trace.json``, chrome format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator

from rcm_kernels.devices import resolve_device
from rcm_nets.wan.vae_fast import VAEDecodeOptions
from rcm_pipelines.components import (
    WAN_NEGATIVE_PROMPT,
    DiTSpec,
    DType,
    TextEncoder,
    TextEncoderSpec,
    VAESpec,
    dit_config,
    load_embedding,
    read_prompts,
    resolve_dtype,
)
from rcm_pipelines.pipeline import VideoSpec
from rcm_pipelines.stream_session import StreamSession, profiled, stream_dit_config
from rcm_pipelines.stream_spec import StreamSpec
from rcm_pipelines.video import load_image
from rcm_recipes.config import RecipeConfig, parse_config, run_main, write_config


class StreamConfig(RecipeConfig):
    """Streaming causal video generation: block by block, N steps per block, rolling KV cache, live mp4."""

    prompts: list[str] = ["a red square moving right"]
    """Text prompts, generated together as one batch (ignored when prompt_file is set)."""
    prompt_file: str | None = None
    """A text file with one prompt per non-empty line (one batch)."""
    image: str | None = None
    """Causal I2V: image file of the first frame for every prompt (resized); needs stream.first_block_frames=1."""
    text_encoder: Literal["tiny", "umt5", "file"] = "tiny"
    """'tiny' (the CPU demo's word-vector encoder), 'umt5' (the umt5 section) or 'file' (context_file)."""
    umt5: TextEncoderSpec = TextEncoderSpec()
    """umT5 encoder and tokenizer (text_encoder=umt5)."""
    context_file: str | None = None
    """text_encoder=file: one prompt's stored embedding [L, text_dim] (.pt)."""
    negative_file: str | None = None
    """text_encoder=file with CFG (stream.guidance > 1): the negative prompt's embedding [L, text_dim] (.pt)."""
    dit: DiTSpec = DiTSpec(config="tiny-pixel", path="random")
    """The causal DiT; path=random builds seeded random weights (smoke tests, benchmarks)."""
    vae: VAESpec = VAESpec()
    """The Wan VAE; loaded only for latent-space DiTs (pixel-space ones such as tiny-pixel output RGB)."""
    vae_decode: VAEDecodeOptions = VAEDecodeOptions()
    """Speed options of the streaming VAE decode (bf16, channels-last, CUDA graph, ...; default: reference)."""
    video: VideoSpec = VideoSpec(size=(32, 32), num_frames=48)
    """Size (required: video.size), frames to generate (rounded up to whole blocks; may be far beyond the
    trained length) and frame rate."""
    stream: StreamSpec = StreamSpec()
    """Streaming settings: step schedules, refresh, context noise, CFG, block layout, KV cache, decode overlap."""
    seed: int = 0
    """Noise seed of prompt 0 (prompt i: seed + i); also seeds random DiT weights."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: DType = "auto"
    """DiT dtype; auto: bf16 on CUDA, float32 on CPU."""
    out_dir: str = "outputs/stream"
    """Directory of the videos (video.mp4, or video_000.mp4, ... for several prompts), config.yaml, timings.json."""
    profile: bool = False
    """Write a torch profiler trace of the generation (trace.json, chrome format) next to the videos."""

    @model_validator(mode="after")
    def _check(self) -> StreamConfig:
        self.stream.layout(i2v=self.image is not None)  # I2V needs a first block of one frame
        if self.text_encoder == "file" and self.context_file is None:
            raise ValueError("--text_encoder=file needs --context_file")
        if self.text_encoder == "file" and self.stream.uses_cfg() and self.negative_file is None:
            raise ValueError("--text_encoder=file with --stream.guidance > 1 needs --negative_file")
        if self.text_encoder == "tiny" and self.stream.uses_cfg() and self.stream.negative_prompt == WAN_NEGATIVE_PROMPT:
            raise ValueError("--text_encoder=tiny knows only the demo grammar: set --stream.negative_prompt='' "
                             "(all-zero embedding) or a grammar sentence for CFG")
        if self.video.size is None:
            raise ValueError("--video.size=[W,H] is required (streaming has no resolution preset)")
        if not self.prompts and self.prompt_file is None:
            raise ValueError("--prompts is empty")
        stream_dit_config(self.dit)  # an unknown or I2V architecture fails here, before anything loads
        return self


# ------------------------------------------------------------------------------------------------- setup
def prompt_list(cfg: StreamConfig) -> list[str]:
    return read_prompts(cfg.prompt_file, "prompt_file") if cfg.prompt_file else list(cfg.prompts)


def encode(cfg: StreamConfig, texts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[N, L, text_dim]`` embeddings of the prompts and the negative prompt's ``[L, text_dim]`` (CFG only)."""
    net_cfg, neg_text = dit_config(cfg.dit), cfg.stream.negative_prompt
    cfg_on = cfg.stream.uses_cfg()
    if cfg.text_encoder == "file":
        if len(texts) != 1:
            raise ValueError("--text_encoder=file holds one prompt's embedding: give one prompt")
        ctx = load_embedding(cfg.context_file, "context_file", text_len=net_cfg.text_len)[None]
        neg = load_embedding(cfg.negative_file, "negative_file", text_len=net_cfg.text_len) if cfg_on else None
    else:
        if cfg.text_encoder == "tiny":
            from rcm_recipes.shapes import TinyTextEncoder

            encoder = TinyTextEncoder(net_cfg.text_dim, length=min(8, net_cfg.text_len))
        else:
            encoder = TextEncoder(cfg.umt5, text_len=net_cfg.text_len, device=device, field="umt5")
        emb = encoder(texts + ([neg_text] if cfg_on else []))
        ctx, neg = emb[: len(texts)], (emb[len(texts)] if cfg_on else None)
        if cfg.text_encoder == "umt5":
            encoder.free()
    if ctx.shape[-1] != net_cfg.text_dim:
        raise ValueError(f"text embeddings have width {ctx.shape[-1]}, the DiT expects text_dim={net_cfg.text_dim}")
    return ctx, neg


def summary(rows: list[dict], cfg: StreamConfig, session: StreamSession, device: torch.device) -> dict:
    frames, rest = sum(r["frames"] for r in rows), rows[1:]
    span = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]  # wall clock from block 0 delivered to the last
    return dict(frames=frames, blocks=len(rows), prompts=len(prompt_list(cfg)),
                time_to_first_block_s=rows[0]["elapsed_s"],
                steady_fps=sum(r["frames"] for r in rest) / span if rest and span > 0 else float("nan"),
                overall_fps=frames / rows[-1]["elapsed_s"],
                mean_block_latency_s=sum(r["latency_s"] for r in rows) / len(rows),
                cache_mib=session.cache_bytes() / 2**20, kv_dtype=cfg.stream.kv_dtype,
                overlap=cfg.stream.overlap_decode,
                peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
                timed="per block: DiT (incl. cache refresh) and VAE decode (CUDA events when overlapped: they run "
                      "at once, so latency > wall time per block); frames/s from the wall clock at which blocks "
                      "reach the host (mp4 encoding of earlier blocks included); frames per prompt")


# -------------------------------------------------------------------------------------------------- main
def run(cfg: StreamConfig) -> dict:
    """Generate, write the videos progressively; returns the timing summary (also in timings.json)."""
    device, out = resolve_device(cfg.device), Path(cfg.out_dir)
    texts = prompt_list(cfg)
    ctx, neg = encode(cfg, texts, device)  # before the DiT loads: the two never share the device
    session = StreamSession(cfg.stream, dit=cfg.dit, vae=cfg.vae, device=device,
                            dtype=resolve_dtype(cfg.dtype, device), init_seed=cfg.seed, decode=cfg.vae_decode)
    image = None if cfg.image is None else load_image(cfg.image)
    frames = cfg.video.num_frames or 81
    layout, latent = session.plan(frames, image is not None)
    paths = [out / "video.mp4"] if len(texts) == 1 else [out / f"video_{i:03d}.mp4" for i in range(len(texts))]
    print(f"stream: {len(texts)} prompt(s), {latent} latent frames in {layout.num_blocks(latent)} blocks of {layout}, "
          f"{cfg.stream.forwards_per_block(1)} DiT calls per block, sink + window {cfg.stream.cache_frames(layout)} "
          f"frames ({cfg.stream.kv_dtype}), device {device}")
    (out / "timings.json").unlink(missing_ok=True)  # a stale one would describe another run's videos
    write_config(cfg, out / "config.yaml")  # after the inputs loaded: describes the videos written next
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with profiled(out / "trace.json" if cfg.profile else None, device):
        rows = session.write(paths, ctx, fps=cfg.video.fps, size=tuple(cfg.video.size), num_frames=frames,
                             seeds=[cfg.seed + i for i in range(len(texts))], negative=neg, image=image)
    result = summary(rows, cfg, session, device)
    (out / "timings.json").write_text(json.dumps({"summary": result, "blocks": rows}, indent=2) + "\n")
    print(f"wrote {', '.join(str(p) for p in paths)} ({result['frames']} frames each): time to first block "
          f"{result['time_to_first_block_s']:.3f} s, steady {result['steady_fps']:.2f} frames/s, "
          f"overall {result['overall_fps']:.2f} frames/s, cache {result['cache_mib']:.1f} MiB"
          + (f", peak {result['peak_mib']:.0f} MiB" if result["peak_mib"] is not None else "")
          + (f", trace {out / 'trace.json'}" if cfg.profile else ""))
    return result


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(StreamConfig, argv, prog="stream.py"))


if __name__ == "__main__":
    run_main(main)
