"""Teacher-sample the prompts of a text file into webdataset shards for distillation (docs/train.md, data).

    uv run recipes/build_dataset.py --prompt_file=prompts.txt --output_dir=datasets/mine
    torchrun --nproc-per-node 8 recipes/build_dataset.py --config build.yaml     # shards split over ranks

Each sample ``i`` (the i-th non-empty prompt line, the file repeated ``repeat`` times) is three members
sharing the key ``{i:09d}``: ``latent.pt`` (the teacher's normalized VAE latent ``[16, T, H/8, W/8]``, bf16,
sampled from the noise of a generator seeded ``seed + i`` with Euler/UniPC, CFG against the negative
prompt), ``embed.pt`` (the umT5 embedding ``[text_len, 4096]``, bf16, rows past the prompt zero) and
``prompt.txt``. Shard ``k`` (``samples_per_shard`` samples, ``shard_{k:06d}.tar``) belongs to rank
``k % world_size`` (torchrun's RANK / WORLD_SIZE; no process group is needed). Writing goes through
``rcm_train.data.ShardWriter``: a shard is written as ``.tar.tmp`` and renamed when complete, and a
rerun only samples what is missing (finished shards are skipped, the complete samples of a ``.tmp`` kept).
Rank 0 also writes ``negative_embed.pt`` (the negative prompt's embedding ``[text_len, 4096]``, what
``distill.py --negative_embed_path`` takes) and the resolved config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from rcm_kernels.devices import resolve_device
from rcm_pipelines.components import (
    WAN_NEGATIVE_PROMPT,
    DiTSpec,
    DType,
    TextEncoder,
    TextEncoderSpec,
    dit_config,
    load_dit,
    read_prompts,
    require_file,
    resolve_dtype,
)
from rcm_pipelines.generation import latent_shape, teacher_generate, velocity_fn, video_size
from rcm_pipelines.progress import Progress
from rcm_recipes.config import RecipeConfig, parse_config, run_main
from rcm_recipes.rundir import open_run
from rcm_train.data import ShardWriter
from rcm_train.runtime import launch_rank_world


class BuildDatasetConfig(RecipeConfig):
    """Sample a teacher on the prompts of a text file and write (latent, embed, prompt) webdataset shards."""

    prompt_file: str = "assets/prompts.txt"
    """Text file with one prompt per non-empty line."""
    output_dir: str = "datasets/wan_synthetic"
    """Directory of the shards (shard_000000.tar, ...), negative_embed.pt and the resolved config."""
    samples_per_shard: int = Field(256, ge=1)
    """Samples per tar shard (the unit of atomic writing and of the rank split)."""
    repeat: int = Field(1, ge=1)
    """Use the prompt list this many times (sample i has seed + i, so repeats differ)."""
    batch_size: int = Field(1, ge=1)
    """Prompts sampled together."""
    dit: DiTSpec = DiTSpec(config="t2v-14B", path="checkpoints/Wan2.1-T2V-14B.pth")
    """The teacher DiT."""
    text_encoder: TextEncoderSpec = TextEncoderSpec()
    """umT5 encoder and tokenizer (kept loaded: every batch is encoded as it is sampled)."""
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    """Negative prompt of the CFG (default: Wan's)."""
    sampler: Literal["euler", "unipc"] = "euler"
    """Teacher flow sampler."""
    num_steps: int = Field(100, ge=1)
    """Sampling steps."""
    sigma_max: float = Field(5000.0, gt=0)
    """Initial EDM noise level."""
    guidance: float = Field(5.0, ge=0)
    """CFG scale."""
    shift: float = Field(3.0, gt=0)
    """Wan time shift of the step schedule."""
    num_frames: int = Field(81, ge=1)
    """Frames of the (virtual) video, 1 + 4k: the latent has 1 + (num_frames - 1) / 4 frames."""
    resolution: Literal["480p", "720p"] = "480p"
    """Resolution preset."""
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    """Aspect-ratio preset."""
    size: tuple[int, int] | None = None
    """Explicit (width, height) in pixels (multiples of 16); overrides resolution and aspect_ratio."""
    seed: int = Field(0, ge=0)
    """Sample i uses a generator seeded seed + i."""
    device: str = "auto"
    """auto: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    dtype: DType = "auto"
    """DiT dtype; auto: bf16 on CUDA, float32 on CPU."""


    @model_validator(mode="after")
    def _check(self) -> BuildDatasetConfig:
        if (self.num_frames - 1) % 4:
            raise ValueError(f"num_frames must be 1 + 4k, got {self.num_frames}")
        if self.size is not None and any(v <= 0 or v % 16 for v in self.size):
            raise ValueError(f"size must be positive multiples of 16, got {self.size}")
        return self


_FREE = ("output_dir", "device", "batch_size")
"""Settings a resumed build may change (the samples do not depend on them: sample i has seed + i)."""


def _prompts(cfg: BuildDatasetConfig) -> list[str]:
    return read_prompts(cfg.prompt_file) * cfg.repeat


def sample_latents(cfg: BuildDatasetConfig, velocity, indices: list[int], context: torch.Tensor,
                   negative: torch.Tensor | None, shape: tuple[int, ...], device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """Teacher latents ``[b, *shape]`` (float32) of samples ``indices``: noise of sample i from a generator
    seeded ``seed + i``, then the flow sampler with CFG against ``negative``."""
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed + i))
                         for i in indices]).to(device)
    ctx = context.to(device)
    unc = None if negative is None else negative.to(device)[None].expand(len(indices), -1, -1)
    return teacher_generate(velocity, noise, ctx, unc, sampler=cfg.sampler, num_steps=cfg.num_steps,
                            guidance=cfg.guidance, shift=cfg.shift, sigma_max=cfg.sigma_max, input_dtype=dtype).float()


def run(cfg: BuildDatasetConfig) -> dict:
    """Write this rank's missing samples; returns ``{"written": n, "total": N, "shards": [paths]}``."""
    rank, world = launch_rank_world()
    prompts = _prompts(cfg)
    out = Path(cfg.output_dir)
    writer = ShardWriter(out, len(prompts), cfg.samples_per_shard, rank=rank, world_size=world)
    todo = writer.pending()
    net_cfg = dit_config(cfg.dit)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    neg_path = out / "negative_embed.pt"
    open_run(out, cfg, name="build_config.yaml", ignore=_FREE, write=False)  # a rerun must be the same build
    print(f"build_dataset: rank {rank}/{world}, {len(prompts)} samples, {len(todo)} to write", flush=True)
    if not todo and (rank != 0 or neg_path.exists()):
        return {"written": 0, "total": len(prompts), "shards": sorted(out.glob("shard_*.tar"))}
    require_file(cfg.dit.path, "dit.path", "teacher DiT weights")  # fail before loading the text encoder
    encoder = TextEncoder(cfg.text_encoder, text_len=net_cfg.text_len, device=device)
    negative = encoder([cfg.negative_prompt])[0] if cfg.guidance > 1 else None
    open_run(out, cfg, name="build_config.yaml", ignore=_FREE, write=rank == 0)  # checked again, then recorded
    if rank == 0:
        if negative is not None:
            torch.save(negative.to(torch.bfloat16).clone(), neg_path)
    velocity = velocity_fn(load_dit(cfg.dit, device, dtype))
    shape = latent_shape(cfg.num_frames, *video_size(cfg.resolution, cfg.aspect_ratio, cfg.size))
    with writer, Progress(len(todo), f"rank {rank} samples", unit="sample") as bar:
        for start in range(0, len(todo), cfg.batch_size):
            idx = todo[start : start + cfg.batch_size]
            embed = encoder([prompts[i] for i in idx])
            latents = sample_latents(cfg, velocity, idx, embed, negative, shape, device, dtype)
            for j, i in enumerate(idx):
                writer.write(i, latents[j].to(torch.bfloat16), embed[j].to(torch.bfloat16), prompts[i])
            bar.update(len(idx))
    return {"written": len(todo), "total": len(prompts), "shards": sorted(out.glob("shard_*.tar"))}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BuildDatasetConfig, argv, prog="build_dataset.py")
    return run(cfg)


if __name__ == "__main__":
    run_main(main)
