"""The generation pipeline: (prompt embedding, seed, optional image) -> video, with any sampler of the project.

Used by ``recipes/generate.py`` and the VBench harness (``recipes/eval_vbench.py``); the sampling loops
themselves are :mod:`rcm_pipelines.generation` and :mod:`rcm_pipelines.streaming`.

Samplers (`SamplerSpec.kind`):

* ``rcm``: the distilled bidirectional student, 1-4 consistency steps (`generation.rcm_generate`), no CFG;
* ``euler`` / ``unipc``: the bidirectional teacher, N flow steps with classifier-free guidance
  (`generation.teacher_generate`);
* ``causal``: a causal (streaming) student, block by block with a KV cache holding the whole video
  (`rcm_pipelines.streaming.stream_generate`), configured by ``SamplerSpec.causal``: the same
  :class:`~rcm_pipelines.stream_spec.StreamSpec` as the streaming session (``recipes/stream.py``'s ``--stream.*``
  is ``--sampler.causal.*`` here); I2V gives the image's latent as the first block (:func:`causal_first_block`,
  shared with the session).

A prompt's ``num_samples`` videos are one batch drawn from a CPU generator seeded with the prompt's seed
(initial noise first, then the re-noising draws), so a video's pixels depend on its seed and its batch only,
not on the device, the rank or the order of work. :class:`VideoPipeline` holds the loaded networks; the text
encoder runs before it is built (:func:`encode_texts`) so the two never share the device.

Shape legend: C=16 latent channels, T latent frames, H x W latent pixels, L text rows, D text width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from rcm_kernels.blockmask import BlockLayout
from rcm_losses.schedules import check_schedule
from rcm_nets.wan.causal import make_kv_cache
from rcm_nets.wan.vae import WanVAE

from .components import (
    WAN_NEGATIVE_PROMPT,
    CLIPSpec,
    DiTSpec,
    TextEncoder,
    TextEncoderSpec,
    VAESpec,
    dit_config,
    free_memory,
    load_clip,
    load_dit,
    load_embedding,
    load_vae,
)
from .config import PipelineConfig
from .generation import (
    ExpertSwitch,
    adaptive_size,
    i2v_condition,
    latent_shape,
    rcm_generate,
    teacher_generate,
    velocity_fn,
    video_size,
)
from .stream_spec import StreamSpec
from .streaming import stream_generate
from .timing import StageTimer
from .video import load_image

__all__ = ["SamplerSpec", "VideoSpec", "Condition", "VideoPipeline", "causal_first_block", "encode_texts"]

_ROLLING_ONLY = ("trained_frames", "sink_frames", "window_frames", "position_policy", "extrapolation",
                 "sink_bank_frames")
"""StreamSpec fields of the rolling cache of long streams; the pipeline's cache holds the whole video, so they
must keep their defaults under sampler.causal (a set value would be ignored)."""


class SamplerSpec(PipelineConfig):
    """Which sampler makes the videos, and its settings."""

    kind: Literal["rcm", "euler", "unipc", "causal"] = "rcm"
    """rcm: distilled bidirectional student (1-4 steps, no CFG); euler / unipc: the teacher (N steps + CFG);
    causal: a causal streaming student, block by block with a KV cache."""
    num_steps: int | None = Field(None, ge=1)
    """Steps; None: 4 for rcm, 50 for the teacher; causal: the steps of block 0 (set by causal.times)."""
    sigma_max: float | None = Field(None, gt=0)
    """Initial EDM noise level; None: 80 for rcm T2V, 200 for rcm I2V, 5000 for the teacher."""
    mid_t: list[float] = [1.5, 1.4, 1.0]
    """rcm: intermediate TrigFlow times of the 2-4 step schedules."""
    ode: bool = False
    """rcm: deterministic RF Euler updates instead of re-noising."""
    guidance: float = Field(5.0, ge=0)
    """Teacher CFG scale (1 disables the unconditional pass; causal: causal.guidance)."""
    shift: float = Field(5.0, gt=0)
    """Teacher: Wan time shift of the step schedule."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """Teacher CFG negative prompt (Wan's default; causal: causal.negative_prompt)."""
    negative_embed_path: str | None = None
    """A stored negative-prompt embedding [L, D] used instead of encoding the negative prompt (teacher or causal
    CFG)."""
    causal: StreamSpec = StreamSpec()
    """kind=causal: the streaming spec shared with recipes/stream.py (times, solver, refresh, context_noise,
    guidance, frames_per_block, first_block_frames, kv_dtype, timestep_bf16, ...; docs/causal.md). The KV cache
    holds the whole video, so the rolling-cache fields (trained_frames, sink/window frames, position_policy,
    extrapolation, sink_bank_frames) keep their defaults; I2V: first_block_frames unset or 1 (the image)."""
    boundary: float = Field(0.9, gt=0, lt=1)
    """Two-expert DiTs (dit.low_noise_path set): RF time at which the low-noise expert takes over."""
    offload_experts: bool = True
    """Two-expert DiTs: keep the expert not in use on the CPU."""

    def steps(self) -> int:
        """Denoising steps (causal: of block 0)."""
        if self.kind == "causal":
            times = self.causal.block_times()
            return len(times[0]) if isinstance(times[0], list) else len(times)
        return self.num_steps if self.num_steps is not None else (4 if self.kind == "rcm" else 50)

    def sigma(self, mode: str) -> float:
        if self.sigma_max is not None:
            return self.sigma_max
        return 5000.0 if self.kind in ("euler", "unipc") else (200.0 if mode == "i2v" else 80.0)

    def uses_cfg(self) -> bool:
        if self.kind == "causal":
            return self.causal.uses_cfg()
        return self.kind in ("euler", "unipc") and self.guidance > 1

    def negative_text(self) -> str:
        """The CFG negative prompt of this sampler (causal: causal.negative_prompt)."""
        return self.causal.negative_prompt if self.kind == "causal" else self.negative_prompt

    @field_validator("mid_t")
    @classmethod
    def _mid_t(cls, v: list[float]) -> list[float]:
        return check_schedule(v, low=0.0, high=math.pi / 2, what="mid_t") if v else v

    def check(self) -> None:
        """Cross-field checks (called by the recipe's validator); messages name the flag."""
        if self.kind == "rcm" and self.num_steps is not None and not 1 <= self.num_steps <= len(self.mid_t) + 1:
            raise ValueError(f"sampler.num_steps for rcm must be 1..{len(self.mid_t) + 1}, got {self.num_steps}")
        if self.kind == "causal" and self.num_steps is not None and self.num_steps != self.steps():
            raise ValueError(f"sampler.num_steps={self.num_steps} but sampler.causal.times gives {self.steps()} "
                             "steps: set the times (the steps are their count)")
        if self.kind == "causal":
            default = StreamSpec()
            for name in _ROLLING_ONLY:
                if getattr(self.causal, name) != getattr(default, name):
                    raise ValueError(f"sampler.causal.{name} applies to rolling caches (recipes/stream.py); the "
                                     "pipeline's KV cache holds the whole video: leave it at its default")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {self.num_steps}")


class VideoSpec(PipelineConfig):
    """Size, length and frame rate of the videos."""

    resolution: Literal["480p", "720p"] = "480p"
    """Resolution preset (480p 16:9 = 832x480)."""
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    """Aspect-ratio preset."""
    size: tuple[int, int] | None = None
    """Explicit (width, height) in pixels, multiples of 16; overrides resolution and aspect_ratio."""
    adaptive_resolution: bool = False
    """I2V: keep the preset's pixel area with each image's aspect ratio (sides rounded to 16)."""
    num_frames: int | None = Field(None, ge=1)
    """Frames (1 + 4k through the Wan VAE: checked by :meth:`check_vae_frames`); None: 77 for rcm T2V, 81
    otherwise."""
    fps: int = Field(16, ge=1, le=240)
    """Frame rate of the mp4 files."""

    @model_validator(mode="after")
    def _check(self) -> VideoSpec:
        if self.size is not None and any(v <= 0 or v % 16 for v in self.size):
            raise ValueError(f"size must be positive multiples of 16 (width, height), got {self.size}")
        return self

    def check_vae_frames(self) -> None:
        """The Wan VAE decodes 1 + 4k frames (a pixel-space model takes any count)."""
        if self.num_frames is not None and (self.num_frames - 1) % 4:
            raise ValueError(f"video.num_frames must be 1 + 4k (the Wan VAE's frame grouping), got {self.num_frames}")

    def frames(self, kind: str, mode: str) -> int:
        if self.num_frames is not None:
            return self.num_frames
        return 77 if kind == "rcm" and mode == "t2v" else 81


@dataclass
class Condition:
    """Per-prompt conditioning: ``size`` (width, height) and, for I2V, the bidirectional ``y [1, 20, T, H, W]``
    (+ ``clip_fea [1, 257, 1280]`` for Wan2.1 I2V) or the causal first block ``first [1, C, 1, H, W]``."""

    size: tuple[int, int]
    y: Tensor | None = None
    clip_fea: Tensor | None = None
    first: Tensor | None = None


def encode_texts(spec: TextEncoderSpec, texts: list[str], *, text_len: int, device: torch.device,
                 sampler: SamplerSpec, timer: StageTimer) -> tuple[Tensor, Tensor | None]:
    """umT5 embeddings ``[N, L, D]`` of ``texts`` and the negative prompt's ``[L, D]`` (None without CFG), on the
    CPU; the encoder is freed before returning."""
    need_neg = sampler.uses_cfg() and sampler.negative_embed_path is None
    with timer.stage("load text encoder", "umT5 weights onto the device + tokenizer"):
        encoder = TextEncoder(spec, text_len=text_len, device=device)
    with timer.stage("text encoder", f"tokenize + umT5 forward of {len(texts) + need_neg} prompt(s)"):
        emb = encoder(texts + ([sampler.negative_text()] if need_neg else []))
    with timer.stage("free text encoder", "delete umT5, release its device memory"):
        encoder.free()
    neg = None
    if sampler.uses_cfg():
        neg = emb[len(texts)] if need_neg else load_embedding(sampler.negative_embed_path,
                                                              "sampler.negative_embed_path", text_len=text_len)
    return emb[: len(texts)], neg


def causal_first_block(image_chw: Tensor, size: tuple[int, int], vae: WanVAE | None,
                       device: torch.device) -> Tensor:
    """Causal I2V: the image ``[3, H, W]`` in [-1, 1] resized (bicubic, clamped) to ``size`` (width, height) as the
    first block ``[1, C, 1, h, w]`` float32: its VAE latent (on the VAE's device), or with ``vae=None`` (a
    pixel-space DiT) the pixels themselves on ``device``. The one first-block function of the generation
    pipeline and the streaming session."""
    w, h = size
    img = F.interpolate(image_chw[None].float(), size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
    img = img[:, :, None]
    if vae is None:
        return img.to(device)
    p = next(vae.parameters())
    with torch.no_grad():
        return vae.encode(img.to(device=p.device, dtype=p.dtype)).float()


class VideoPipeline:
    """The loaded DiT(s), VAE and CLIP; turns (prompt embedding, seed, optional image) into videos.

    ``mode`` is ``t2v`` or ``i2v``; ``dtype`` the DiT dtype. Build it after `encode_texts` (memory order).
    """

    def __init__(self, sampler: SamplerSpec, video: VideoSpec, *, mode: str, dit: DiTSpec, vae: VAESpec,
                 clip: CLIPSpec, device: torch.device, dtype: torch.dtype, timer: StageTimer):
        self.spec, self.video, self.mode, self.device, self.dtype = sampler, video, mode, device, dtype
        self.timer = timer
        self.net_cfg = dit_config(dit)
        i2v_net = self.net_cfg.model_type == "i2v" or self.net_cfg.in_dim > self.net_cfg.out_dim
        if sampler.kind == "causal":
            if i2v_net:
                raise ValueError("sampler.kind=causal runs a T2V causal DiT (I2V gives the image as the first block); "
                                 f"dit.config={dit.config!r} is an I2V network")
            if dit.low_noise_path is not None:
                raise ValueError("sampler.kind=causal takes one DiT: unset dit.low_noise_path")
        elif i2v_net != (mode == "i2v"):
            raise ValueError(f"suite={mode!r} but dit.config={dit.config!r} is a " + ("I2V" if i2v_net else "T2V")
                             + " network")
        self.frames = video.frames(sampler.kind, mode)
        with timer.stage("load DiT", "DiT weights onto the device"):
            self.nets = [load_dit(dit, device, dtype)]
            if dit.low_noise_path is not None:
                self.nets.append(load_dit(dit, torch.device("cpu") if sampler.offload_experts else device, dtype,
                                          path=dit.low_noise_path, field="dit.low_noise_path"))
        with timer.stage("load VAE", "VAE weights onto the device"):
            self.vae = load_vae(vae, device, dtype)
        self.tiled = vae.tiled
        self.clip = None
        if mode == "i2v" and self.net_cfg.model_type == "i2v":
            with timer.stage("load CLIP", "CLIP visual tower onto the device"):
                self.clip = load_clip(clip, device, dtype)
        self.expert_calls = {"high": 0, "low": 0}

    # ------------------------------------------------------------------------------------------ per prompt
    def condition(self, image_path: Path | None) -> Condition:
        """Size and I2V conditioning of a prompt (``image_path`` None for T2V)."""
        size = video_size(self.video.resolution, self.video.aspect_ratio, self.video.size)
        if image_path is None:
            return Condition(size)
        image = load_image(image_path)
        if self.video.adaptive_resolution:
            size = adaptive_size(image.shape[1:], size)
        if self.spec.kind == "causal":
            return Condition(size, first=causal_first_block(image, size, self.vae, self.device))
        clip_fea = None
        if self.clip is not None:
            with self.timer.stage("CLIP image encoder", "preprocess + ViT forward of the input image"), torch.no_grad():
                clip_fea = self.clip.encode_images(image[None].to(self.device))
        with self.timer.stage("VAE encode", f"I2V condition: image resized to {size[0]}x{size[1]}, {self.frames}-frame "
                                            "[image, zeros] video encoded"):
            y = i2v_condition(self.vae, image, self.frames, *size)
        return Condition(size, y=y, clip_fea=clip_fea)

    # ------------------------------------------------------------------------------------------ per video
    def latent(self, context: Tensor, uncond: Tensor | None, cond: Condition, seed: int, *, num_samples: int = 1,
               callback: Callable[[dict], None] | None = None) -> Tensor:
        """The clean latents ``[num_samples, C, T, H, W]`` (float32) of one prompt: ``context [1, L, D]``,
        ``uncond [L, D]`` (CFG only); the noise comes from a CPU generator seeded with ``seed``. ``callback(info)``
        after each denoising step (progress; bidirectional samplers)."""
        shape = latent_shape(self.frames, *cond.size, channels=self.net_cfg.out_dim)
        g = torch.Generator().manual_seed(seed)
        ctx = context.to(device=self.device, dtype=self.dtype).expand(num_samples, -1, -1)
        s = self.spec
        calls = s.steps() * (2 if s.uses_cfg() else 1)
        what = (f"{s.steps()} {s.kind} steps = {calls} DiT forward calls on a batch of {num_samples}, "
                f"latent {list(shape)}")
        if s.kind == "causal":
            what = (f"causal, block by block: {s.causal.forwards_per_block(0)} DiT forward calls for block 0 (steps"
                    f"{' + cache pass' if s.causal.refresh == 'clean' else ''}{', x2 CFG' if s.uses_cfg() else ''}), "
                    f"latent {list(shape)}")
        with self.timer.stage("DiT steps", what):
            if s.kind == "causal":
                if num_samples != 1:
                    raise ValueError("sampler.kind=causal makes one video at a time: set num_samples=1")
                return self._causal(ctx, uncond, shape, g, cond.first)
            noise = torch.randn((num_samples, *shape), generator=g, dtype=torch.float32).to(self.device)
            velocity = self._velocity(cond)
            if s.kind == "rcm":
                x0 = rcm_generate(velocity, noise, ctx, generator=g, num_steps=s.steps(), sigma_max=s.sigma(self.mode),
                                  mid_t=s.mid_t, input_dtype=self.dtype, ode=s.ode, callback=callback)
            else:
                unc = None if uncond is None else \
                    uncond.to(device=self.device, dtype=self.dtype)[None].expand(num_samples, -1, -1)
                x0 = teacher_generate(velocity, noise, ctx, unc, sampler=s.kind, num_steps=s.steps(),
                                      guidance=s.guidance, shift=s.shift, sigma_max=s.sigma(self.mode),
                                      input_dtype=self.dtype, callback=callback)
        if isinstance(velocity, ExpertSwitch):
            for k, v in velocity.calls.items():
                self.expert_calls[k] += v
        return x0.float()

    def _velocity(self, cond: Condition):
        vel = [velocity_fn(n, y=cond.y, clip_fea=cond.clip_fea) for n in self.nets]
        if len(vel) == 1:
            return vel[0]
        return ExpertSwitch(vel[0], vel[1], boundary=self.spec.boundary, nets=tuple(self.nets), device=self.device,
                            offload=self.spec.offload_experts)

    def _causal(self, ctx: Tensor, uncond: Tensor | None, shape: tuple[int, int, int, int], g: torch.Generator,
                first: Tensor | None) -> Tensor:
        """One video ``[1, C, T, H, W]`` streamed with ``spec.causal``: non-rolling cache(s) of all T frames (two
        with CFG: ``uncond [L, D]`` the negative prompt); I2V: ``first [1, C, 1, H, W]`` is block 0."""
        c, t, h, w = shape
        s = self.spec.causal
        if first is not None and s.first_block_frames not in (None, 1):
            raise ValueError("causal I2V gives the image as the first block: set sampler.causal.first_block_frames=1 "
                             f"(or leave it unset), got {s.first_block_frames}")
        layout = BlockLayout(s.frames_per_block, 1 if first is not None else s.first_block_frames)
        if not layout.covers_exactly(t):
            raise ValueError(f"{t} latent frames ({self.frames} px frames) are not whole blocks of {layout}: change "
                             "video.num_frames or sampler.causal.frames_per_block / first_block_frames")
        net = self.nets[0]
        cfg = s.uses_cfg()
        if cfg and uncond is None:
            raise ValueError(f"sampler.causal.guidance={s.guidance} needs the negative prompt's embedding")
        caches = [make_kv_cache(net, batch=1, height=h, width=w, layout=layout, window_frames=t, rolling=False,
                                kv_dtype=s.kv_dtype, group_size=s.group_size, key_smoothing=s.key_smoothing,
                                device=self.device) for _ in range(1 + cfg)]
        neg = net.encode_prompt(uncond.to(device=self.device, dtype=self.dtype)[None]) if cfg else None
        blocks = stream_generate(net, net.encode_prompt(ctx), caches[0], num_frames=t, layout=layout,
                                 latent_shape=(1, c, h, w), generator=g, times=s.block_times(),
                                 context_noise=s.context_noise, refresh=s.refresh,
                                 clean_refresh_blocks=s.clean_refresh_blocks, solver=s.solver, negative=neg,
                                 uncond_cache=caches[1] if cfg else None, guidance=s.guidance, initial_latent=first,
                                 timestep_dtype=torch.bfloat16 if s.timestep_bf16 else None,
                                 cuda_graph=s.cuda_graph)  # graphs of this video's caches (captured per video)
        return torch.cat([b.x0.float() for b in blocks], dim=2)

    def decode(self, latent: Tensor) -> Tensor:
        """Pixels ``[N, 3, F, H, W]`` in [-1, 1] (CPU float32) of latents ``[N, C, T, H, W]``."""
        p = next(self.vae.parameters())
        with self.timer.stage("VAE decode", f"{len(latent)} latent(s) {list(latent.shape[1:])}"
                                            + (" (tiled)" if self.tiled else "")), torch.no_grad():
            return self.vae.decode(latent.to(device=p.device, dtype=p.dtype), tiled=self.tiled).float().cpu()

    def free(self) -> None:
        self.nets, self.vae, self.clip = [], None, None
        free_memory()
