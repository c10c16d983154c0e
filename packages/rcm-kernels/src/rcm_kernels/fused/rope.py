"""Wan 3-D RoPE alone (no norm): the rotation of :mod:`.rms_norm`'s kernel with the norm switched off, for q/k
projections without qk-norm. Reference twin: :func:`.reference.rope_reference`.

The angles come in as ``cos``/``sin [L, D/2]`` (the three axes' frequencies already laid out ``[t | h | w]``
per pair by the network); the kernel rotates the interleaved pairs of every head of a token row with them.
Backward: the transposed rotation of the output gradient (:func:`.rms_norm._rms_rope_bwd`, norm off).
"""

from __future__ import annotations

from torch import Tensor

from ._dispatch import fused_apply, resolve_impl
from .reference import Pair, rope_reference
from .rms_norm import check_rope, triton_rms_norm_rope, triton_rms_norm_rope_bwd, unsupported_rope

__all__ = ["apply_rope"]


def _triton_rope(x_blhd: Tensor, tx_blhd: Tensor | None, *, cos: Tensor, sin: Tensor) -> Pair:
    h = x_blhd.shape[2]
    return triton_rms_norm_rope(x_blhd.flatten(2), None if tx_blhd is None else tx_blhd.flatten(2), None,
                                eps=0.0, heads=h, cos=cos, sin=sin)


def _triton_rope_bwd(gy_blhd: Tensor, need, x_blhd: Tensor, tx_blhd, *, cos: Tensor, sin: Tensor):
    h = x_blhd.shape[2]
    dx, _, _ = triton_rms_norm_rope_bwd(gy_blhd, need, x_blhd.flatten(2), None, None, eps=0.0, heads=h, cos=cos,
                                        sin=sin)
    return None if dx is None else dx.unflatten(-1, (h, -1)), None


def apply_rope(x: Tensor, tx: Tensor | None, cos: Tensor, sin: Tensor, *, impl: str | None = None) -> Pair:
    """Rotate interleaved pairs of ``x [B, L, H, D]`` (and ``tx``) by ``cos``/``sin [L, D/2]``, computed in their
    dtype, returned in ``x.dtype``. Differentiable in ``x``."""
    if x.dim() != 4:
        raise ValueError(f"apply_rope: x must be [B, L, H, D], got {tuple(x.shape)}")
    if tx is not None and tx.shape != x.shape:
        raise ValueError(f"apply_rope: tx {tuple(tx.shape)} must match x {tuple(x.shape)}")
    b, length, h, d = x.shape
    check_rope("apply_rope", length, h * d, h, cos, sin)
    if resolve_impl(x, impl, lambda: unsupported_rope(x, cos)) == "reference":
        return rope_reference(x, tx, cos, sin)
    return fused_apply(_triton_rope, rope_reference, (x, tx), (True, False), dict(cos=cos, sin=sin),
                       _triton_rope_bwd)
