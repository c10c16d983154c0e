"""Local-file loading of the Wan components for the recipes: DiT, VAE, umT5 (+ tokenizer), CLIP.

Every component is described by a small config (`DiTSpec`, `VAESpec`, `TextEncoderSpec`, `CLIPSpec`) whose
`path` names a local file; nothing is ever downloaded. A missing file raises `MissingFileError` naming the
config field to set (e.g. ``--vae.path``). Architectures default to the released models; the `arch` /
`config` fields select the tiny test networks (or any other size) without code changes.

Checkpoints go through `rcm_nets.checkpoint.load_checkpoint` (strict keys, `.pth` / `.safetensors` / DCP,
a `net.` / `net_ema.` prefix detected and stripped); networks are built on `meta` and the weights assigned
straight onto the target device, so no second copy is made.

`TextEncoder` encodes prompts to CPU tensors and can `free` itself, so a DiT loaded afterwards never shares
the device with it (1.3B generation fits a 24 GB GPU: umT5-xxl alone is 11 GB in bf16).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from rcm_kernels.devices import parse_dtype
from rcm_nets.checkpoint import load_checkpoint, read_state_dict
from rcm_nets.wan import CLIPVisual, Tokenizer, UMT5Encoder, WanDiT, WanVAE
from rcm_nets.wan.clip import visual_state_dict
from rcm_nets.wan.configs import CONFIG_NAMES, WanConfig, get_config
from rcm_nets.wan.diffusers_format import read_config

from .config import PipelineConfig

__all__ = [
    "MissingFileError",
    "DiTSpec",
    "VAESpec",
    "TextEncoderSpec",
    "CLIPSpec",
    "require_file",
    "read_dit_state_dict",
    "read_prompts",
    "resolve_dtype",
    "dit_config",
    "load_dit",
    "load_vae",
    "load_clip",
    "TextEncoder",
    "load_embedding",
    "free_memory",
    "WAN_NEGATIVE_PROMPT",
]

WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
    "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""Wan's default negative prompt (the string whose umT5 embedding is ``umT5_wan_negative_emb.pt``)."""

DType = Literal["auto", "bfloat16", "float16", "float32"]


class MissingFileError(FileNotFoundError):
    """A local file a recipe needs is absent; the message names the file and the config field to set."""


class DiTSpec(PipelineConfig):
    """A Wan DiT: architecture (named config, official or diffusers config.json) and its checkpoint."""

    config: str = "t2v-1.3B"
    """Architecture: a named config (t2v-1.3B, t2v-14B, i2v-14B, i2v-A14B, tiny, tiny-i2v, tiny-i2v-A14B, ...),
    the path of an official or diffusers config.json, or a diffusers transformer folder (its config.json)."""
    overrides: dict[str, Any] = {}
    """WanConfig fields replacing those of `config` (e.g. {"text_len": 16}); JSON on the command line."""
    path: str = "checkpoints/rCM_Wan2.1_T2V_1.3B_480p.pt"
    """Weights: .pth/.pt/.safetensors file, a sharded safetensors directory or a DCP directory (keys with or
    without a net./net_ema. prefix), official or diffusers (WanTransformer3DModel) key names."""
    low_noise_path: str | None = None
    """Wan2.2 two-expert models: weights of the low-noise expert (same architecture); `path` is then the
    high-noise expert, used while the RF time is >= `boundary`."""


class VAESpec(PipelineConfig):
    """The Wan2.1 VAE."""

    path: str = "checkpoints/Wan2.1_VAE.pth"
    """Weights of the VAE (official Wan2.1_VAE.pth keys)."""
    arch: dict[str, Any] = {}
    """WanVAE constructor arguments replacing the released configuration (tests: {"dim": 4})."""
    dtype: DType = "float32"
    """Compute dtype of the VAE (the official pipeline decodes in float32); auto = the DiT dtype."""
    tiled: bool = False
    """Decode in overlapping spatial tiles (bounded memory for 720p; not bit-exact)."""


