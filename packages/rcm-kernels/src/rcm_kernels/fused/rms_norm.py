"""Fused q/k prologue: Wan RMSNorm over the full width, the ``weight`` scale and (optionally) 3-D RoPE per head,
primal and tangent in one pass (Triton), with the reference twin :func:`.reference.rms_norm_rope_reference`.

One program handles one token row ``x [C]`` (read contiguously, split in registers) as ``C/2`` interleaved
pairs ``(x[2p], x[2p+1])``: the pair is
one complex number of head ``p // (D/2)``, rotated by the angle of pair ``p % (D/2)`` of the token (``cos``/
``sin [L, D/2]``, the same for every head). RMSNorm needs the whole row, so it is computed first from both
halves; the rotation is linear, so the tangent is normalized the RMSNorm way and rotated the same way.
Legend: B batch, L tokens, C width = H·D, H heads, D head dim.

Backward (:func:`_rms_rope_bwd`), autograd through the twin with its roundings: the output gradient is rotated
back, ``(ĝₑ, ĝₒ) = (gₑ·cos + gₒ·sin, gₒ·cos − gₑ·sin)`` in the ``cos`` dtype and rounded to ``x.dtype``; with
``n`` the rounded normalized row and ``n̂ = x·r`` unrounded, ``∂weight = Σ ĝ·n`` over all tokens (products
rounded to ``x.dtype``, per-program partials summed by ``torch.sum``), ``ĝ ← ĝ·weight`` (rounded), and
``∂x = r·(ĝ − n̂·mean(ĝ·n̂))`` with ``r`` recomputed from the row. RoPE alone: ``∂x`` is the back-rotation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._dispatch import fused_apply, resolve_impl
from ._launch import OPTS, TL, num_warps, row_split
from .reference import Pair, island, rms_norm_rope_reference

__all__ = ["rms_norm_rope"]


@triton.jit
def _rms_rope_fwd(X, TX, W, COS, SIN, Y, TY, L, C, s_cos, s_sin, eps, HALF_D: tl.constexpr,
                  ISL: tl.constexpr, RDT: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
                  HAS_TX: tl.constexpr, BLOCK_P: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, 2 * BLOCK_P)  # the row, read contiguously, then split into (even, odd) pair halves
    msk = offs < C
    p = tl.arange(0, BLOCK_P)  # pair index within the row
    x_raw = tl.load(X + row * C + offs, mask=msk, other=0.0)
    xdt = x_raw.dtype
    xe_raw, xo_raw = tl.split(tl.reshape(x_raw, (BLOCK_P, 2)))
    if NORM:
        xe, xo = xe_raw.to(ISL), xo_raw.to(ISL)
        r = 1.0 / tl.sqrt((tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / C + eps)
        ne, no = xe * r, xo * r
        we, wo = tl.split(tl.reshape(tl.load(W + offs, mask=msk, other=0.0).to(ISL), (BLOCK_P, 2)))
        # (n rounded to x.dtype) · weight, the product rounded to x.dtype (the unfused math)
        ye = (ne.to(xdt).to(ISL) * we).to(xdt)
        yo = (no.to(xdt).to(ISL) * wo).to(xdt)
        if HAS_TX:
            te, to = tl.split(tl.reshape(tl.load(TX + row * C + offs, mask=msk, other=0.0).to(ISL), (BLOCK_P, 2)))
            m = (tl.sum(ne * te, axis=0) + tl.sum(no * to, axis=0)) / C
            tye = ((r * (te - ne * m)).to(xdt).to(ISL) * we).to(xdt)
            tyo = ((r * (to - no * m)).to(xdt).to(ISL) * wo).to(xdt)
    else:
        ye, yo = xe_raw, xo_raw
        if HAS_TX:
            tye, tyo = tl.split(tl.reshape(tl.load(TX + row * C + offs, mask=msk, other=0.0), (BLOCK_P, 2)))
    if ROPE:
        lt = row % L
        j = p % HALF_D
        pm = p < C // 2
        c = tl.load(COS + lt * s_cos + j, mask=pm, other=0.0).to(RDT)
        s = tl.load(SIN + lt * s_sin + j, mask=pm, other=0.0).to(RDT)
        a, bb = ye.to(RDT), yo.to(RDT)
        ye, yo = (a * c - bb * s).to(xdt), (a * s + bb * c).to(xdt)
        if HAS_TX:
            a, bb = tye.to(RDT), tyo.to(RDT)
            tye, tyo = (a * c - bb * s).to(xdt), (a * s + bb * c).to(xdt)
    tl.store(Y + row * C + offs, tl.interleave(ye, yo), mask=msk)
    if HAS_TX:
        tl.store(TY + row * C + offs, tl.interleave(tye, tyo), mask=msk)


@triton.jit
def _rms_rope_bwd(X, GY, W, COS, SIN, DX, PW, L, C, K, s_cos, s_sin, eps, HALF_D: tl.constexpr,
                  ISL: tl.constexpr, RDT: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
                  NEED_DX: tl.constexpr, NEED_W: tl.constexpr, BLOCK_P: tl.constexpr):
    k = tl.program_id(0)  # chunk of the sample's tokens (grid axis 0: up to 2^31 - 1, one token each at most)
    b = tl.program_id(1).to(tl.int64)  # sample
    offs = tl.arange(0, 2 * BLOCK_P)
    msk = offs < C
    p = tl.arange(0, BLOCK_P)
    if NORM:
        we, wo = tl.split(tl.reshape(tl.load(W + offs, mask=msk, other=0.0).to(ISL), (BLOCK_P, 2)))
    acc_e = tl.zeros([BLOCK_P], dtype=ISL)
    acc_o = tl.zeros([BLOCK_P], dtype=ISL)
    n_rows = (L + K - 1) // K
    for lt in range(k * n_rows, tl.minimum(k * n_rows + n_rows, L)):
        row = b * L + lt
        g_raw = tl.load(GY + row * C + offs, mask=msk, other=0.0)
        xdt = g_raw.dtype
        ge, go = tl.split(tl.reshape(g_raw, (BLOCK_P, 2)))
        if ROPE:  # the transposed rotation
            j = p % HALF_D
            pm = p < C // 2
            c = tl.load(COS + lt * s_cos + j, mask=pm, other=0.0).to(RDT)
            sn = tl.load(SIN + lt * s_sin + j, mask=pm, other=0.0).to(RDT)
            a, bb = ge.to(RDT), go.to(RDT)
            ge, go = (a * c + bb * sn).to(xdt), (bb * c - a * sn).to(xdt)
        if NORM:
            xe, xo = tl.split(tl.reshape(tl.load(X + row * C + offs, mask=msk, other=0.0).to(ISL), (BLOCK_P, 2)))
            r = 1.0 / tl.sqrt((tl.sum(xe * xe, axis=0) + tl.sum(xo * xo, axis=0)) / C + eps)
            ne, no = xe * r, xo * r
            if NEED_W:  # ∂weight terms: ĝ·n, n rounded as the forward did, the product rounded to x.dtype
                acc_e += (ge.to(ISL) * ne.to(xdt).to(ISL)).to(xdt).to(ISL)
                acc_o += (go.to(ISL) * no.to(xdt).to(ISL)).to(xdt).to(ISL)
            if NEED_DX:
                ge = (ge.to(ISL) * we).to(xdt).to(ISL)
                go = (go.to(ISL) * wo).to(xdt).to(ISL)
                m = (tl.sum(ge * ne, axis=0) + tl.sum(go * no, axis=0)) / C
                ge, go = r * (ge - ne * m), r * (go - no * m)
        if NEED_DX:
            tl.store(DX + row * C + offs, tl.interleave(ge, go).to(xdt), mask=msk)
    if NEED_W:
        tl.store(PW + (b * K + k) * C + offs, tl.interleave(acc_e, acc_o), mask=msk)


def triton_rms_norm_rope(x, tx, weight, *, eps, heads=1, cos=None, sin=None) -> Pair:
    """Launch the kernel on ``x [B, L, C]``; ``weight`` None skips the norm (RoPE only). ``[B, L, H, D]`` out."""
    b, length, c = x.shape
    x, tx = x.contiguous(), (None if tx is None else tx.contiguous())
    y = torch.empty_like(x)
    ty = None if tx is None else torch.empty_like(x)
    rope = cos is not None
    if rope and (cos.stride(-1) != 1 or sin.stride(-1) != 1):
        cos, sin = cos.contiguous(), sin.contiguous()
    block = triton.next_power_of_2(c // 2)
    _rms_rope_fwd[(b * length,)](
        x, tx, weight, cos, sin, y, ty, length, c, cos.stride(0) if rope else 0, sin.stride(0) if rope else 0, eps,
        HALF_D=c // heads // 2, ISL=TL[island(x.dtype)], RDT=TL[cos.dtype] if rope else tl.float32,
        NORM=weight is not None, ROPE=rope, HAS_TX=tx is not None, BLOCK_P=block, num_warps=num_warps(block),
        **OPTS)
    return y.unflatten(-1, (heads, -1)), (None if ty is None else ty.unflatten(-1, (heads, -1)))


def triton_rms_norm_rope_bwd(gy, need, x, tx, weight, *, eps, heads=1, cos=None, sin=None):
    """Gradients of ``(x, tx, weight)`` (None where not needed); ``weight`` None: RoPE alone."""
    nx, nw = need[0], weight is not None and need[2]
    b, length, c = x.shape
    norm, rope = weight is not None, cos is not None
    x, gy = (x.contiguous() if norm else x), gy.reshape(b, length, c).contiguous()  # RoPE alone: x unread
    if rope and (cos.stride(-1) != 1 or sin.stride(-1) != 1):
        cos, sin = cos.contiguous(), sin.contiguous()
    isl = island(x.dtype)
    chunks = row_split(x, None, 1)[2] if nw else length  # ∂weight partials per chunk of rows; else a row each
    dx = torch.empty(b, length, c, dtype=x.dtype, device=x.device) if nx else None
    pw = torch.empty(b, chunks, c, dtype=isl, device=x.device) if nw else None  # partial sums
    block = triton.next_power_of_2(c // 2)
    _rms_rope_bwd[(chunks, b)](
        x, gy, weight, cos, sin, dx, pw, length, c, chunks, cos.stride(0) if rope else 0,
        sin.stride(0) if rope else 0, eps, HALF_D=c // heads // 2, ISL=TL[isl],
        RDT=TL[cos.dtype] if rope else tl.float32, NORM=norm, ROPE=rope, NEED_DX=nx, NEED_W=nw, BLOCK_P=block,
        num_warps=num_warps(block), **OPTS)
    return dx, None, pw.sum((0, 1)).to(weight.dtype) if nw else None


def check_rope(name: str, length: int, c: int, heads: int, cos: Tensor | None, sin: Tensor | None) -> None:
    """One clear error line for malformed RoPE arguments of a ``[B, L, C = H·D]`` input."""
    if c % heads or (c // heads) % 2:
        raise ValueError(f"{name}: width {c} must split into {heads} heads of an even head dim")
    if (cos is None) != (sin is None):
        raise ValueError(f"{name}: cos and sin are given together or not at all")
    half = c // heads // 2
    for nm, t in (("cos", cos), ("sin", sin)):
        if t is not None and tuple(t.shape) != (length, half):
            raise ValueError(f"{name}: {nm} must be [L={length}, D/2={half}], got {tuple(t.shape)}")


def unsupported_rope(x: Tensor, cos: Tensor | None) -> str | None:
    if x.dtype not in TL:
        return f"x dtype {x.dtype}"
    if cos is not None and cos.dtype not in (torch.float32, torch.float64):
        return f"cos/sin dtype {cos.dtype} (float32/float64 only)"
    if x.shape[-1] > 32768:
        return f"width {x.shape[-1]} > 32768"
    return None


def rms_norm_rope(x: Tensor, tx: Tensor | None, weight: Tensor, *, eps: float, heads: int = 1,
                  cos: Tensor | None = None, sin: Tensor | None = None, impl: str | None = None) -> Pair:
    """Wan RMSNorm of ``x [B, L, C]`` times ``weight [C]``, viewed as ``[B, L, H, D]``, then RoPE by ``cos``/
    ``sin [L, D/2]`` when given (the q/k path of self-attention; cross-attention passes none). Precision and
    tangent as :func:`.reference.rms_norm_rope_reference`; differentiable in ``x`` and ``weight``."""
    if x.dim() != 3:
        raise ValueError(f"rms_norm_rope: x must be [B, L, C], got {tuple(x.shape)}")
    if tx is not None and tx.shape != x.shape:
        raise ValueError(f"rms_norm_rope: tx {tuple(tx.shape)} must match x {tuple(x.shape)}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm_rope: weight must be [C={x.shape[-1]}], got {tuple(weight.shape)}")
    check_rope("rms_norm_rope", x.shape[1], x.shape[2], heads, cos, sin)
    kw = dict(eps=eps, heads=heads, cos=cos, sin=sin)
    if resolve_impl(x, impl, lambda: unsupported_rope(x, cos) or _weight_dtype(x, weight)) == "reference":
        return rms_norm_rope_reference(x, tx, weight, **kw)
    return fused_apply(triton_rms_norm_rope, rms_norm_rope_reference, (x, tx, weight), (True, False, True), kw,
                       triton_rms_norm_rope_bwd)


def _weight_dtype(x: Tensor, weight: Tensor) -> str | None:
    # the kernel writes the product in x.dtype; the reference promotes x.dtype with weight.dtype
    return None if weight.dtype == x.dtype else f"weight dtype {weight.dtype} differs from x dtype {x.dtype}"
