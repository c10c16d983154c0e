"""Wan2.1 causal 3D VAE (``Wan2.1_VAE.pth``): chunked encode / decode with a feature cache, tiled decode.

Layout legend: video ``[B, 3, T, H, W]`` in [-1, 1]; latent ``[B, z_dim, T_lat, H/8, W/8]``, normalized per
channel with the Wan2.1 constants. ``T = 1 + 4k`` frames give ``T_lat = 1 + k`` latent frames and back.

What the official code computes is described in docs/nets_encoders.md, VAE; the state-dict keys are the official ones
(``encoder.*``, ``conv1.*``, ``conv2.*``, ``decoder.*``), and the latent statistics are non-persistent buffers
so that strict loading of the released file works unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._vae_blocks import AttentionBlock, Cache, CausalConv3d, Resample, ResidualBlock, RMSNorm
from .vae_fast import VAEDecodeOptions, shared_fast_decode

__all__ = ["WanVAE", "StreamingDecoder", "VAEDecodeOptions", "WAN21_LATENT_MEAN", "WAN21_LATENT_STD"]

# Per-channel statistics of the Wan2.1 latent space (wan/modules/vae.py, configs.json "pipeline").
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def _run(layers: nn.ModuleList | nn.Sequential, x: Tensor, cache: Cache | None) -> Tensor:
    for layer in layers:
        takes_cache = isinstance(layer, CausalConv3d | ResidualBlock | AttentionBlock | Resample)
        x = layer(x, cache) if takes_cache else layer(x)
    return x


class _Encoder3d(nn.Module):
    """conv1 → [RB × num_res_blocks (+attn), Resample] per level → middle (RB, attn, RB) → head."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 attn_scales: Sequence[float], temperal_downsample: Sequence[bool], dropout: float):
        super().__init__()
        dims = [dim * u for u in (1, *dim_mult)]
        scale = 1.0
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        out = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(out, out, dropout), AttentionBlock(out),
                                    ResidualBlock(out, out, dropout))
        self.head = nn.Sequential(RMSNorm(out), nn.SiLU(), CausalConv3d(out, z_dim, 3, padding=1))

    def forward(self, x_bcthw: Tensor, cache: Cache | None = None) -> Tensor:
        x = self.conv1(x_bcthw, cache)
        for part in (self.downsamples, self.middle, self.head):
            x = _run(part, x, cache)
        return x


class _Decoder3d(nn.Module):
    """conv1 → middle → [RB × (num_res_blocks+1) (+attn), Resample] per level → head (to 3 channels)."""

    def __init__(self, dim: int, z_dim: int, dim_mult: Sequence[int], num_res_blocks: int,
                 attn_scales: Sequence[float], temperal_upsample: Sequence[bool], dropout: float):
        super().__init__()
        dims = [dim * u for u in (dim_mult[-1], *reversed(dim_mult))]
        scale = 1.0 / 2 ** (len(dim_mult) - 2)
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0], dropout), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0], dropout))
        layers: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # every level after the first follows a Resample, which halves the channels
                in_dim //= 2
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                if scale in attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, z_bcthw: Tensor, cache: Cache | None = None) -> Tensor:
        x = self.conv1(z_bcthw, cache)
        for part in (self.middle, self.upsamples, self.head):
            x = _run(part, x, cache)
        return x


