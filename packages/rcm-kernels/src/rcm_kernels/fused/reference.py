"""Plain-PyTorch reference twins of the fused DiT ops: any device, any dtype, the precision of the Wan DiT.

Each function returns ``(primal, tangent | None)``; a ``None`` tangent input means zero, and the tangent is
``None`` when every tangent input is ``None``. Tangents are computed under ``torch.no_grad()``; the primal keeps
the caller's grad mode (the fused ops' backward differentiates these functions). The precision follows the
Wan DiT (docs/kernels.md, fused ops): norms in the float32 island (float64 for float64 inputs), the normalized
value rounded to the input dtype before it is modulated or scaled, modulation in the dtype of ``scale``.

Legend: B batch, L tokens, C width, H heads, D head dim, Tm modulation rows (1, or frames with ``index [L]``
mapping each token to its row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

Pair = tuple[Tensor, Tensor | None]

__all__ = ["island", "mod_rows", "add_tangents", "rotate_pairs", "layer_norm_modulate_reference", "rms_norm_rope_reference",
           "rope_reference", "gated_residual_reference", "gelu_tanh_reference"]


def island(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the dtype norms are computed in."""
    return torch.promote_types(dtype, torch.float32)


def mod_rows(m: Tensor | None, index: Tensor | None) -> Tensor | None:
    """Per-token rows of a modulation tensor ``m [B, Tm, C]``: ``m[:, index]`` (``[B, L, C]``) or ``m``."""
    return m if m is None or index is None else m[:, index]


