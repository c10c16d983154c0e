"""Symmetric int8 / fp8 (e4m3) quantization for the KV cache, in plain torch (any device).

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
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["QuantFormat", "Quantized", "QMAX", "storage_dtype", "quantize", "dequantize",
           "quantize_keys", "quantize_values", "dequantize_keys", "dequantize_values"]

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