def _edge_weight(n: int, lo: int, hi: int) -> Tensor:
    """1-D blend weight of a tile of ``n`` pixels sharing ``lo`` / ``hi`` pixels with its neighbours.

    Over a shared span of ``S`` pixels the weight is 0 on the outer quarter (the tile's zero-padded border,
    least like the untiled result), a linear ramp over the middle half, and 1 beyond; the neighbour's weight
    is the mirror image, so the two sum to 1 across the span.
    """
    u = torch.arange(n, dtype=torch.float64) + 0.5
    w = torch.ones(n, dtype=torch.float64)
    if lo > 0:
        w = torch.minimum(w, ((u - lo / 4) / (lo / 2)).clamp(0, 1))
    if hi > 0:
        w = torch.minimum(w, ((n - u - hi / 4) / (hi / 2)).clamp(0, 1))
    return w


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced starts of the fewest tiles of size ``tile`` covering ``n`` with ``>= overlap`` shared."""
    if n <= tile:
        return [0]
    m = math.ceil((n - overlap) / (tile - overlap))
    return [round(i * (n - tile) / (m - 1)) for i in range(m)]


class WanVAE(nn.Module):
    """The Wan2.1 video VAE (official ``WanVAE_``) with normalized latents.

    Constructor arguments use the official names (``temperal_*`` is the official spelling); the defaults are
    the released ``Wan2.1_VAE.pth`` configuration (not the official class defaults). ``latent_mean`` /
    ``latent_std`` default to the Wan2.1 constants; they are plain attributes (no state-dict keys).

    ``encode`` runs frame 0 alone and then chunks of 4 frames through the encoder with a causal feature
    cache; ``decode`` runs one latent frame at a time. Both compute in the parameters' dtype.
    """

    def __init__(self, dim: int = 96, z_dim: int = 16, dim_mult: Sequence[int] = (1, 2, 4, 4),
                 num_res_blocks: int = 2, attn_scales: Sequence[float] = (),
                 temperal_downsample: Sequence[bool] = (False, True, True), dropout: float = 0.0,
                 latent_mean: Sequence[float] | Tensor | None = None,
                 latent_std: Sequence[float] | Tensor | None = None):
        super().__init__()
        if len(temperal_downsample) != len(dim_mult) - 1:
            raise ValueError(f"temperal_downsample needs len(dim_mult) - 1 = {len(dim_mult) - 1} entries, "
                             f"got {len(temperal_downsample)}")
        self.z_dim = z_dim
        self.spatial_factor = 2 ** (len(dim_mult) - 1)
        self.temporal_factor = 2 ** sum(bool(d) for d in temperal_downsample)
        self.encoder = _Encoder3d(dim, z_dim * 2, dim_mult, num_res_blocks, attn_scales,
                                  temperal_downsample, dropout)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = _Decoder3d(dim, z_dim, dim_mult, num_res_blocks, attn_scales,
                                  list(reversed(temperal_downsample)), dropout)
        mean = [float(v) for v in (WAN21_LATENT_MEAN if latent_mean is None else latent_mean)]
        std = [float(v) for v in (WAN21_LATENT_STD if latent_std is None else latent_std)]
        if len(mean) != z_dim or len(std) != z_dim:
            raise ValueError(f"latent_mean / latent_std must have z_dim={z_dim} entries, got {len(mean)} / {len(std)}")
        # Plain attributes, not buffers: no state-dict keys, and nothing left on `meta` after a meta build.
        self.latent_mean, self.latent_std = tuple(mean), tuple(std)

    def _latent_stats(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(mean, 1/std)`` as float32 ``[1, z, 1, 1, 1]``; like the reference we keep and divide by 1/std."""
        mean = torch.tensor(self.latent_mean, dtype=torch.float32, device=device)
        inv_std = 1.0 / torch.tensor(self.latent_std, dtype=torch.float32, device=device)
        return mean.view(1, -1, 1, 1, 1), inv_std.view(1, -1, 1, 1, 1)

    # ----------------------------------------------------------------------------------------- checks
    def _check_video(self, video: Tensor) -> None:
        if video.ndim != 5:
            raise ValueError(f"WanVAE.encode: video must be [B, 3, T, H, W], got shape {tuple(video.shape)}")
        _, c, t, h, w = video.shape
        if c != 3:
            raise ValueError(f"WanVAE.encode: video must have 3 channels (RGB), got {c} channels "
                             f"(shape {tuple(video.shape)})")
        k = self.temporal_factor
        if t < 1 or (t - 1) % k:
            raise ValueError(f"WanVAE.encode: frame count must be 1 + {k}·n, got T={t} "
                             f"(nearest valid: {1 + (max(t, 1) - 1) // k * k})")
        s = self.spatial_factor
        if h % s or w % s:
            raise ValueError(f"WanVAE.encode: height and width must be divisible by {s}, got H={h}, W={w}")

    def _check_latent(self, latent: Tensor) -> None:
        if latent.ndim != 5 or latent.shape[1] != self.z_dim:
            raise ValueError(f"WanVAE.decode: latent must be [B, {self.z_dim}, T, H, W] ({self.z_dim} "
                             f"channels), got shape {tuple(latent.shape)}")
        if latent.shape[2] < 1:
            raise ValueError("WanVAE.decode: latent has no frames")

    # ------------------------------------------------------------------------------------ public API
    def num_latent_frames(self, frames: int) -> int:
        """Latent frames for ``frames`` pixel frames: ``1 + (frames − 1) / 4``."""
        return 1 + (frames - 1) // self.temporal_factor

    def num_pixel_frames(self, latent_frames: int) -> int:
        """Pixel frames decoded from ``latent_frames``: ``1 + 4 (latent_frames − 1)``."""
        return 1 + self.temporal_factor * (latent_frames - 1)

    def encode(self, video: Tensor, *, chunked: bool = True) -> Tensor:
        """Encode ``video [B, 3, 1+4k, H, W]`` in [-1, 1] to the normalized latent ``[B, 16, 1+k, H/8, W/8]``.

        ``chunked`` (default) runs frame 0, then chunks of 4 frames, with the causal feature cache (bounded
        memory); ``chunked=False`` runs the whole sequence at once (same result up to float rounding).
        Returns the posterior mean only (no sampling), in ``video.dtype``.
        """
        self._check_video(video)
        p = next(self.parameters())
        x = video.to(device=p.device, dtype=p.dtype)
        if chunked:
            cache: Cache = {}
            k = self.temporal_factor
            chunks = [x[:, :, :1]] + [x[:, :, i : i + k] for i in range(1, x.shape[2], k)]
            h = torch.cat([self.encoder(c, cache) for c in chunks], dim=2)
        else:
            h = self.encoder(x)
        mu = self.conv1(h)[:, : self.z_dim].float()
        mean, inv_std = self._latent_stats(mu.device)
        return ((mu - mean) * inv_std).to(video.dtype)

    def decode(self, latent: Tensor, *, clamp: bool = True, tiled: bool = False,
               tile_size: int | tuple[int, int] = 32, tile_overlap: int | tuple[int, int] = 8,
               chunked: bool = True) -> Tensor:
        """Decode a normalized latent ``[B, 16, T, h, w]`` to video ``[B, 3, 1+4(T−1), 8h, 8w]``.

        ``clamp`` clips to [-1, 1] as the official wrapper does. ``tiled`` decodes overlapping spatial tiles
        of ``tile_size`` latent pixels (sharing at least ``tile_overlap`` latent pixels with each neighbour) and
        blends them: across a shared span a tile's weight is 0 on the outer quarter, ramps linearly over the
        middle half, and the neighbour's weight is the complement. Peak memory then scales with the tile,
        not the frame. Tiles see zero padding at their borders and the middle attention block sees one tile
        only, so the tiled output differs slightly from the untiled one.
        ``chunked`` (default) decodes one latent frame at a time with the causal feature cache.
        """
        self._check_latent(latent)
        if tiled:
            out = self._decode_tiled(latent, _pair(tile_size), _pair(tile_overlap), chunked)
        else:
            out = self._decode(latent, chunked)
        return (out.clamp(-1.0, 1.0) if clamp else out).to(latent.dtype)

    def encode_image_condition(self, image: Tensor, num_frames: int,
                               size: tuple[int, int] | None = None) -> Tensor:
        """Wan2.1 I2V conditioning ``y [B, 4 + 16, T_lat, H/8, W/8]`` from a first-frame image (docs/nets.md).

        ``image [B, 3, H, W]`` in [-1, 1] (resized bicubically to ``size = (H, W)`` first when given). The
        latent part encodes the video ``[image, 0, …, 0]`` of ``num_frames = 1 + 4k`` frames; the 4 mask
        channels, which come first, are 1 on latent frame 0 and 0 elsewhere.
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"encode_image_condition: image must be [B, 3, H, W], got {tuple(image.shape)}")
        if size is not None:
            image = F.interpolate(image.float(), size=tuple(size), mode="bicubic", align_corners=False)
        b, _, h, w = image.shape
        video = torch.cat([image[:, :, None], image.new_zeros(b, 3, num_frames - 1, h, w)], dim=2)
        latent = self.encode(video)
        mask = torch.zeros_like(latent[:, :4])
        mask[:, :, 0] = 1.0
        return torch.cat([mask, latent], dim=1)

    # ------------------------------------------------------------------------------------- internals
    def _decode(self, latent: Tensor, chunked: bool, cache: Cache | None = None) -> Tensor:
        """Unclamped decode; ``cache`` (chunked only) continues a previous call's causal feature cache."""
        p = next(self.parameters())
        mean, inv_std = self._latent_stats(p.device)
        z = (latent.to(p.device).float() / inv_std + mean).to(p.dtype)
        z = self.conv2(z)
        if not chunked:
            return self.decoder(z)
        cache = {} if cache is None else cache
        return torch.cat([self.decoder(z[:, :, i : i + 1], cache) for i in range(z.shape[2])], dim=2)

    def _decode_tiled(self, latent: Tensor, tile: tuple[int, int], overlap: tuple[int, int],
                      chunked: bool) -> Tensor:
        b, _, _, h, w = latent.shape
        s = self.spatial_factor
        if any(n < 1 or o < 0 or 2 * o > n for o, n in zip(overlap, tile)):
            raise ValueError(f"tile_size {tile} must be >= 1 and tile_overlap {overlap} between 0 and half of it")
        out = weight = None
        rows, cols = _tile_starts(h, tile[0], overlap[0]), _tile_starts(w, tile[1], overlap[1])
        for r in rows:
            for c in cols:
                th, tw = min(tile[0], h), min(tile[1], w)
                y = self._decode(latent[:, :, :, r : r + th, c : c + tw], chunked)
                # blend only across edges shared with a neighbouring tile (spans in pixels)
                wr = _edge_weight(th * s, _shared(rows, r, th, lo=True) * s, _shared(rows, r, th, lo=False) * s)
                wc = _edge_weight(tw * s, _shared(cols, c, tw, lo=True) * s, _shared(cols, c, tw, lo=False) * s)
                wt = (wr[:, None] * wc[None, :]).to(device=y.device, dtype=torch.float32)
                if out is None:
                    out = y.new_zeros(b, 3, y.shape[2], h * s, w * s, dtype=torch.float32)
                    weight = torch.zeros(h * s, w * s, dtype=torch.float32, device=y.device)
                out[..., r * s : (r + th) * s, c * s : (c + tw) * s] += y.float() * wt
                weight[r * s : (r + th) * s, c * s : (c + tw) * s] += wt
        return out / weight


