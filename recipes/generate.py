"""T2V / I2V generation with the distilled rCM student (1-4 steps) or the teacher (Euler / UniPC with CFG).

    uv run recipes/generate.py --preset rcm-t2v-1.3B-480p --prompt "a corgi surfing a wave"
    uv run recipes/generate.py --preset teacher-t2v-1.3B --num_steps=50 --dit.path=Wan2.1-T2V-1.3B.pth
    uv run recipes/generate.py --preset rcm-i2v-A14B-720p --image_path=cat.jpg --prompt "the cat yawns"

Every weight comes from a local file named in the config (`--dit.path`, `--vae.path`, `--text_encoder.path`,
`--text_encoder.tokenizer`, `--clip.path`); a missing one is reported with the field to set, nothing is
downloaded. Order of work (so that the largest model never shares the device with the text encoder):
umT5 encodes every prompt (+ the negative prompt for CFG) and is freed; I2V: the VAE encodes the image
(+ CLIP for Wan2.1 I2V); the DiT samples every prompt; the DiT is freed; the VAE decodes; mp4 files are
written (one per prompt: its samples side by side). Each stage's time is printed with what it covers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import model_validator
from tqdm import tqdm

from rcm_kernels.devices import resolve_device
from rcm_pipelines.components import (
    WAN_NEGATIVE_PROMPT,
    CLIPSpec,
    DiTSpec,
    DType,
    MissingFileError,
    TextEncoder,
    TextEncoderSpec,
    VAESpec,
    dit_config,
    free_memory,
    load_clip,
    load_dit,
    load_embedding,
    load_vae,
    read_prompts,
    require_file,
    resolve_dtype,
)
from rcm_pipelines.generation import (
    ExpertSwitch,
    adaptive_size,
    i2v_condition,
    latent_shape,
    rcm_generate,
    teacher_generate,
    velocity_fn,
    video_size,
)
from rcm_pipelines.timing import StageTimer
from rcm_pipelines.video import grid_video, load_image, save_video
from rcm_recipes.config import RecipeConfig, parse_config, write_config


class GenerateConfig(RecipeConfig):
    """Generate videos from text (T2V) or from an image and text (I2V) with an rCM student or a teacher."""

    mode: Literal["t2v", "i2v"] = "t2v"
    """Text-to-video, or image-to-video (needs image_path and an I2V DiT)."""
    sampler: Literal["rcm", "euler", "unipc"] = "rcm"
    """rcm: few-step consistency sampling of a distilled student (no CFG); euler / unipc: the teacher's
    multi-step flow samplers with classifier-free guidance."""
    prompt: str = "A cat walks on the grass, realistic style."
    """The text prompt (ignored when prompt_file is set)."""
    prompt_file: str | None = None
    """A text file with one prompt per non-empty line; prompt i uses seed + i and gets its own mp4."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """Negative prompt of the teacher's CFG (default: Wan's); unused by the rcm sampler."""
    negative_embed_path: str | None = None
    """A stored negative-prompt embedding [L, D] (e.g. umT5_wan_negative_emb.pt) used instead of encoding
    negative_prompt."""
    image_path: str | None = None
    """I2V: the first-frame image (any size; resized, or see adaptive_resolution)."""
    num_samples: int = 1
    """Samples per prompt (one batch; different noise each)."""
    seed: int = 0
    """Seed of the initial and re-noising noise (CPU generator: the same on every device)."""
    num_steps: int | None = None
    """Sampling steps; None: 4 for rcm (1-4 allowed), 50 for the teacher samplers."""
    sigma_max: float | None = None
    """Initial EDM noise level; None: 80 for rcm T2V, 200 for rcm I2V, 5000 for the teacher samplers."""
    mid_t: list[float] = [1.5, 1.4, 1.0]
    """rcm: intermediate TrigFlow times of the 2-4 step schedules (the first num_steps - 1 are used)."""
    ode: bool = False
    """rcm: deterministic RF Euler updates instead of re-noising with fresh noise."""
    guidance: float = 5.0
    """Teacher CFG scale (1 disables the unconditional pass)."""
    shift: float = 5.0
    """Teacher samplers: Wan time shift of the step schedule."""
    resolution: Literal["480p", "720p"] = "480p"
    """Resolution preset (480p 16:9 = 832x480, 720p 16:9 = 1280x720)."""
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    """Aspect-ratio preset."""
    size: tuple[int, int] | None = None
    """Explicit (width, height) in pixels, multiples of 16; overrides resolution and aspect_ratio."""
    adaptive_resolution: bool = False
    """I2V: keep the preset's pixel area but use the image's aspect ratio (sides rounded to 16)."""
    num_frames: int | None = None
    """Frames, 1 + 4k; None: 77 for rcm T2V, 81 otherwise."""
    boundary: float = 0.9
    """Two-expert DiTs (dit.low_noise_path set): RF time at which the low-noise expert takes over."""
    offload_experts: bool = True
    """Two-expert DiTs: keep the expert not in use on the CPU."""
    dit: DiTSpec = DiTSpec()
    """The diffusion transformer (student for rcm, teacher for euler / unipc)."""
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
    fps: int = 16
    """Frame rate of the mp4."""
    save_latents: bool = False
    """Also save the sampled latents [N, B, 16, T, H, W] as <output stem>.latents.pt."""

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        if self.mode == "i2v" and not self.image_path:
            raise ValueError("mode='i2v' needs image_path (set --image_path=FILE)")
        if self.mode == "t2v" and self.image_path:
            raise ValueError("image_path is given but mode='t2v' (set --mode=i2v)")
        if self.sampler == "rcm" and self.num_steps is not None and not 1 <= self.num_steps <= len(self.mid_t) + 1:
            raise ValueError(f"rcm num_steps must be 1..{len(self.mid_t) + 1} (len(mid_t) + 1), got {self.num_steps}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        return self

    # defaults that depend on the sampler / mode (docs/losses.md, sampling)
    def steps(self) -> int:
        return self.num_steps if self.num_steps is not None else (4 if self.sampler == "rcm" else 50)

    def sigma(self) -> float:
        if self.sigma_max is not None:
            return self.sigma_max
        return 5000.0 if self.sampler != "rcm" else (200.0 if self.mode == "i2v" else 80.0)

    def frames(self) -> int:
        if self.num_frames is not None:
            return self.num_frames
        return 77 if self.sampler == "rcm" and self.mode == "t2v" else 81


def _preset(**kw) -> GenerateConfig:
    return GenerateConfig.model_validate(kw)


_I2V_IMAGE = "assets/i2v_input.jpg"
PRESETS: dict[str, GenerateConfig] = {
    "rcm-t2v-1.3B-480p": _preset(dit=DiTSpec(config="t2v-1.3B", path="checkpoints/rCM_Wan2.1_T2V_1.3B_480p.pt")),
    "rcm-t2v-14B-480p": _preset(dit=DiTSpec(config="t2v-14B", path="checkpoints/rCM_Wan2.1_T2V_14B_480p.pt")),
    "rcm-t2v-14B-720p": _preset(resolution="720p", sigma_max=120.0,
                                dit=DiTSpec(config="t2v-14B", path="checkpoints/rCM_Wan2.1_T2V_14B_720p.pt")),
    "rcm-i2v-A14B-720p": _preset(mode="i2v", image_path=_I2V_IMAGE, resolution="720p", dit=DiTSpec(
        config="i2v-A14B", path="checkpoints/Wan2.2-I2V-A14B-high-rCM4.0-merged.pt",
        low_noise_path="checkpoints/Wan2.2-I2V-A14B-low-rCM1.0-merged.pt")),
    "teacher-t2v-1.3B": _preset(sampler="unipc", dit=DiTSpec(config="t2v-1.3B",
                                                             path="checkpoints/Wan2.1-T2V-1.3B.pth")),
    "teacher-t2v-14B": _preset(sampler="unipc", dit=DiTSpec(config="t2v-14B", path="checkpoints/Wan2.1-T2V-14B.pth")),
    "teacher-i2v-A14B": _preset(sampler="unipc", mode="i2v", image_path=_I2V_IMAGE, resolution="720p", dit=DiTSpec(
        config="i2v-A14B", path="checkpoints/Wan2.2-I2V-A14B-high.pth",
        low_noise_path="checkpoints/Wan2.2-I2V-A14B-low.pth")),
}
"""Named starting points (docs/losses.md, sampling); paths are relative to the working directory."""


# ------------------------------------------------------------------------------------------ steps
def _prompts(cfg: GenerateConfig) -> list[str]:
    if cfg.prompt_file is None:
        return [cfg.prompt]
    return read_prompts(cfg.prompt_file)


def _check_files(cfg: GenerateConfig, needs_clip: bool) -> None:
    """Fail before loading anything if a needed file is absent."""
    require_file(cfg.dit.path, "dit.path", "DiT weights")
    if cfg.dit.low_noise_path is not None:
        require_file(cfg.dit.low_noise_path, "dit.low_noise_path", "low-noise expert weights")
    require_file(cfg.vae.path, "vae.path", "VAE weights")
    require_file(cfg.text_encoder.path, "text_encoder.path", "umT5 encoder weights")
    require_file(cfg.text_encoder.tokenizer, "text_encoder.tokenizer", "umT5 tokenizer")
    if cfg.negative_embed_path is not None:
        require_file(cfg.negative_embed_path, "negative_embed_path", "negative-prompt embedding")
    if cfg.image_path is not None:
        require_file(cfg.image_path, "image_path", "I2V input image")
    if needs_clip:
        require_file(cfg.clip.path, "clip.path", "CLIP weights")


def _encode_text(cfg: GenerateConfig, prompts: list[str], text_len: int, device, timer: StageTimer):
    """Prompt embeddings ``[N, L, D]`` and the negative embedding ``[L, D]`` (None for rcm), text encoder freed."""
    use_cfg = cfg.sampler != "rcm" and cfg.guidance > 1
    texts = prompts + ([cfg.negative_prompt] if use_cfg and cfg.negative_embed_path is None else [])
    with timer.stage("load text encoder", "umT5 weights from disk onto the device + tokenizer"):
        encoder = TextEncoder(cfg.text_encoder, text_len=text_len, device=device)
    with timer.stage("text encoder", f"tokenize + umT5 forward of {len(texts)} prompt(s), result to CPU"):
        emb = encoder(texts)
    with timer.stage("free text encoder", "delete umT5, release its device memory"):
        encoder.free()
    neg = None
    if use_cfg:
        neg = load_embedding(cfg.negative_embed_path, "negative_embed_path", text_len=text_len) \
            if cfg.negative_embed_path is not None else emb[len(prompts)]
    return emb[: len(prompts)], neg


def _image_condition(cfg, net_cfg, vae, device, dtype, frames, size, timer):
    """I2V: ``(y [1, 20, T, H, W], clip_fea [1, 257, 1280] | None, (width, height))``."""
    image = load_image(cfg.image_path)
    if cfg.adaptive_resolution:
        size = adaptive_size(image.shape[1:], size)
    clip_fea = None
    if net_cfg.model_type == "i2v":
        with timer.stage("load CLIP", "CLIP visual tower weights onto the device"):
            clip = load_clip(cfg.clip, device, dtype)
        with timer.stage("CLIP image encoder", "preprocess + ViT forward of the input image"):
            with torch.no_grad():
                clip_fea = clip.encode_images(image[None].to(device))
        del clip
        free_memory()
    with timer.stage("VAE encode", f"I2V condition: image resized to {size[0]}x{size[1]}, {frames}-frame "
                                   "[image, zeros] video encoded"):
        y = i2v_condition(vae, image, frames, *size)
    return y, clip_fea, size


def _velocity(cfg: GenerateConfig, nets, device, y, clip_fea):
    vel = [velocity_fn(n, y=y, clip_fea=clip_fea) for n in nets]
    if len(nets) == 1:
        return vel[0], None
    switch = ExpertSwitch(vel[0], vel[1], boundary=cfg.boundary, nets=tuple(nets), device=device,
                          offload=cfg.offload_experts)
    return switch, switch


def _sample(cfg: GenerateConfig, velocity, context, uncond, shape, i: int, n: int, device, dtype,
            timer: StageTimer) -> torch.Tensor:
    """Latents ``[num_samples, 16, T, H, W]`` (float32) of prompt ``i``; noise from a CPU generator seeded
    ``seed + i`` (initial noise first, then the re-noising draws)."""
    steps = cfg.steps()
    g = torch.Generator().manual_seed(cfg.seed + i)
    noise = torch.randn((cfg.num_samples, *shape), generator=g, dtype=torch.float32).to(device)
    ctx = context.to(device).expand(cfg.num_samples, -1, -1)
    calls = steps * (2 if cfg.sampler != "rcm" and cfg.guidance > 1 else 1)
    what = (f"prompt {i + 1}/{n}: {steps} {cfg.sampler} steps = {calls} DiT forward calls on a batch of "
            f"{cfg.num_samples}, latent {list(shape)}")
    if cfg.dit.low_noise_path is not None and cfg.offload_experts:
        what += ", expert CPU<->GPU swaps included"
    with tqdm(total=steps, desc=f"{cfg.sampler} {i + 1}/{n}", leave=False, disable=None) as bar, \
            timer.stage("DiT steps", what):
        if cfg.sampler == "rcm":
            x0 = rcm_generate(velocity, noise, ctx, generator=g, num_steps=steps, sigma_max=cfg.sigma(),
                              mid_t=cfg.mid_t, input_dtype=dtype, ode=cfg.ode, callback=lambda _: bar.update())
        else:
            unc = uncond.to(device)[None].expand(cfg.num_samples, -1, -1) if uncond is not None else None
            x0 = teacher_generate(velocity, noise, ctx, unc, sampler=cfg.sampler, num_steps=steps,
                                  guidance=cfg.guidance, shift=cfg.shift, sigma_max=cfg.sigma(), input_dtype=dtype,
                                  callback=lambda _: bar.update())
    return x0.float()


def run(cfg: GenerateConfig) -> dict:
    """Generate and write the mp4 files; returns ``{"videos": [paths], "timing": {...}, "expert_calls"}``."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    timer = StageTimer(device)
    net_cfg = dit_config(cfg.dit)
    if cfg.mode == "i2v" and not (net_cfg.model_type == "i2v" or net_cfg.in_dim > net_cfg.out_dim):
        raise ValueError(f"mode='i2v' needs an I2V DiT, but dit.config={cfg.dit.config!r} is text-to-video")
    if cfg.mode == "t2v" and (net_cfg.model_type == "i2v" or net_cfg.in_dim > net_cfg.out_dim):
        raise ValueError(f"dit.config={cfg.dit.config!r} is an I2V network: set --mode=i2v and --image_path")
    _check_files(cfg, needs_clip=net_cfg.model_type == "i2v")
    prompts = _prompts(cfg)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out.with_suffix(".yaml"))
    frames = cfg.frames()
    size = video_size(cfg.resolution, cfg.aspect_ratio, cfg.size)

    context, uncond = _encode_text(cfg, prompts, net_cfg.text_len, device, timer)
    vae = y = clip_fea = None
    if cfg.mode == "i2v":
        with timer.stage("load VAE", "VAE weights onto the device"):
            vae = load_vae(cfg.vae, device, dtype)
        y, clip_fea, size = _image_condition(cfg, net_cfg, vae, device, dtype, frames, size, timer)
    shape = latent_shape(frames, *size)

    with timer.stage("load DiT", "DiT weights from disk onto the device" +
                     (" (both experts)" if cfg.dit.low_noise_path else "")):
        nets = [load_dit(cfg.dit, device, dtype)]
        if cfg.dit.low_noise_path is not None:
            nets.append(load_dit(cfg.dit, torch.device("cpu") if cfg.offload_experts else device, dtype,
                                 path=cfg.dit.low_noise_path, field="dit.low_noise_path"))
    velocity, switch = _velocity(cfg, nets, device, y, clip_fea)
    latents = [_sample(cfg, velocity, context[i : i + 1], uncond, shape, i, len(prompts), device, dtype, timer)
               for i in range(len(prompts))]
    del nets, velocity
    free_memory()

    if vae is None:
        with timer.stage("load VAE", "VAE weights onto the device"):
            vae = load_vae(cfg.vae, device, dtype)
    paths = []
    p = next(vae.parameters())
    for i, x0 in enumerate(latents):
        with timer.stage("VAE decode", f"prompt {i + 1}/{len(prompts)}: {cfg.num_samples} latent(s) {list(shape)} "
                                       f"-> {frames} frames {size[0]}x{size[1]}" + (" (tiled)" if cfg.vae.tiled else "")):
            with torch.no_grad():
                video = vae.decode(x0.to(device=p.device, dtype=p.dtype), tiled=cfg.vae.tiled).float().cpu()
        path = out if len(prompts) == 1 else out.with_name(f"{out.stem}_{i:03d}{out.suffix}")
        with timer.stage("write mp4", f"{path.name}: {cfg.num_samples} sample(s) side by side, {cfg.fps} fps"):
            paths.append(save_video(grid_video(video[None]), path, fps=cfg.fps))
    if cfg.save_latents:
        torch.save(torch.stack([x.cpu() for x in latents]), out.with_suffix(".latents.pt"))
    timer.report("config resolved to the last mp4 written, loading included")
    return {"videos": paths, "timing": timer.as_dict(), "expert_calls": dict(switch.calls) if switch else None,
            "prompts": prompts}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(GenerateConfig, argv, presets=PRESETS, prog="generate.py")
    return run(cfg)


if __name__ == "__main__":
    try:
        main()
    except MissingFileError as err:  # a file the config names is absent: say which field to set, no traceback
        raise SystemExit(f"generate.py: error: {err}") from None
