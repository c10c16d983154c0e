"""Launch helpers shared by the fused kernels: dtype map, warps per row width, modulation-row strides."""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# No fused multiply-add contraction: every product and sum rounds as in the unfused torch ops (the kernels are
# memory-bound, FMA buys nothing), so elementwise results match torch bit for bit. Set explicitly: triton 3.9
# warns when it is left to its default.
OPTS = dict(enable_fp_fusion=False)


def num_warps(block: int) -> int:
    """Warps for one row of ``block`` elements (8 elements per thread at C = 1536)."""
    return 1 if block <= 256 else 4 if block <= 1024 else 8


def rows(m: Tensor | None) -> tuple[Tensor | None, int, int]:
    """A modulation tensor ``[B, Tm, C]`` with unit stride on C, and its (batch, row) strides."""
    if m is None:
        return None, 0, 0
    if m.stride(-1) != 1:
        m = m.contiguous()
    return m, m.stride(0), m.stride(1)
