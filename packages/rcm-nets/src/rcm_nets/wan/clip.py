"""CLIP ViT-H/14 visual tower of ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (docs/nets_encoders.md, CLIP).

Wan2.1 I2V conditions on the output of all blocks but the last (no post-norm, no head):
``clip_fea [B, 257, 1280]`` for a 224×224 image. Layout legend: ``b`` batch, ``l`` tokens (CLS first, then
patches row-major), ``c`` width. The module's keys are the tower's own (the checkpoint stores them under
``visual.``; :func:`visual_state_dict` extracts and strips them). ``head`` and ``post_norm`` exist only so that
the released weights load strictly; they are not used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["CLIPVisual", "visual_state_dict", "CLIP_MEAN", "CLIP_STD"]

# OpenAI CLIP pixel statistics (after mapping the image to [0, 1]).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def visual_state_dict(state_dict: Mapping[str, Tensor], prefix: str = "visual.") -> dict[str, Tensor]:
    """The ``visual.*`` entries of a whole-CLIP state dict, with the prefix removed (textual keys dropped)."""
    out = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no key starts with {prefix!r}; is this the XLM-RoBERTa CLIP checkpoint?")
    return out


class _LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, result cast back to the input dtype (as the reference does)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class _QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)  # output ordered [q | k | v], head-major inside each
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_blc: Tensor) -> Tensor:
        qkv = rearrange(self.to_qkv(x_blc), "b l (three n d) -> three b n l d", three=3, n=self.num_heads)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale 1/sqrt(d), no mask
        return self.proj(rearrange(y, "b n l d -> b l (n d)"))


class _Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(norm1 x)``, ``x + mlp(norm2 x)``."""

    def __init__(self, dim: int, mlp_ratio: float, num_heads: int, activation: str, eps: float):
        super().__init__()
        self.norm1 = _LayerNorm(dim, eps=eps)
        self.attn = _SelfAttention(dim, num_heads)
        self.norm2 = _LayerNorm(dim, eps=eps)
        act = nn.GELU() if activation == "gelu" else _QuickGELU()
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), act, nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x_blc: Tensor) -> Tensor:
        x_blc = x_blc + self.attn(self.norm1(x_blc))
        return x_blc + self.mlp(self.norm2(x_blc))


class CLIPVisual(nn.Module):
    """The CLIP vision transformer; defaults are the ViT-H/14 tower Wan2.1 I2V uses.

    Constructor arguments use the official ``VisionTransformer`` names; only ``pool_type='token'`` and
    ``post_norm=False`` (the Wan2.1 checkpoint) are supported. Dropout arguments are accepted for
    compatibility and must be 0 (inference only).
    """

    def __init__(self, image_size: int = 224, patch_size: int = 14, dim: int = 1280, mlp_ratio: float = 4,
                 out_dim: int = 1024, num_heads: int = 16, num_layers: int = 32, pool_type: str = "token",
                 pre_norm: bool = True, post_norm: bool = False, activation: str = "gelu",
                 attn_dropout: float = 0.0, proj_dropout: float = 0.0, embedding_dropout: float = 0.0,
                 norm_eps: float = 1e-5):
        super().__init__()
        if pool_type != "token" or post_norm:
            raise ValueError(f"CLIPVisual supports pool_type='token', post_norm=False (Wan2.1); got "
                             f"pool_type={pool_type!r}, post_norm={post_norm}")
        if activation not in ("gelu", "quick_gelu"):
            raise ValueError(f"activation must be 'gelu' or 'quick_gelu', got {activation!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be divisible by patch_size={patch_size}")
        if attn_dropout or proj_dropout or embedding_dropout:
            raise ValueError("CLIPVisual is inference-only: dropout rates must be 0")
        self.image_size, self.patch_size = image_size, patch_size
        num_patches = (image_size // patch_size) ** 2
        # no bias when a pre-norm follows (official layout)
        self.patch_embedding = nn.Conv2d(3, dim, patch_size, stride=patch_size, bias=not pre_norm)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.pre_norm = _LayerNorm(dim, eps=norm_eps) if pre_norm else None
        self.transformer = nn.Sequential(
            *(_Block(dim, mlp_ratio, num_heads, activation, norm_eps) for _ in range(num_layers))
        )
        self.post_norm = _LayerNorm(dim, eps=norm_eps)  # unused; present in the checkpoint
        self.head = nn.Parameter(torch.zeros(dim, out_dim))  # unused; present in the checkpoint

    def preprocess(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        """Images in [-1, 1] → CLIP pixels ``[B, 3, S, S]`` (S = ``image_size``), float32.

        ``images`` is ``[B, 3, H, W]`` or a list of ``[3, H, W]`` images of any sizes. Each is resized to
        ``S × S`` (bicubic, ``align_corners=False``, no antialias; the aspect ratio is not kept), mapped to
        [0, 1] with ``x·0.5 + 0.5`` and normalized with the OpenAI CLIP mean / std.
        """
        batch = [images] if isinstance(images, Tensor) else [im.unsqueeze(0) for im in images]
        resized = []
        for im in batch:
            if im.ndim != 4 or im.shape[1] != 3:
                raise ValueError(f"CLIPVisual.preprocess: expected RGB images [B, 3, H, W] or [3, H, W], "
                                 f"got shape {tuple(im.shape)}")
            size = (self.image_size, self.image_size)
            resized.append(F.interpolate(im.float(), size=size, mode="bicubic", align_corners=False))
        x = torch.cat(resized).mul(0.5).add(0.5)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, pixels: Tensor) -> Tensor:
        """Penultimate-block features of preprocessed ``pixels [B, 3, S, S]``: ``[B, 1 + (S/14)², dim]``.

        This is the output of all transformer blocks but the last (no post-norm, no head), in the
        parameters' dtype: ``clip_fea`` of the Wan2.1 I2V DiT.
        """
        s = self.image_size
        if pixels.ndim != 4 or pixels.shape[1:] != (3, s, s):
            raise ValueError(f"CLIPVisual: pixels must be [B, 3, {s}, {s}] (use preprocess()), got "
                             f"{tuple(pixels.shape)}")
        w = self.patch_embedding.weight
        x = rearrange(self.patch_embedding(pixels.to(w.dtype)), "b c h w -> b (h w) c")
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embedding.to(x.dtype)
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.transformer[:-1]:
            x = block(x)
        return x

    def encode_images(self, images: Tensor | Sequence[Tensor]) -> Tensor:
        """``forward(preprocess(images))``: images in [-1, 1] → ``clip_fea [B, 257, 1280]`` (ViT-H/14)."""
        return self(self.preprocess(images).to(self.patch_embedding.weight.device))
