"""Symmetric int8 / fp8 (e4m3) / int4 quantization for the KV cache, in plain torch (any device).

Layout legend: B batch, F frames, T tokens per frame, L tokens, H heads, D head dim.

Granularity (KIVI-style, docs/kv_cache.md):
* keys: one scale per (batch, frame, head, channel), the absolute max over the frame's T tokens. Key
  channels differ in magnitude by up to ~10x (RoPE pairs, a few outlier channels); a per-channel scale keeps
  small channels from being rounded to zero. The group is one frame because frames are the unit that the
  cache writes and evicts, so a frame's scales live and die with its data.
* values: one scale per (batch, token, head), the absolute max over D.

Round trip: ``x ≈ q · scale`` with ``scale = amax / qmax`` (int8: qmax 127, round to nearest, so the error
is at most ``scale / 2``; fp8 e4m3: qmax 448, 3 mantissa bits, so the error is at most ``2⁻⁴·|x|`` for normal
numbers and ``2⁻¹⁰·scale`` in the subnormal range). Scales are float32. Quantization runs once per written
block, so it stays in torch; what must not be materialized is the dequantized cache, which the attention
kernel (``attention/cache_attention.py``) avoids by dequantizing tile by tile.

int4 (two codes per byte, group-wise scales) and per-channel key smoothing for int8/fp8: see the sections
below and docs/kv_cache.md.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["QuantFormat", "Quantized", "QMAX", "INT4_QMAX", "storage_dtype", "quantize", "dequantize",
           "quantize_keys", "quantize_values", "dequantize_keys", "dequantize_values", "pack_int4", "unpack_int4",
           "value_groups", "quantize_int4_keys", "dequantize_int4_keys", "quantize_int4_values",
           "dequantize_int4_values", "smoothing_factors", "quantize_keys_smoothed"]

QuantFormat = Literal["int8", "fp8"]
QMAX: dict[str, float] = {"int8": 127.0, "fp8": 448.0}
_STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_TINY = 1e-30  # floor for an all-zero group's amax: its codes are all 0 and dequantize to 0 exactly


class Quantized(NamedTuple):
    data: Tensor  # int8 or float8_e4m3fn, shape of the input
    scale: Tensor  # float32, the input's shape with the reduced dims kept as size 1


def storage_dtype(fmt: QuantFormat) -> torch.dtype:
    """The torch dtype that holds codes of ``fmt``."""
    if fmt not in _STORAGE:
        raise ValueError(f"unknown quantization format {fmt!r}; expected one of {sorted(_STORAGE)}")
    return _STORAGE[fmt]


def quantize(x: Tensor, fmt: QuantFormat, dim: int | tuple[int, ...]) -> Quantized:
    """Symmetric absmax quantization of ``x`` with one float32 scale per slice reduced over ``dim``."""
    dtype = storage_dtype(fmt)
    xf = x.float()
    scale = xf.abs().amax(dim=dim, keepdim=True).clamp_min(_TINY) / QMAX[fmt]
    y = (xf / scale).clamp(-QMAX[fmt], QMAX[fmt])
    if fmt == "int8":
        y = y.round()
    return Quantized(y.to(dtype), scale)


def dequantize(q: Quantized | tuple[Tensor, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
    """``data · scale`` in ``dtype`` (the product is formed in float32)."""
    data, scale = q
    return (data.float() * scale).to(dtype)


def quantize_keys(k_bfthd: Tensor, fmt: QuantFormat) -> Quantized:
    """Keys ``[B, F, T, H, D]`` -> codes of the same shape and per-channel scales ``[B, F, H, D]``."""
    if k_bfthd.dim() != 5:
        raise ValueError(f"quantize_keys expects [B, F, T, H, D], got {tuple(k_bfthd.shape)}")
    data, scale = quantize(k_bfthd, fmt, dim=2)
    return Quantized(data, scale.squeeze(2))


def quantize_values(v_blhd: Tensor, fmt: QuantFormat) -> Quantized:
    """Values ``[B, L, H, D]`` -> codes of the same shape and per-token scales ``[B, L, H]``."""
    if v_blhd.dim() != 4:
        raise ValueError(f"quantize_values expects [B, L, H, D], got {tuple(v_blhd.shape)}")
    data, scale = quantize(v_blhd, fmt, dim=3)
    return Quantized(data, scale.squeeze(3))


def dequantize_keys(data_bfthd: Tensor, scale_bfhd: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_keys`: ``[B, F, T, H, D]`` in ``dtype``."""
    return dequantize((data_bfthd, scale_bfhd.unsqueeze(2)), dtype)