def _shared(starts: list[int], start: int, size: int, *, lo: bool) -> int:
    """Rows this tile shares with its lower (``lo``) or upper neighbour in ``starts``."""
    i = starts.index(start)
    if lo:
        return 0 if i == 0 else starts[i - 1] + size - start
    return 0 if i == len(starts) - 1 else start + size - starts[i + 1]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class StreamingDecoder:
    """Decode latent blocks as they arrive, carrying the VAE's causal feature cache from call to call.

    Calling it on consecutive blocks ``[B, 16, n, h, w]`` returns ``[B, 3, f, 8h, 8w]`` float32 in [-1, 1] with
    ``f = 1 + 4(n − 1)`` for the first block and ``4n`` afterwards; the concatenation equals
    :meth:`WanVAE.decode` of the whole latent video (the same per-frame chunked decode, the same cache).
    ``vae=None`` is the pixel-space case (tiny models generating RGB directly): frames are the latents, clamped.

    ``options`` (:class:`~rcm_nets.wan.vae_fast.VAEDecodeOptions`) turns on the fast path: compute dtype,
    channels-last, padding inside the convs, whole-block steps, cuDNN benchmark, fused RMS-norm + SiLU,
    compile, CUDA graphs (docs/nets.md, "VAE streaming decode: fast path"). ``None`` (default) is the
    reference decode; decoders of the same VAE and options share the converted copy, compiled steps and CUDA
    graphs (``vae_fast.shared_fast_decode``). ``clamp=False`` returns the raw decoder output.
    """

    def __init__(self, vae: WanVAE | None = None, options: VAEDecodeOptions | None = None, *, clamp: bool = True):
        self.vae, self.options, self.clamp = vae, options, clamp
        self._fast = shared_fast_decode(vae, options) if vae is not None and options is not None else None
        self.reset()

    def reset(self) -> None:
        """Start a new video (empty feature cache; compiled steps and CUDA graphs are kept)."""
        self._cache: Cache = {}
        self.frames_in = 0

    @torch.no_grad()
    def __call__(self, latent_bcthw: Tensor) -> Tensor:
        self.frames_in += latent_bcthw.shape[2]
        if self.vae is None:
            return latent_bcthw.float().clamp(-1, 1)
        self.vae._check_latent(latent_bcthw)
        if self._fast is not None:
            out = self._fast(latent_bcthw, self._cache)
        else:
            out = self.vae._decode(latent_bcthw, chunked=True, cache=self._cache)
        return (out.clamp(-1.0, 1.0) if self.clamp else out).float()