class TextEncoderSpec(PipelineConfig):
    """umT5-xxl encoder and its tokenizer."""

    path: str = "checkpoints/models_t5_umt5-xxl-enc-bf16.pth"
    """Weights of the umT5 encoder (official keys)."""
    tokenizer: str = "checkpoints/google/umt5-xxl"
    """Local tokenizer directory (tokenizer.json or spiece.model) or a sentencepiece .model file."""
    arch: dict[str, Any] = {}
    """UMT5Encoder constructor arguments replacing umt5-xxl's (tests: a tiny encoder)."""
    dtype: DType = "auto"
    """Compute dtype of the encoder (auto: bf16 on CUDA, float32 on CPU)."""
    device: Literal["auto", "cpu"] = "auto"
    """Run the encoder on the recipe's device (auto) or on the CPU (slow, saves GPU memory)."""


class CLIPSpec(PipelineConfig):
    """CLIP ViT-H/14 visual tower (Wan2.1 I2V only; Wan2.2 I2V has no image branch)."""

    path: str = "checkpoints/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    """Weights of the whole XLM-RoBERTa CLIP (its visual.* entries are used)."""
    arch: dict[str, Any] = {}
    """CLIPVisual constructor arguments replacing ViT-H/14's (tests: a tiny tower)."""


# ------------------------------------------------------------------------------------------ basics
def require_file(path: str | Path | None, field: str, what: str) -> Path:
    """``Path(path)`` if that file or directory exists, else `MissingFileError` naming ``field``."""
    if path is None or str(path) == "":
        raise MissingFileError(f"{what}: no file given; set --{field}=PATH (a local file: nothing is downloaded)")
    p = Path(path)
    if not p.exists():
        raise MissingFileError(f"{what}: {p} does not exist; set --{field}=PATH to a local file "
                               "(nothing is downloaded)")
    return p


def read_prompts(path: str | Path, field: str = "prompt_file") -> list[str]:
    """The stripped non-empty lines of a UTF-8 text file (one prompt each); raises if there is none."""
    text = require_file(path, field, "prompt file").read_text(encoding="utf-8")
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} has no non-empty line")
    return prompts


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on CUDA, float32 elsewhere (bf16 matmuls are slow on CPUs)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks to the driver (after deleting a model)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ DiT
_EXTRA_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    # Wan2.2 I2V A14B: the 14B T2V network with 36 input channels ([x; y]) and no CLIP branch, so a "t2v"
    # WanDiT whose input the pipeline concatenates (docs/recipes_distill_generate.md, generate.py).
    "i2v-A14B": ("t2v-14B", {"in_dim": 36}),
    "tiny-i2v-A14B": ("tiny", {"in_dim": 36}),
}


def dit_config(spec: DiTSpec) -> WanConfig:
    """The `WanConfig` of ``spec`` (named, extra name, official or diffusers config.json / folder) with its
    overrides (a diffusers config has no text length: 512 unless ``overrides`` sets ``text_len``)."""
    name = spec.config
    if name in _EXTRA_CONFIGS:
        base, extra = _EXTRA_CONFIGS[name]
        return get_config(base, **{**extra, **spec.overrides})
    if name in CONFIG_NAMES:
        return get_config(name, **spec.overrides)
    if name.endswith(".json") or Path(name).is_dir():  # official or diffusers config.json (or its folder)
        return read_config(require_file(name, "dit.config", "DiT config.json"), **spec.overrides)
    names = [*CONFIG_NAMES, *_EXTRA_CONFIGS]
    raise ValueError(f"unknown DiT config {name!r}: use one of {names}, an official or diffusers config.json path "
                     "or a diffusers transformer folder")


def read_dit_state_dict(config: WanConfig, path: str, *, field: str = "model.path",
                        log: Callable[[str], None] | None = print) -> dict[str, Tensor]:
    """The full state dict of the DiT weights at ``path`` (module keys, the file's dtype, CPU; memory-mapped for
    ``.pth``), strictly checked against ``config`` (a ``net.`` / ``net_ema.`` prefix is stripped); ``field``
    names the config field in the error when the file is missing."""
    sd, fmt = read_state_dict(require_file(path, field, "DiT weights"))
    dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    with torch.device("meta"):
        net = WanDiT(config, dtype=dtype)
    report = load_checkpoint(net, sd)
    if log is not None:
        prefix = f", stripped prefix {report.prefix!r}" if report.prefix else ""
        log(f"{field}: {path} ({fmt}, {len(sd)} tensors, {dtype}{prefix})")
    return net.state_dict()


