"""Wan 3-D RoPE, computed on the fly (no table, no buffers).

The head dim ``d`` splits into real widths ``d_t = d − 4⌊d/6⌋`` (frames), ``d_h = d_w = 2⌊d/6⌋`` (rows,
columns); 44/42/42 for d = 128. Pair ``j`` of an axis of width ``d_a`` rotates by ``pos·θ^(−2j/d_a)``.
Pairs are interleaved: elements ``(2j, 2j+1)`` of a head vector are one complex number, laid out
``[t-pairs | h-pairs | w-pairs]``. Token ``(f, h, w)`` (row-major) takes its t-angles from its frame
position ``frame_pos[f]`` (absolute latent-frame index: a causal block passes its offset, teacher forcing
repeats positions), its h-angles from ``h`` and its w-angles from ``w``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rcm_kernels.fused.reference import rotate_pairs

from ._ops import Pair, use_fused

__all__ = ["rope_split", "rope_angles", "rope_cos_sin", "apply_rope"]


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Real widths ``(d_t, d_h, d_w)`` of the three RoPE axes for a head dim."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def _axis(pos: Tensor, width: int, theta: float) -> Tensor:
    """Angles ``pos[:, None]·θ^(−2j/width)`` in float64, shape ``[len(pos), width/2]``."""
    j = torch.arange(0, width, 2, dtype=torch.float64, device=pos.device)
    return pos.to(torch.float64)[:, None] * torch.pow(theta, -j / width)


def rope_angles(frame_pos: Tensor, height: int, width: int, head_dim: int, theta: float = 10000.0) -> Tensor:
    """Rotation angles ``[F·height·width, head_dim/2]`` (float64) of a token grid in row-major order.

    ``frame_pos [F]`` holds the temporal position of each latent (token) frame, e.g. ``offset + arange(F)``.
    """
    d_t, d_h, d_w = rope_split(head_dim)
    dev = frame_pos.device
    a_t = _axis(frame_pos, d_t, theta)  # [F, d_t/2]
    a_h = _axis(torch.arange(height, device=dev), d_h, theta)  # [H, d_h/2]
    a_w = _axis(torch.arange(width, device=dev), d_w, theta)  # [W, d_w/2]
    f, h, w = a_t.shape[0], height, width
    ang = torch.cat([a_t[:, None, None, :].expand(f, h, w, -1), a_h[None, :, None, :].expand(f, h, w, -1),
                     a_w[None, None, :, :].expand(f, h, w, -1)], dim=-1)
    return ang.reshape(f * h * w, head_dim // 2)


def rope_cos_sin(angles: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` of ``angles [L, d/2]`` as ``[1, L, 1, d/2]`` tensors in ``dtype`` (for ``[B,L,H,D]``)."""
    return torch.cos(angles).to(dtype)[None, :, None, :], torch.sin(angles).to(dtype)[None, :, None, :]


def apply_rope(x: Tensor, tx: Tensor | None, cos: Tensor, sin: Tensor) -> Pair:
    """Rotate interleaved pairs of ``x [B, L, H, D]`` in the dtype of ``cos``; result in ``x.dtype``.

    The rotation is linear, so the tangent is the same rotation of ``tx``. Fused (``rcm_kernels.fused``, one
    pass for primal and tangent) when ``_ops.use_fused`` says so and ``cos``/``sin`` are ``[1, L, 1, D/2]``.
    """
    if use_fused(x) and cos.dim() == 4 and cos.shape[0] == cos.shape[2] == 1:
        from rcm_kernels.fused import apply_rope as fused

        return fused(x, tx, cos[0, :, 0], sin[0, :, 0])
    y = rotate_pairs(x, cos, sin)
    if tx is None:
        return y, None
    with torch.no_grad():
        return y, rotate_pairs(tx, cos, sin)
