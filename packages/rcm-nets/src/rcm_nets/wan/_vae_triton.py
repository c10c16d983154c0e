"""Triton kernel of the VAE's fused RMS-norm + SiLU (``vae_fast.rms_norm_silu_triton``; twin ``rms_norm_silu``).

Layout: the activation ``[b, c, t, h, w]`` is read as ``[b, p, c]`` with ``p = t·h·w`` through strides, so one
kernel serves channels-first (positions contiguous) and channels-last (channels contiguous) tensors. A
program owns ``BLOCK_P`` positions of one batch entry and all ``c`` channels (``BLOCK_C ≥ c``; the Wan2.1
decoder has at most 384), so the channel reduction stays in registers: one read, one write.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_silu_kernel(x_ptr, g_ptr, y_ptr, P, C, sxb, sxp, sxc, syb, syp, syc, scale, eps,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr):
    pid_p = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_p = (pid_p * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_p[:, None] < P) & (offs_c[None, :] < C)
    x = tl.load(x_ptr + b * sxb + offs_p[:, None] * sxp + offs_c[None, :] * sxc, mask=mask, other=0.0)
    x = x.to(tl.float32)
    norm = tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)  # [BLOCK_P]
    g = tl.load(g_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
    y = x / norm[:, None] * scale * g[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + b * syb + offs_p[:, None] * syp + offs_c[None, :] * syc,
             y.to(y_ptr.dtype.element_ty), mask=mask)


def launch_rms_norm_silu(x: Tensor, gamma_c: Tensor, y: Tensor, b: int, p: int, c: int,
                         x_strides: tuple[int, int, int], syb: int, syp: int, syc: int, scale: float,
                         silu: bool) -> None:
    """Normalize ``x`` (strides ``(batch, position, channel)``) into ``y``; ``gamma_c`` is ``[c]``."""
    block_c = triton.next_power_of_2(c)
    if x.is_cuda:
        # channels-last: rows of channels are contiguous, small position tiles suffice; channels-first: each
        # channel reads BLOCK_P consecutive positions, so keep >= 16 (a full 32-byte sector in 16-bit types)
        block_p = max(16 if x_strides[1] == 1 else 1, min(64, 4096 // block_c))
        num_warps = 8 if block_c * block_p >= 4096 else 4
    else:  # the CPU interpreter runs each program in Python (numpy per op): few, large tiles
        block_p, num_warps = min(triton.next_power_of_2(p), max(16, 16384 // block_c)), 1
    grid = (triton.cdiv(p, block_p), b)
    _rms_norm_silu_kernel[grid](x, gamma_c, y, p, c, *x_strides, syb, syp, syc, scale, 1e-12,
                                BLOCK_P=block_p, BLOCK_C=block_c, SILU=silu, num_warps=num_warps)
