"""Fused gated residual ``x + y·gate`` (primal and tangent in one pass, Triton), with the reference twin
:func:`.reference.gated_residual_reference`.

One program handles one token row: it gathers the gate row of its sample (and frame, through ``index``),
computes ``y·gate`` and the sum in the ``compute`` dtype (each step rounded to it, as the unfused bf16 or
float32 math does) and writes the result in ``out_dtype``; with tangents it writes ``ẋ + ẏ·gate + y·ġate``.
Legend: B batch, L tokens, C width, Tm gate rows.

Backward (:func:`_gated_bwd`), autograd through the twin with its roundings: with ``ḡ`` the output gradient
rounded to ``compute``, ``∂x = ḡ`` (in ``x.dtype``; returned as the incoming gradient itself when that cast
pair is exact), ``∂y = ḡ·gate`` (rounded to ``compute``), ``∂gate = Σ ḡ·y`` over the tokens of each gate row
(each product rounded to ``compute``, summed in float32 as per-program partials, then ``torch.sum``).
``gate=None``: ``∂x``, ``∂y`` are ``ḡ`` cast, in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._dispatch import fused_apply, resolve_impl
from ._launch import OPTS, TL, chunk_range, first_token, num_warps, row_split, rows, token_row
from .reference import Pair, gated_residual_reference

__all__ = ["gated_residual"]


@triton.jit
def _gated_fwd(X, TX, Yb, TYb, G, TG, IDX, OUT, TOUT, L, C, s_gb, s_gt, s_tgb, s_tgt,
               CDT: tl.constexpr, WIDE: tl.constexpr, HAS_TX: tl.constexpr, HAS_TYB: tl.constexpr,
               HAS_G: tl.constexpr, HAS_TG: tl.constexpr, HAS_IDX: tl.constexpr, HAS_T: tl.constexpr,
               BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    offs = tl.arange(0, BLOCK_C)
    msk = offs < C
    if HAS_IDX:
        fr = tl.load(IDX + row % L).to(tl.int64)
    else:
        fr = 0
    # every value is first rounded to CDT, every product/sum is formed in WIDE and rounded to CDT
    y = tl.load(Yb + row * C + offs, mask=msk, other=0.0).to(CDT).to(WIDE)
    x = tl.load(X + row * C + offs, mask=msk, other=0.0).to(CDT).to(WIDE)
    if HAS_G:
        g = tl.load(G + b * s_gb + fr * s_gt + offs, mask=msk, other=0.0).to(CDT).to(WIDE)
        yg = (y * g).to(CDT).to(WIDE)
    else:  # plain residual add
        yg = y
    out = (x + yg).to(CDT)
    tl.store(OUT + row * C + offs, out.to(OUT.dtype.element_ty), mask=msk)
    if HAS_T:
        tg = tl.zeros([BLOCK_C], dtype=WIDE)
        if HAS_TYB:
            ty = tl.load(TYb + row * C + offs, mask=msk, other=0.0).to(CDT).to(WIDE)
            if HAS_G:
                tg = (ty * g).to(CDT).to(WIDE)
            else:
                tg = ty
        if HAS_TG:
            tgt = tl.load(TG + b * s_tgb + fr * s_tgt + offs, mask=msk, other=0.0).to(CDT).to(WIDE)
            tg = (tg + (y * tgt).to(CDT).to(WIDE)).to(CDT).to(WIDE)
        if HAS_TX:
            tg = tl.load(TX + row * C + offs, mask=msk, other=0.0).to(CDT).to(WIDE) + tg
        tl.store(TOUT + row * C + offs, tg.to(CDT).to(TOUT.dtype.element_ty), mask=msk)


@triton.jit
def _gated_bwd(GO, Yb, G, ORDER, BOUNDS, DX, DY, PG, L, C, K, s_gb, s_gt, CDT: tl.constexpr, WIDE: tl.constexpr,
               HAS_IDX: tl.constexpr, NEED_DX: tl.constexpr, NEED_DY: tl.constexpr, NEED_G: tl.constexpr,
               BLOCK_C: tl.constexpr):
    t = tl.program_id(0)  # gate row (grid axis 0: up to 2^31 - 1 rows)
    k = tl.program_id(1)  # chunk of that row's tokens
    b = tl.program_id(2).to(tl.int64)  # sample
    offs = tl.arange(0, BLOCK_C)
    msk = offs < C
    g = tl.load(G + b * s_gb + t * s_gt + offs, mask=msk, other=0.0).to(CDT).to(WIDE)
    acc = tl.zeros([BLOCK_C], dtype=WIDE)
    s, e = chunk_range(BOUNDS, t, k, L, K, HAS_IDX)
    nxt = first_token(ORDER, s, e, HAS_IDX)
    for pos in range(s, e):
        row, nxt = token_row(b, L, pos, nxt, ORDER, e, HAS_IDX)
        go = tl.load(GO + row * C + offs, mask=msk, other=0.0).to(CDT).to(WIDE)
        if NEED_DX:
            tl.store(DX + row * C + offs, go.to(DX.dtype.element_ty), mask=msk)
        if NEED_DY:
            tl.store(DY + row * C + offs, (go * g).to(CDT).to(DY.dtype.element_ty), mask=msk)
        if NEED_G:
            y = tl.load(Yb + row * C + offs, mask=msk, other=0.0).to(CDT).to(WIDE)
            acc += (go * y).to(CDT).to(WIDE)
    if NEED_G:
        tl.store(PG + ((b * tl.num_programs(0) + t) * K + k) * C + offs, acc, mask=msk)


def _triton_bwd(gout, need, x, tx, y, ty, gate, tgate, *, compute, index=None, out_dtype=None):
    """Gradients of ``(x, tx, y, ty, gate, tgate)`` (None where not needed)."""
    nx, ny, ng = need[0], need[2], need[4]
    exact = torch.promote_types(gout.dtype, compute) == compute  # ḡ = the incoming gradient, widened

    def cast(dt):  # ḡ in dt, the incoming tensor itself when that is exact
        return gout if exact and gout.dtype == dt else gout.to(compute).to(dt)

    if gate is None:
        return cast(x.dtype) if nx else None, None, cast(y.dtype) if ny else None, None, None, None
    alias = nx and exact and gout.dtype == x.dtype
    kernel_dx = nx and not alias
    if not (kernel_dx or ny or ng):
        return gout if alias else None, None, None, None, None, None
    b, length, c = x.shape
    gout, y = gout.contiguous(), y.contiguous()
    tm = gate.shape[1]
    order, bounds, chunks = row_split(x, index, tm)
    wide = torch.float64 if compute == torch.float64 else torch.float32
    dx = gout if alias else torch.empty(b, length, c, dtype=x.dtype, device=x.device) if kernel_dx else None
    dy = torch.empty_like(y) if ny else None
    pg = torch.empty(b, tm, chunks, c, dtype=wide, device=x.device) if ng else None  # partial sums
    g, s_gb, s_gt = rows(gate)
    block = triton.next_power_of_2(c)
    _gated_bwd[(tm, chunks, b)](
        gout, y, g, order, bounds, dx if kernel_dx else None, dy, pg, length, c, chunks, s_gb, s_gt,
        CDT=TL[compute], WIDE=TL[wide], HAS_IDX=order is not None, NEED_DX=kernel_dx, NEED_DY=ny, NEED_G=ng,
        BLOCK_C=block, num_warps=num_warps(block), **OPTS)
    return dx, None, dy, None, pg.sum(2).to(gate.dtype) if ng else None, None


def _triton_fwd(x, tx, y, ty, gate, tgate, *, compute, index=None, out_dtype=None) -> Pair:
    b, length, c = x.shape
    x, y = x.contiguous(), y.contiguous()
    tx, ty = (None if tx is None else tx.contiguous()), (None if ty is None else ty.contiguous())
    od = out_dtype or x.dtype
    has_t = tx is not None or ty is not None or tgate is not None
    out = torch.empty(b, length, c, dtype=od, device=x.device)
    tout = torch.empty_like(out) if has_t else None
    (g, s_gb, s_gt), (tg, s_tgb, s_tgt) = rows(gate), rows(tgate)
    block = triton.next_power_of_2(c)
    wide = tl.float64 if compute == torch.float64 else tl.float32
    _gated_fwd[(b * length,)](
        x, tx, y, ty, g, tg, index, out, tout, length, c, s_gb, s_gt, s_tgb, s_tgt,
        CDT=TL[compute], WIDE=wide, HAS_TX=tx is not None, HAS_TYB=ty is not None, HAS_G=gate is not None,
        HAS_TG=tgate is not None,
        HAS_IDX=index is not None, HAS_T=has_t, BLOCK_C=block, num_warps=num_warps(block), **OPTS)
    return out, tout


def _check(x, tx, y, ty, gate, tgate, index) -> None:
    if x.dim() != 3:
        raise ValueError(f"gated_residual: x must be [B, L, C], got {tuple(x.shape)}")
    b, length, c = x.shape
    for name, t in (("tx", tx), ("y", y), ("ty", ty)):
        if t is not None and t.shape != x.shape:
            raise ValueError(f"gated_residual: {name} {tuple(t.shape)} must match x {tuple(x.shape)}")
    if gate is None and tgate is not None:
        raise ValueError("gated_residual: tgate needs a gate")
    for name, m in (("gate", gate), ("tgate", tgate)):
        if m is not None and (m.dim() != 3 or m.shape[0] != b or m.shape[2] != c
                              or (index is None and m.shape[1] != 1)):
            raise ValueError(f"gated_residual: {name} must be [B={b}, Tm, C={c}] (Tm = 1 without index), "
                             f"got {tuple(m.shape)}")
    if index is not None and (index.dim() != 1 or index.shape[0] != length):
        raise ValueError(f"gated_residual: index must be [L={length}], got {tuple(index.shape)}")


def gated_residual(x: Tensor, tx: Tensor | None, y: Tensor, ty: Tensor | None, gate: Tensor | None,
                   tgate: Tensor | None, *, compute: torch.dtype, index: Tensor | None = None,
                   out_dtype: torch.dtype | None = None, impl: str | None = None) -> Pair:
    """``(x + y·gate, tangent | None)`` for ``x``, ``y [B, L, C]`` and ``gate [B, Tm, C]`` (``Tm`` = 1, or rows
    picked per token by ``index [L]``), computed in ``compute``, returned in ``out_dtype`` (default ``x.dtype``).
    ``gate=None``: the plain residual add ``x + y`` in ``compute``. Differentiable in ``x``, ``y`` and ``gate``
    (backward: see :mod:`._dispatch`)."""
    _check(x, tx, y, ty, gate, tgate, index)
    kw = dict(compute=compute, index=index, out_dtype=out_dtype)
    args = (x, tx, y, ty, gate, tgate)
    ok = (lambda: None if compute in TL and x.shape[-1] <= 65536 else f"compute dtype {compute} or width")
    if resolve_impl(x, impl, ok) == "reference":
        return gated_residual_reference(*args, **kw)
    return fused_apply(_triton_fwd, gated_residual_reference, args, (True, False, True, False, True, False), kw,
                       _triton_bwd)