def load_dit(spec: DiTSpec, device: torch.device, dtype: torch.dtype, *, path: str | None = None,
             field: str = "dit.path") -> WanDiT:
    """Build the DiT of ``spec`` on ``meta`` and assign the weights of ``path`` (default ``spec.path``)
    onto ``device`` in ``dtype`` (strict keys). Returns it in eval mode without gradients."""
    file = require_file(path if path is not None else spec.path, field, "DiT weights")
    with torch.device("meta"):
        net = WanDiT(dit_config(spec))
    load_checkpoint(net, file, device=device, dtype=dtype)
    return net.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ VAE / CLIP
def load_vae(spec: VAESpec, device: torch.device, dtype: torch.dtype, *, field: str = "vae.path") -> WanVAE:
    """The VAE of ``spec`` on ``device`` (its own ``dtype`` unless ``auto``, which takes ``dtype``)."""
    file = require_file(spec.path, field, "VAE weights")
    vdtype = dtype if spec.dtype == "auto" else parse_dtype(spec.dtype)
    with torch.device("meta"):
        vae = WanVAE(**spec.arch)
    load_checkpoint(vae, file, device=device, dtype=vdtype)
    return vae.eval().requires_grad_(False)


def load_clip(spec: CLIPSpec, device: torch.device, dtype: torch.dtype, *, field: str = "clip.path") -> CLIPVisual:
    """The CLIP visual tower from a whole-CLIP checkpoint (its ``visual.*`` entries)."""
    file = require_file(spec.path, field, "CLIP weights")
    sd, _ = read_state_dict(file)
    with torch.device("meta"):
        clip = CLIPVisual(**spec.arch)
    load_checkpoint(clip, visual_state_dict(sd), device=device, dtype=dtype)
    return clip.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------ text
class TextEncoder:
    """Tokenizer + umT5 encoder: ``encoder(prompts) -> [N, text_len, dim]`` on the CPU (rows past each
    prompt are zero, as the rCM pipeline feeds the DiT). :meth:`free` deletes the network."""

    def __init__(self, spec: TextEncoderSpec, *, text_len: int, device: torch.device, field: str = "text_encoder"):
        tok_path = require_file(spec.tokenizer, f"{field}.tokenizer", "umT5 tokenizer")
        file = require_file(spec.path, f"{field}.path", "umT5 encoder weights")
        self.device = torch.device("cpu") if spec.device == "cpu" else device
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.tokenizer = Tokenizer(tok_path, max_length=text_len)
        with torch.device("meta"):
            encoder = UMT5Encoder(**spec.arch)
        load_checkpoint(encoder, file, device=self.device, dtype=self.dtype)
        self.encoder: UMT5Encoder | None = encoder.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], *, batch_size: int = 8) -> Tensor:
        if self.encoder is None:
            raise RuntimeError("the text encoder was freed")
        out = []
        for i in range(0, len(prompts), batch_size):
            ids, mask = self.tokenizer(list(prompts[i : i + batch_size]))
            out.append(self.encoder(ids.to(self.device), mask.to(self.device)).cpu())
        return torch.cat(out)

    def free(self) -> None:
        """Delete the encoder and return its memory (the tokenizer stays)."""
        self.encoder = None
        free_memory()


def load_embedding(path: str | Path, field: str, *, text_len: int | None = None) -> Tensor:
    """A stored text embedding ``[L, D]`` (e.g. ``umT5_wan_negative_emb.pt``; ``[1, L, D]`` is squeezed),
    zero-padded or checked to ``text_len`` rows."""
    file = require_file(path, field, "text embedding")
    emb = torch.load(file, map_location="cpu", weights_only=True)
    if isinstance(emb, dict) and len(emb) == 1:
        emb = next(iter(emb.values()))
    if not isinstance(emb, Tensor):
        raise ValueError(f"{file} (--{field}) must hold one tensor [L, D], got {type(emb).__name__}")
    if emb.dim() == 3 and emb.shape[0] == 1:
        emb = emb[0]
    if emb.dim() != 2:
        raise ValueError(f"{file} (--{field}) must hold an embedding [L, D], got shape {tuple(emb.shape)}")
    if text_len is not None:
        if emb.shape[0] > text_len:
            if emb[text_len:].abs().sum() != 0:
                raise ValueError(f"{file} (--{field}) has {emb.shape[0]} non-zero rows > text_len {text_len}")
            emb = emb[:text_len]
        emb = torch.nn.functional.pad(emb, (0, 0, 0, text_len - emb.shape[0]))
    return emb