def dequantize_values(data_blhd: Tensor, scale_blh: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_values`: ``[B, L, H, D]`` in ``dtype``."""
    return dequantize((data_blhd, scale_blh.unsqueeze(3)), dtype)


# ---------------------------------------------------------------------------------------------------- int4
# Symmetric int4: codes in [-7, 7] (qmax 7, round to nearest, |x - x̂| <= scale/2), two codes per byte along
# the channel dim D: byte i holds channel 2i in its low nibble and channel 2i+1 in its high nibble (two's
# complement nibbles), so a pre-RoPE key's rotation pair (2i, 2i+1) shares one byte.
# Groups (``group_size`` G, KIVI-style): keys, one scale per (batch, frame, G consecutive tokens of the frame,
# head, channel); values, one scale per (batch, token, head, G consecutive channels).

INT4_QMAX = 7.0


def pack_int4(codes: Tensor) -> Tensor:
    """Integer codes in [-8, 7] ``[..., D]`` (D even) -> uint8 ``[..., D/2]`` (channel 2i low nibble, 2i+1 high)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dim must be even, got {tuple(codes.shape)}")
    c = codes.to(torch.int16) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., D/2]`` -> int8 codes ``[..., D]`` in [-8, 7]."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    codes = torch.stack((lo, hi), dim=-1).flatten(-2)
    return torch.where(codes >= 8, codes - 16, codes).to(torch.int8)


def value_groups(head_dim: int, group_size: int) -> int:
    """Channel group of int4 values: ``min(group_size, D)``; it must divide D (one error line otherwise)."""
    g = min(group_size, head_dim)
    if head_dim % g:
        raise ValueError(f"int4 group_size {group_size} does not divide head_dim {head_dim} (value groups run along D)")
    return g


def _absmax_int4(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    scale = x.abs().amax(dim=dim, keepdim=True).clamp_min(_TINY) / INT4_QMAX
    return (x / scale).round().clamp(-INT4_QMAX, INT4_QMAX), scale


def quantize_int4_keys(k_bfthd: Tensor, group_size: int) -> Quantized:
    """Keys ``[B, F, T, H, D]`` -> packed uint8 ``[B, F, T, H, D/2]`` and scales ``[B, F, ceil(T/G), H, D]``
    (one per G consecutive tokens of a frame and channel; the last group of a frame may be shorter)."""
    if k_bfthd.dim() != 5:
        raise ValueError(f"quantize_int4_keys expects [B, F, T, H, D], got {tuple(k_bfthd.shape)}")
    b, f, t, h, d = k_bfthd.shape
    ng = -(-t // group_size)
    x = k_bfthd.float()
    if ng * group_size != t:  # pad with zeros (they do not change a group's absmax), drop after
        x = torch.cat([x, x.new_zeros(b, f, ng * group_size - t, h, d)], dim=2)
    codes, scale = _absmax_int4(x.view(b, f, ng, group_size, h, d), dim=3)
    codes = codes.view(b, f, ng * group_size, h, d)[:, :, :t]
    return Quantized(pack_int4(codes), scale.squeeze(3))


def dequantize_int4_keys(packed_bfthd: Tensor, scale_bfghd: Tensor, group_size: int,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_int4_keys`: ``[B, F, T, H, D]`` in ``dtype``."""
    codes = unpack_int4(packed_bfthd).float()
    t = codes.shape[2]
    scale = scale_bfghd.repeat_interleave(group_size, dim=2)[:, :, :t]
    return (codes * scale).to(dtype)


def quantize_int4_values(v_blhd: Tensor, group_size: int) -> Quantized:
    """Values ``[B, L, H, D]`` -> packed uint8 ``[B, L, H, D/2]`` and scales ``[B, L, H, D/G]`` (G channels
    per group, :func:`value_groups`)."""
    if v_blhd.dim() != 4:
        raise ValueError(f"quantize_int4_values expects [B, L, H, D], got {tuple(v_blhd.shape)}")
    g = value_groups(v_blhd.shape[-1], group_size)
    codes, scale = _absmax_int4(v_blhd.float().unflatten(-1, (-1, g)), dim=-1)
    return Quantized(pack_int4(codes.flatten(-2)), scale.squeeze(-1))


def dequantize_int4_values(packed_blhd: Tensor, scale_blhg: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`quantize_int4_values`: ``[B, L, H, D]`` in ``dtype``."""
    codes = unpack_int4(packed_blhd).float()
    return (codes.unflatten(-1, (scale_blhg.shape[-1], -1)) * scale_blhg.unsqueeze(-1)).flatten(-2).to(dtype)


# ---------------------------------------------------------------------------------------------------- smoothing
# Per-channel key smoothing (SmoothQuant-style, arXiv 2211.10438, applied to the k of q·kᵀ): keys are divided
# by a per-(batch, head, channel) factor c before quantization and q is multiplied by c at attention time, so
# q·kᵀ = (q⊙c)·(k/c)ᵀ is unchanged in exact arithmetic. With smoothing the keys take one scale per token (over D,
# like values) instead of per frame and channel: c evens out the channel magnitudes that a per-token scale would
# otherwise be dominated by. c is tied within each interleaved RoPE pair (c[2i] = c[2i+1]), so it commutes with
# the pair rotation and the fold into q also holds for pre-RoPE keys rotated at read time.

def smoothing_factors(k_bfthd: Tensor, floor: float = 1e-3) -> Tensor:
    """Per-channel smoothing factors ``[B, H, D]`` (float32) from keys ``[B, F, T, H, D]``: the absmax of each
    channel over frames and tokens, maxed within RoPE pairs, floored at ``floor`` x the largest (so a dead
    channel does not get a huge 1/c)."""
    amax = k_bfthd.float().abs().amax(dim=(1, 2))  # [B, H, D]
    if amax.shape[-1] % 2 == 0:
        amax = amax.unflatten(-1, (-1, 2)).amax(-1, keepdim=True).expand(*amax.shape[:-1], -1, 2).flatten(-2)
    top = amax.amax(dim=-1, keepdim=True).clamp_min(_TINY)
    return amax.maximum(top * floor).contiguous()


def quantize_keys_smoothed(k_bfthd: Tensor, smooth_bhd: Tensor, fmt: QuantFormat) -> Quantized:
    """Keys ``[B, F, T, H, D]`` divided by ``smooth [B, H, D]`` then quantized with one scale per token ->
    codes ``[B, F, T, H, D]`` and scales ``[B, F, T, H]``."""
    if k_bfthd.dim() != 5:
        raise ValueError(f"quantize_keys_smoothed expects [B, F, T, H, D], got {tuple(k_bfthd.shape)}")
    data, scale = quantize(k_bfthd.float() / smooth_bhd[:, None, None], fmt, dim=4)
    return Quantized(data, scale.squeeze(4))
