"""Model FLOPs of one WanDiT call: the one formula the benchmarks and MFU figures use (multiply-add = 2 FLOPs).

Per block on ``tokens`` video tokens: q/k/v/o and the cross-attention q/o projections (``6·dim²`` per token) and
the FFN (``2·dim·ffn_dim``); cross-attention k/v on the ``text_rows`` context rows (``2·dim²`` per row);
attention ``4·L²·dim`` (scores and values) plus ``4·L·text_rows·dim``. Outside the blocks: patch embedding,
head, text embedding. A JVP pass counts every linear on the video tokens twice (primal and tangent) and
attention three times (the fused JVP kernel's extra products); the backward counts twice the forward.
"""

from __future__ import annotations

from .configs import WanConfig

__all__ = ["dit_flops"]


def dit_flops(cfg: WanConfig, tokens: int, text_rows: int) -> dict[str, float]:
    """``{"forward", "forward_jvp", "fwd+bwd"}`` FLOPs of one call on ``tokens`` video tokens."""
    c, f, n = cfg.dim, cfg.ffn_dim, cfg.num_layers
    p = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    lin_x = 2 * tokens * (6 * c * c + 2 * c * f)  # per block, on the video tokens
    lin_ctx = 2 * text_rows * 2 * c * c  # per block, cross k,v on the context
    attn = 4 * tokens * tokens * c + 4 * tokens * text_rows * c  # per block
    outer = 2 * tokens * (cfg.in_dim * p * c + c * p * cfg.out_dim) + 2 * text_rows * (cfg.text_dim * c + c * c)
    fwd = n * (lin_x + lin_ctx + attn) + outer
    jvp = n * (2 * lin_x + lin_ctx + 3 * attn) + 2 * outer
    return {"forward": fwd, "forward_jvp": jvp, "fwd+bwd": 3 * fwd}
