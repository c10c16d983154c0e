"""T2V / I2V generation with the distilled rCM student (1-4 steps), the teacher (Euler / UniPC with CFG) or a
causal streaming student, on the one generation pipeline of ``rcm_pipelines.pipeline``.

    uv run recipes/generate.py --preset rcm-t2v-1.3B-480p --prompt "a corgi surfing a wave"
    uv run recipes/generate.py --preset teacher-t2v-1.3B --sampler.num_steps=50 --dit.path=Wan2.1-T2V-1.3B.pth
    uv run recipes/generate.py --preset rcm-i2v-A14B-720p --image_path=cat.jpg --prompt "the cat yawns"

Every weight comes from a local file named in the config (`--dit.path`, `--vae.path`, `--text_encoder.path`,
`--text_encoder.tokenizer`, `--clip.path`); a missing one is reported with the field to set before anything
loads, nothing is downloaded. Order of work (so that the largest model never shares the device with the text
encoder): umT5 encodes every prompt (+ the negative prompt for CFG) and is freed; the pipeline loads the DiT,
VAE (and CLIP for Wan2.1 I2V); each prompt is conditioned, sampled (its ``num_samples`` videos as one batch,
seed ``seed + i``) and decoded; one mp4 per prompt (its samples side by side). Each stage's time is printed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator

from rcm_kernels.devices import resolve_device
from rcm_pipelines.components import (
    CLIPSpec,
    DiTSpec,
    DType,
    TextEncoderSpec,
    VAESpec,
    dit_config,
    read_prompts,
    require_file,
    resolve_dtype,
)
from rcm_pipelines.pipeline import SamplerSpec, VideoPipeline, VideoSpec, encode_texts
from rcm_pipelines.progress import Progress
from rcm_pipelines.timing import StageTimer
from rcm_pipelines.video import grid_video, save_video
from rcm_recipes.config import RecipeConfig, load_presets, parse_config, run_main, write_config


class GenerateConfig(RecipeConfig):
    """Generate videos from text (T2V) or from an image and text (I2V)."""

    mode: Literal["t2v", "i2v"] = "t2v"
    """Text-to-video, or image-to-video (needs image_path and an I2V DiT, or a causal DiT)."""
    prompt: str = "A cat walks on the grass, realistic style."
    """The text prompt (ignored when prompt_file is set)."""
    prompt_file: str | None = None
    """A text file with one prompt per non-empty line; prompt i uses seed + i and gets its own mp4."""
    image_path: str | None = None
    """I2V: the first-frame image (any size; resized, or see video.adaptive_resolution)."""
    num_samples: int = 1
    """Samples per prompt (one batch; different noise each)."""
    seed: int = 0
    """Seed of the initial and re-noising noise (CPU generator: the same on every device)."""
    sampler: SamplerSpec = SamplerSpec()
    """Which sampler (rcm / euler / unipc / causal) and its settings."""
    video: VideoSpec = VideoSpec()
    """Size, length and frame rate."""
    dit: DiTSpec = DiTSpec()
    """The diffusion transformer (student for rcm / causal, teacher for euler / unipc)."""
    vae: VAESpec = VAESpec()
    """The VAE (decodes; I2V also encodes the image)."""
    text_encoder: TextEncoderSpec = TextEncoderSpec()
    """umT5 encoder and tokenizer."""
    clip: CLIPSpec = CLIPSpec()
    """CLIP image encoder (Wan2.1 I2V DiTs only)."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda, cuda:1, ..."""
    dtype: DType = "auto"
    """DiT weights and compute dtype; auto: bf16 on CUDA, float32 on CPU."""
    output: str = "outputs/generate/video.mp4"
    """Output mp4 (several prompts: <stem>_000.mp4, ...); the resolved config goes next to it (.yaml)."""
    save_latents: bool = False
    """Also save the sampled latents [N, B, 16, T, H, W] as <output stem>.latents.pt."""

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if self.mode == "i2v" and not self.image_path:
            raise ValueError("mode='i2v' needs image_path (set --image_path=FILE)")
        if self.mode == "t2v" and self.image_path:
            raise ValueError("image_path is given but mode='t2v' (set --mode=i2v)")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.sampler.kind == "causal" and self.num_samples != 1:
            raise ValueError("sampler.kind=causal makes one video at a time: set num_samples=1")
        if Path(self.output).suffix not in (".mp4", ".gif"):
            raise ValueError(f"output {self.output!r} must end in .mp4 or .gif")
        self.sampler.check()
        self.video.check_vae_frames()
        return self