def add_tangents(*terms: Tensor | None) -> Tensor | None:
    """Sum of the non-None terms (None if all are None): combines partial tangents."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def layer_norm_modulate_reference(x: Tensor, tx: Tensor | None, shift: Tensor | None, tshift: Tensor | None,
                                  scale: Tensor | None, tscale: Tensor | None, *, eps: float,
                                  weight: Tensor | None = None, bias: Tensor | None = None,
                                  index: Tensor | None = None, out_dtype: torch.dtype | None = None) -> Pair:
    """``LN(x)·(1 + scale) + shift`` (``x [B, L, C]``, ``shift``/``scale [B, Tm, C]``; both None: plain LN).

    LN statistics (and the optional affine ``weight``/``bias [C]``) in the island dtype, the result rounded to
    ``x.dtype``; the modulation then runs in ``scale.dtype``. Output in ``out_dtype`` (default: ``scale.dtype``,
    or ``x.dtype`` without modulation). Tangent of ``n = (x − μ)·r``: ``ṅ = r·(ẋ − mean(ẋ) − n·mean(n·ẋ))``
    (times ``weight``), rounded like the primal, then ``ṅ·(1 + scale) + n·scalė + shifṫ``.
    """
    dt = island(x.dtype)
    xf = x.to(dt)
    w = None if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    n = F.layer_norm(xf, xf.shape[-1:], w, b, eps).to(x.dtype)
    tn = None
    if tx is not None:
        with torch.no_grad():
            mu = xf.mean(-1, keepdim=True)
            r = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
            nn_ = (xf - mu) * r
            t = tx.to(dt)
            tn = r * (t - t.mean(-1, keepdim=True) - nn_ * (nn_ * t).mean(-1, keepdim=True))
            tn = (tn if w is None else tn * w).to(x.dtype)
    if scale is None:
        od = out_dtype or x.dtype
        return n.to(od), (None if tn is None else tn.to(od))
    shift, scale = mod_rows(shift, index), mod_rows(scale, index)
    tshift, tscale = mod_rows(tshift, index), mod_rows(tscale, index)
    od = out_dtype or scale.dtype
    nf = n.to(scale.dtype)
    y = (nf * (1 + scale) + shift).to(od)
    if tn is None and tshift is None and tscale is None:
        return y, None
    with torch.no_grad():
        ty = add_tangents(None if tn is None else tn.to(scale.dtype) * (1 + scale),
                  None if tscale is None else nf * tscale, tshift)
        return y, ty.to(od)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x [..., D]`` by ``cos``/``sin`` broadcastable to ``[..., D/2]`` (e.g.
    ``[1, L, 1, D/2]`` for ``x [B, L, H, D]``), computed in their dtype; result in ``x.dtype``."""
    xf = x.to(cos.dtype).unflatten(-1, (-1, 2))  # [..., D/2, 2]
    a, b = xf[..., 0], xf[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def _rotate(x_blhd: Tensor, cos_lp: Tensor, sin_lp: Tensor) -> Tensor:
    """:func:`rotate_pairs` of ``x [B, L, H, D]`` by ``cos``/``sin [L, D/2]``."""
    return rotate_pairs(x_blhd, cos_lp[None, :, None, :], sin_lp[None, :, None, :])


def rope_reference(x: Tensor, tx: Tensor | None, cos: Tensor, sin: Tensor) -> Pair:
    """Wan RoPE: rotate interleaved pairs of ``x [B, L, H, D]`` by ``cos``/``sin [L, D/2]`` (computed in their
    dtype, result in ``x.dtype``). The rotation is linear: the tangent is the same rotation of ``tx``."""
    y = _rotate(x, cos, sin)
    if tx is None:
        return y, None
    with torch.no_grad():
        return y, _rotate(tx, cos, sin)


def rms_norm_rope_reference(x: Tensor, tx: Tensor | None, weight: Tensor, *, eps: float, heads: int = 1,
                            cos: Tensor | None = None, sin: Tensor | None = None) -> Pair:
    """Wan RMSNorm over the full width of ``x [B, L, C]``, then (with ``cos``/``sin [L, D/2]``) RoPE per head.

    ``n = x·rsqrt(mean(x²) + eps)`` in the island dtype, rounded to ``x.dtype``, times ``weight [C]`` (in
    ``x.dtype``). Tangent ``ṅ = r·(ẋ − n·mean(n·ẋ))``, rounded, times ``weight``. Output ``[B, L, H, D]``.
    """
    dt = island(x.dtype)
    xf = x.to(dt)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * r
    y = (n.to(x.dtype) * weight).unflatten(-1, (heads, -1))
    ty = None
    if tx is not None:
        with torch.no_grad():
            t = tx.to(dt)
            tn = r * (t - n * (n * t).mean(-1, keepdim=True))
            ty = (tn.to(x.dtype) * weight).unflatten(-1, (heads, -1))
    if cos is None:
        return y, ty
    return rope_reference(y, ty, cos, sin)


def gated_residual_reference(x: Tensor, tx: Tensor | None, y: Tensor, ty: Tensor | None, gate: Tensor | None,
                             tgate: Tensor | None, *, compute: torch.dtype, index: Tensor | None = None,
                             out_dtype: torch.dtype | None = None) -> Pair:
    """``x + y·gate`` (``x``, ``y [B, L, C]``, ``gate [B, Tm, C]``): ``y·gate`` and the sum in ``compute``
    (each rounded to it), the result in ``out_dtype`` (default ``x.dtype``). Tangent ``ẋ + ẏ·gate + y·ġate``.
    ``gate=None`` is the plain residual add ``x + y`` in ``compute`` (tangent ``ẋ + ẏ``)."""
    od = out_dtype or x.dtype
    gate, tgate = mod_rows(gate, index), mod_rows(tgate, index)
    g = None if gate is None else gate.to(compute)
    yc = y.to(compute)
    out = (x.to(compute) + (yc if g is None else yc * g)).to(od)
    if tx is None and ty is None and tgate is None:
        return out, None
    with torch.no_grad():
        tyc = None if ty is None else ty.to(compute)
        tg = add_tangents(tyc if g is None or tyc is None else tyc * g, None if tgate is None else yc * tgate.to(compute))
        return out, add_tangents(None if tx is None else tx.to(compute), tg).to(od)


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh_reference(x: Tensor, tx: Tensor | None) -> Pair:
    """tanh-approximate GELU ``½x(1 + tanh u)``, ``u = c(x + 0.044715x³)``, in ``x.dtype`` (as the DiT's
    unfused op: the tangent formula is evaluated op by op in ``x.dtype``)."""
    y = F.gelu(x, approximate="tanh")
    if tx is None:
        return y, None
    with torch.no_grad():
        th = torch.tanh(_GELU_C * (x + 0.044715 * x**3))
        d = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * 0.044715 * x * x)
        return y, tx * d
