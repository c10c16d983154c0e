"""Building blocks of the Wan2.1 causal 3D VAE (docs/nets_encoders.md, VAE), with the streaming feature cache.

Layout legend: ``b`` batch, ``c`` channels, ``t`` frames, ``h``/``w`` rows/columns; video tensors are
``[b, c, t, h, w]``.

Every block takes ``cache``: ``None`` runs the whole sequence at once (the "equivalent full-sequence view" of
docs/nets_encoders.md, VAE); a dict (initially empty, one per encode/decode call) runs chunk by chunk: each causal conv
keeps the last frames of its input under its own module key and prepends them to the next chunk instead of
zero padding, and the temporal resamplers keep their first-frame state there. Both views give the same
result; the chunked one bounds the activation memory to one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

Cache = dict[nn.Module, object]


class CausalConv3d(nn.Conv3d):
    """3D conv, symmetric zero padding in space and ``2·p_t`` zero frames in front (none at the back).

    ``padding=(p_t, p_h, p_w)`` is the official constructor argument; the conv itself runs unpadded on an
    explicitly padded input. With a cache, the frames remembered from the previous chunk replace as many of
    the front zero frames.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        self.front = 2 * pt  # number of causal front frames
        self.spatial = (pw, pw, ph, ph)
        # fast path (vae_fast): zero-pad h, w inside the convolution instead of materializing a padded copy
        self.pad_in_conv = False

    def forward(self, x_bcthw: Tensor, cache: Cache | None = None) -> Tensor:
        front = self.front
        if front > 0 and cache is not None:
            prev = cache.get(self)
            if prev is not None:
                x_bcthw = torch.cat([prev, x_bcthw], dim=2)
                front -= prev.shape[2]
            # clone: keep only the remembered frames alive, not the whole chunk
            cache[self] = x_bcthw[:, :, -self.front :].clone()
        if self.pad_in_conv:
            if front > 0:
                x_bcthw = F.pad(x_bcthw, (0, 0, 0, 0, front, 0))
            return F.conv3d(x_bcthw, self.weight, self.bias, self.stride, (0, self.spatial[2], self.spatial[0]))
        x_bcthw = F.pad(x_bcthw, (*self.spatial, front, 0))
        return super().forward(x_bcthw)


class RMSNorm(nn.Module):
    """Wan VAE ``RMS_norm``: L2-normalize over channels (floor 1e-12), times ``sqrt(C)·gamma``, no bias.

    ``images=False`` gives ``gamma [C,1,1,1]`` (5-D inputs), ``images=True`` gives ``gamma [C,1,1]``.
    """

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """``residual`` = [RMSNorm, SiLU, conv3³, RMSNorm, SiLU, Dropout, conv3³]; ``shortcut`` a 1³ conv if needed."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x_bcthw: Tensor, cache: Cache | None = None) -> Tensor:
        h = self.shortcut(x_bcthw)
        for layer in self.residual:
            x_bcthw = layer(x_bcthw, cache) if isinstance(layer, CausalConv3d) else layer(x_bcthw)
        return x_bcthw + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the ``h·w`` positions of each frame (scale ``1/sqrt(C)``), residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x_bcthw: Tensor, cache: Cache | None = None) -> Tensor:
        b, c, t, h, w = x_bcthw.shape
        x = rearrange(x_bcthw, "b c t h w -> (b t) c h w")
        qkv = rearrange(self.to_qkv(self.norm(x)), "n (three c) h w -> three n 1 (h w) c", three=3)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [(b t), 1, h·w, c]
        y = self.proj(rearrange(y, "n 1 (h w) c -> n c h w", h=h, w=w))
        return x_bcthw + rearrange(y, "(b t) c h w -> b c t h w", b=b, t=t)


def _per_frame(fn, x_bcthw: Tensor) -> Tensor:
    b = x_bcthw.shape[0]
    y = fn(rearrange(x_bcthw, "b c t h w -> (b t) c h w"))
    return rearrange(y, "(b t) c h w -> b c t h w", b=b)


class Resample(nn.Module):
    """Spatial (and temporal) down/up-sampling: ``mode`` in upsample2d/3d, downsample2d/3d.

    Spatial step (per frame, ``resample.1``): up = nearest ×2 then 3×3 conv ``C → C/2``; down = pad right and
    bottom by 1 then 3×3 conv stride 2. Temporal step (``time_conv``, first-frame rules of docs/nets_encoders.md, VAE):
    downsample3d (after the spatial step) gives ``[s0] ++ conv_valid_stride2(s)``; upsample3d (before it)
    gives ``[w0] ++ interleave(conv_causal(w1..))`` where frame 0 is not part of the later frames' context.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=0)

    def forward(self, x_bcthw: Tensor, cache: Cache | None = None) -> Tensor:
        if self.mode == "upsample3d":
            x_bcthw = self._time_up(x_bcthw, cache)
        x_bcthw = _per_frame(self.resample, x_bcthw)
        if self.mode == "downsample3d":
            x_bcthw = self._time_down(x_bcthw, cache)
        return x_bcthw

    def _time_up(self, x: Tensor, cache: Cache | None) -> Tensor:
        if cache is None:
            first, rest = x[:, :, :1], x[:, :, 1:]
        elif self not in cache:  # first chunk: passes through; later chunks start from zero padding
            cache[self] = True
            return x
        else:
            first, rest = x[:, :, :0], x
        if rest.shape[2] == 0:
            return first
        y = self.time_conv(rest, cache)  # [b, 2c, t, h, w]: channels [0,c) even frames, [c,2c) odd frames
        return torch.cat([first, rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2)], dim=2)

    def _time_down(self, x: Tensor, cache: Cache | None) -> Tensor:
        if cache is None:
            if x.shape[2] < 3:
                return x[:, :, :1]
            return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        prev = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if prev is None:  # first chunk: frame 0 passes through with no temporal conv
            return x
        return self.time_conv(torch.cat([prev, x], dim=2))