PRESETS: dict[str, GenerateConfig] = load_presets(GenerateConfig, "generate")
"""Named starting points: configs/generate/<name>.yaml (docs/recipes_distill_generate.md); paths are relative
to the working directory."""


def _check_files(cfg: GenerateConfig) -> None:
    """Fail before loading anything if a needed file is absent."""
    require_file(cfg.dit.path, "dit.path", "DiT weights")
    if cfg.dit.low_noise_path is not None:
        require_file(cfg.dit.low_noise_path, "dit.low_noise_path", "low-noise expert weights")
    require_file(cfg.vae.path, "vae.path", "VAE weights")
    require_file(cfg.text_encoder.path, "text_encoder.path", "umT5 encoder weights")
    require_file(cfg.text_encoder.tokenizer, "text_encoder.tokenizer", "umT5 tokenizer")
    if cfg.sampler.uses_cfg() and cfg.sampler.negative_embed_path is not None:
        require_file(cfg.sampler.negative_embed_path, "sampler.negative_embed_path", "negative-prompt embedding")
    if cfg.image_path is not None:
        require_file(cfg.image_path, "image_path", "I2V input image")
    if cfg.mode == "i2v" and cfg.sampler.kind != "causal" and dit_config(cfg.dit).model_type == "i2v":
        require_file(cfg.clip.path, "clip.path", "CLIP weights")


def _output(cfg: GenerateConfig, i: int, n: int) -> Path:
    out = Path(cfg.output)
    return out if n == 1 else out.with_name(f"{out.stem}_{i:03d}{out.suffix}")


def _writable_output(cfg: GenerateConfig) -> Path:
    """The config sidecar's path, after checking the output directory can be written (before any work); a stale
    sidecar is removed, so a run that fails leaves no file claiming to describe the videos."""
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"output: directory {out.parent} is not writable")
    out.with_suffix(".yaml").unlink(missing_ok=True)
    return out.with_suffix(".yaml")


def run(cfg: GenerateConfig) -> dict:
    """Generate and write the videos; returns ``{"videos": [paths], "timing", "expert_calls", "prompts"}``."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    timer = StageTimer(device)
    _check_files(cfg)
    prompts = [cfg.prompt] if cfg.prompt_file is None else read_prompts(cfg.prompt_file)
    sidecar = _writable_output(cfg)
    context, uncond = encode_texts(cfg.text_encoder, prompts, text_len=dit_config(cfg.dit).text_len, device=device,
                                   sampler=cfg.sampler, timer=timer)
    pipe = VideoPipeline(cfg.sampler, cfg.video, mode=cfg.mode, dit=cfg.dit, vae=cfg.vae, clip=cfg.clip,
                         device=device, dtype=dtype, timer=timer)
    image = None if cfg.image_path is None else Path(cfg.image_path)
    paths, latents = [], []
    for i in range(len(prompts)):
        cond = pipe.condition(image)
        with Progress(cfg.sampler.steps(), f"{cfg.sampler.kind} {i + 1}/{len(prompts)}", unit="step",
                      leave=False) as bar:
            x0 = pipe.latent(context[i : i + 1], uncond, cond, cfg.seed + i, num_samples=cfg.num_samples,
                             callback=lambda _: bar.update())
        latents.append(x0.cpu())
        path = _output(cfg, i, len(prompts))
        with timer.stage("write mp4", f"{path.name}: {cfg.num_samples} sample(s) side by side, {cfg.video.fps} fps"):
            paths.append(save_video(grid_video(pipe.decode(x0)[None]), path, fps=cfg.video.fps))
    if cfg.save_latents:
        torch.save(torch.stack(latents), Path(cfg.output).with_suffix(".latents.pt"))
    pipe.free()
    write_config(cfg, sidecar)  # only now: the sidecar describes the videos beside it
    timer.report("config resolved to the last mp4 written, loading included")
    return {"videos": paths, "timing": timer.as_dict(), "prompts": prompts,
            "expert_calls": dict(pipe.expert_calls) if cfg.dit.low_noise_path else None}


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(GenerateConfig, argv, presets=PRESETS, prog="generate.py"))


if __name__ == "__main__":
    run_main(main)
