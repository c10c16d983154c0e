"""Fused LayerNorm (+ optional affine) + adaLN modulation ``LN(x)·(1 + scale) + shift``, primal and tangent in
one pass over the row (Triton), with the reference twin :func:`.reference.layer_norm_modulate_reference`.

One program normalizes one token row ``x [C]`` in the island dtype, rounds the normalized value to ``x.dtype``
(the Wan precision), gathers the modulation row of its sample (and frame, through ``index``), and writes the
output in ``out_dtype``; with a tangent it also writes ``ṅ·(1 + scale) + n·scalė + shifṫ`` from the same
statistics. Legend: B batch, L tokens, C width, Tm modulation rows.

Backward (:func:`_ln_mod_bwd`, autograd through the twin written out, casts included): with ``g`` the output
gradient in ``scale``'s dtype, ``n̂ = (x − μ)·r`` and ``n`` the rounded (affine) LN output,
``∂shift = Σ g``, ``∂scale = Σ g·n`` (sums over the tokens of a modulation row), ``ĝ = g·(1 + scale)``
rounded to ``x.dtype``; affine: ``∂weight = Σ ĝ·n̂``, ``∂bias = Σ ĝ`` (over all tokens), ``ĝ ← ĝ·weight``;
``∂x = r·(ĝ − mean ĝ − n̂·mean(ĝ·n̂))``. ``μ`` and ``r`` are recomputed from the row (nothing but the inputs
is saved); the sums are per-program partials (programs = modulation row × chunk of its tokens) added up by
``torch.sum``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._dispatch import fused_apply, resolve_impl
from ._launch import OPTS, TL, chunk_range, first_token, num_warps, row_split, rows, token_row
from .reference import Pair, island, layer_norm_modulate_reference

__all__ = ["layer_norm_modulate"]

@triton.jit
def _ln_mod_fwd(X, TX, W, BIAS, SH, TSH, SC, TSC, IDX, Y, TY, L, C, eps,
                s_shb, s_sht, s_tshb, s_tsht, s_scb, s_sct, s_tscb, s_tsct,
                ISL: tl.constexpr, MDT: tl.constexpr, HAS_TX: tl.constexpr, HAS_W: tl.constexpr,
                HAS_B: tl.constexpr, HAS_MOD: tl.constexpr, HAS_TSH: tl.constexpr, HAS_TSC: tl.constexpr,
                HAS_IDX: tl.constexpr, HAS_TY: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one token of B·L
    b = row // L
    offs = tl.arange(0, BLOCK_C)
    msk = offs < C
    x_raw = tl.load(X + row * C + offs, mask=msk, other=0.0)
    x = x_raw.to(ISL)
    mu = tl.sum(x, axis=0) / C
    d = tl.where(msk, x - mu, 0.0)
    r = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
    n = d * r  # unrounded, for the tangent formula
    na = n
    if HAS_W:
        w = tl.load(W + offs, mask=msk, other=0.0).to(ISL)
        na = na * w
    if HAS_B:
        na = na + tl.load(BIAS + offs, mask=msk, other=0.0).to(ISL)
    na = na.to(x_raw.dtype)  # the Wan rounding: LN output in x.dtype
    if HAS_TX:
        t = tl.load(TX + row * C + offs, mask=msk, other=0.0).to(ISL)
        tn = r * (t - tl.sum(t, axis=0) / C - n * (tl.sum(n * t, axis=0) / C))
        if HAS_W:
            tn = tn * w
        tn = tn.to(x_raw.dtype)
    if HAS_MOD:
        if HAS_IDX:
            fr = tl.load(IDX + row % L).to(tl.int64)
        else:
            fr = 0
        nf = na.to(MDT)
        sc = tl.load(SC + b * s_scb + fr * s_sct + offs, mask=msk, other=0.0).to(MDT)
        sh = tl.load(SH + b * s_shb + fr * s_sht + offs, mask=msk, other=0.0).to(MDT)
        y = nf * (1.0 + sc) + sh
        if HAS_TY:
            ty = tl.zeros([BLOCK_C], dtype=MDT)
            if HAS_TX:
                ty = ty + tn.to(MDT) * (1.0 + sc)
            if HAS_TSC:
                ty = ty + nf * tl.load(TSC + b * s_tscb + fr * s_tsct + offs, mask=msk, other=0.0).to(MDT)
            if HAS_TSH:
                ty = ty + tl.load(TSH + b * s_tshb + fr * s_tsht + offs, mask=msk, other=0.0).to(MDT)
            tl.store(TY + row * C + offs, ty.to(TY.dtype.element_ty), mask=msk)
    else:
        y = na
        if HAS_TY:
            tl.store(TY + row * C + offs, tn.to(TY.dtype.element_ty), mask=msk)
    tl.store(Y + row * C + offs, y.to(Y.dtype.element_ty), mask=msk)


@triton.jit
def _ln_mod_bwd(X, GY, W, BIAS, SC, ORDER, BOUNDS, DX, PSH, PSC, PW, PB, L, C, K, eps, s_scb, s_sct,
                ISL: tl.constexpr, MDT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                HAS_MOD: tl.constexpr, HAS_IDX: tl.constexpr, NEED_DX: tl.constexpr, NEED_MOD: tl.constexpr,
                NEED_AFF: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)  # modulation row (grid axis 0: up to 2^31 - 1 rows)
    k = tl.program_id(1)  # chunk of that row's tokens
    b = tl.program_id(2).to(tl.int64)  # sample
    offs = tl.arange(0, BLOCK_C)
    msk = offs < C
    if HAS_W:
        w = tl.load(W + offs, mask=msk, other=0.0).to(ISL)
    if HAS_B:
        bias = tl.load(BIAS + offs, mask=msk, other=0.0).to(ISL)
    if HAS_MOD:
        sc1 = 1.0 + tl.load(SC + b * s_scb + t * s_sct + offs, mask=msk, other=0.0).to(MDT)
    acc_sh = tl.zeros([BLOCK_C], dtype=MDT)
    acc_sc = tl.zeros([BLOCK_C], dtype=MDT)
    acc_w = tl.zeros([BLOCK_C], dtype=ISL)
    acc_b = tl.zeros([BLOCK_C], dtype=ISL)
    s, e = chunk_range(BOUNDS, t, k, L, K, HAS_IDX)
    nxt = first_token(ORDER, s, e, HAS_IDX)
    for pos in range(s, e):
        row, nxt = token_row(b, L, pos, nxt, ORDER, e, HAS_IDX)
        x_raw = tl.load(X + row * C + offs, mask=msk, other=0.0)
        x = x_raw.to(ISL)
        mu = tl.sum(x, axis=0) / C
        d = tl.where(msk, x - mu, 0.0)
        r = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
        n = d * r  # n̂, unrounded
        gy = tl.load(GY + row * C + offs, mask=msk, other=0.0)
        if HAS_MOD:
            g = gy.to(MDT)
            if NEED_MOD:
                na = n
                if HAS_W:
                    na = na * w
                if HAS_B:
                    na = na + bias
                acc_sh += g
                acc_sc += g * na.to(x_raw.dtype).to(MDT)  # n as the forward rounded it
            gn = (g * sc1).to(x_raw.dtype).to(ISL)
        else:
            gn = gy.to(x_raw.dtype).to(ISL)
        if NEED_AFF:
            acc_w += gn * n
            acc_b += gn
        if HAS_W:
            gn = gn * w
        if NEED_DX:
            dx = r * (gn - tl.sum(gn, axis=0) / C - n * (tl.sum(gn * n, axis=0) / C))
            tl.store(DX + row * C + offs, dx.to(x_raw.dtype), mask=msk)
    part = ((b * tl.num_programs(0) + t) * K + k) * C + offs
    if NEED_MOD:
        tl.store(PSH + part, acc_sh, mask=msk)
        tl.store(PSC + part, acc_sc, mask=msk)
    if NEED_AFF:
        tl.store(PW + part, acc_w, mask=msk)
        tl.store(PB + part, acc_b, mask=msk)


def _triton_fwd(x, tx, shift, tshift, scale, tscale, *, eps, weight=None, bias=None, index=None,
                out_dtype=None) -> Pair:
    b, length, c = x.shape
    x, tx = x.contiguous(), (None if tx is None else tx.contiguous())
    has_mod = scale is not None
    mdt = scale.dtype if has_mod else island(x.dtype)
    od = out_dtype or (mdt if has_mod else x.dtype)
    has_ty = tx is not None or tshift is not None or tscale is not None
    y = torch.empty(b, length, c, dtype=od, device=x.device)
    ty = torch.empty_like(y) if has_ty else None
    (sh, s_shb, s_sht), (tsh, s_tshb, s_tsht) = rows(shift), rows(tshift)
    (sc, s_scb, s_sct), (tsc, s_tscb, s_tsct) = rows(scale), rows(tscale)
    block = triton.next_power_of_2(c)
    _ln_mod_fwd[(b * length,)](
        x, tx, weight, bias, sh, tsh, sc, tsc, index, y, ty, length, c, eps,
        s_shb, s_sht, s_tshb, s_tsht, s_scb, s_sct, s_tscb, s_tsct,
        ISL=TL[island(x.dtype)], MDT=TL[mdt], HAS_TX=tx is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, HAS_MOD=has_mod, HAS_TSH=tshift is not None, HAS_TSC=tscale is not None,
        HAS_IDX=index is not None, HAS_TY=has_ty, BLOCK_C=block, num_warps=num_warps(block), **OPTS)
    return y, ty


def _triton_bwd(gy, need, x, tx, shift, tshift, scale, tscale, weight, bias, *, eps, index=None, out_dtype=None):
    """Gradients of ``(x, tx, shift, tshift, scale, tscale, weight, bias)`` (None where not needed)."""
    nx, nsh, nsc, nw, nb = need[0], need[2], need[4], need[6], need[7]
    b, length, c = x.shape
    x, gy = x.contiguous(), gy.contiguous()
    has_mod = scale is not None
    tm = scale.shape[1] if has_mod else 1
    order, bounds, chunks = row_split(x, index if has_mod else None, tm)
    isl = island(x.dtype)
    mdt = scale.dtype if has_mod else isl
    need_mod, need_aff = nsh or nsc, nw or nb
    dx = torch.empty_like(x) if nx else None
    part = lambda on, dt: torch.empty(b, tm, chunks, c, dtype=dt, device=x.device) if on else None  # noqa: E731
    psh, psc = part(need_mod, mdt), part(need_mod, mdt)
    pw, pb = part(need_aff, isl), part(need_aff, isl)  # partial sums [B, Tm, chunks, C]
    sc, s_scb, s_sct = rows(scale)
    block = triton.next_power_of_2(c)
    _ln_mod_bwd[(tm, chunks, b)](
        x, gy, weight, bias, sc, order, bounds, dx, psh, psc, pw, pb, length, c, chunks, eps, s_scb, s_sct,
        ISL=TL[isl], MDT=TL[mdt], HAS_W=weight is not None, HAS_B=bias is not None, HAS_MOD=has_mod,
        HAS_IDX=order is not None, NEED_DX=nx, NEED_MOD=need_mod, NEED_AFF=need_aff, BLOCK_C=block,
        num_warps=num_warps(block), **OPTS)
    dsh = psh.sum(2).to(shift.dtype) if nsh else None  # [B, Tm, C]
    dsc = psc.sum(2).to(scale.dtype) if nsc else None
    dw = pw.sum((0, 1, 2)).to(weight.dtype) if nw else None
    db = pb.sum((0, 1, 2)).to(bias.dtype) if nb else None
    return dx, None, dsh, None, dsc, None, dw, db


def _check(x, tx, shift, tshift, scale, tscale, weight, bias, index) -> None:
    """One clear error line for a malformed call."""
    if x.dim() != 3:
        raise ValueError(f"layer_norm_modulate: x must be [B, L, C], got {tuple(x.shape)}")
    b, length, c = x.shape
    if (shift is None) != (scale is None):
        raise ValueError("layer_norm_modulate: shift and scale are given together or not at all")
    if tx is not None and tx.shape != x.shape:
        raise ValueError(f"layer_norm_modulate: tx {tuple(tx.shape)} must match x {tuple(x.shape)}")
    for name, m in (("shift", shift), ("tshift", tshift), ("scale", scale), ("tscale", tscale)):
        if m is None:
            continue
        rows = 1 if index is None else None
        if m.dim() != 3 or m.shape[0] != b or m.shape[2] != c or (rows is not None and m.shape[1] != rows):
            raise ValueError(f"layer_norm_modulate: {name} must be [B={b}, Tm, C={c}] (Tm = 1 without index), "
                             f"got {tuple(m.shape)}")
    if index is not None and (index.dim() != 1 or index.shape[0] != length):
        raise ValueError(f"layer_norm_modulate: index must be [L={length}], got {tuple(index.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (c,):
            raise ValueError(f"layer_norm_modulate: {name} must be [C={c}], got {tuple(p.shape)}")


def _unsupported(x, shift, scale) -> str | None:
    if x.dtype not in TL:
        return f"x dtype {x.dtype}"
    if scale is not None and scale.dtype not in (torch.float32, torch.float64):
        return f"modulation dtype {scale.dtype} (float32/float64 only)"
    if scale is not None and shift.dtype != scale.dtype:
        return "shift and scale dtypes differ"
    if x.shape[-1] > 16384:
        return f"width {x.shape[-1]} > 16384"
    return None


def layer_norm_modulate(x: Tensor, tx: Tensor | None, shift: Tensor | None, tshift: Tensor | None,
                        scale: Tensor | None, tscale: Tensor | None, *, eps: float, weight: Tensor | None = None,
                        bias: Tensor | None = None, index: Tensor | None = None,
                        out_dtype: torch.dtype | None = None, impl: str | None = None) -> Pair:
    """``(LN(x)·(1 + scale) + shift, tangent | None)`` for ``x [B, L, C]`` and ``shift``/``scale [B, Tm, C]``
    (``Tm`` = 1, or rows picked per token by ``index [L]``); without ``shift``/``scale``, LN alone. Precision and
    tangent as :func:`.reference.layer_norm_modulate_reference`; the primal is differentiable in ``x``,
    ``shift``, ``scale``, ``weight`` and ``bias`` (backward: see :mod:`._dispatch`)."""
    _check(x, tx, shift, tshift, scale, tscale, weight, bias, index)
    kw = dict(eps=eps, index=index, out_dtype=out_dtype)
    args = (x, tx, shift, tshift, scale, tscale, weight, bias)
    if resolve_impl(x, impl, lambda: _unsupported(x, shift, scale)) == "reference":
        return _reference(*args, **kw)
    return fused_apply(_fast, _reference, args, (True, False, True, False, True, False, True, True), kw, _triton_bwd)


def _fast(x, tx, shift, tshift, scale, tscale, weight, bias, **kw) -> Pair:
    return _triton_fwd(x, tx, shift, tshift, scale, tscale, weight=weight, bias=bias, **kw)


def _reference(x, tx, shift, tshift, scale, tscale, weight, bias, **kw) -> Pair:
    return layer_norm_modulate_reference(x, tx, shift, tshift, scale, tscale, weight=weight, bias=bias, **kw)
