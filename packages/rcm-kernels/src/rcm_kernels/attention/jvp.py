"""Public attention entry points (reference-only placeholder; the fused Triton path replaces the dispatch)."""

from __future__ import annotations

from torch import Tensor

from .reference import attention_reference


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, block_mask=None) -> Tensor:
    """Softmax attention over ``[B, L, H, D]`` tensors; differentiable (backward and forward AD)."""
    return attention_reference(q, k, v, scale=scale, mask=block_mask).out


def jvp_attention(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None = None, tk: Tensor | None = None,
                  tv: Tensor | None = None, *, scale: float | None = None, block_mask=None):
    """Attention and its tangent: returns ``(out, tangent_out)``; ``None`` tangents mean zero."""
    r = attention_reference(q, k, v, tq, tk, tv, scale=scale, mask=block_mask)
    return r.out, (None if r.tangent is None else r.tangent.detach())
