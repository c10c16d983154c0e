"""Fused tanh-approximate GELU with its tangent (Triton): the FFN activation, ``½x(1 + tanh u)`` with
``u = c(x + 0.044715x³)``, ``c = √(2/π)``. Reference twin: :func:`.reference.gelu_tanh_reference`.

Elementwise over the flattened input (the FFN hidden ``[B, L, F]``, F = 8960 at 1.3B, the widest activation of
the block). Written with ``½(1 + tanh u) = σ(2u)``: ``y = x·σ(2u)`` and
``dy/dx = σ(2u) + 2x·σ(2u)(1 − σ(2u))·c(1 + 3·0.044715x²)``, evaluated in float32 (float64 for float64 input)
and rounded once to ``x.dtype``; the unfused tangent evaluates the same formula op by op in ``x.dtype``, so in
bf16 the two tangents differ by the unfused op's accumulated rounding (the kernel's is the more accurate).
Backward (:func:`_gelu_bwd`): ``∂x = g·dy/dx``, the same derivative, in float32, rounded once (as torch's
``gelu`` backward does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._dispatch import fused_apply, resolve_impl
from ._launch import OPTS, TL
from .reference import Pair, gelu_tanh_reference, island

__all__ = ["gelu_tanh"]

_BLOCK = 2048


@triton.jit
def _sigma_2u(x):
    return tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))  # σ(2u), 2c = 2·sqrt(2/π)


@triton.jit
def _derivative(x, s):
    """``dy/dx`` from ``x`` and ``s = σ(2u)``."""
    return s + 1.5957691216057308 * x * s * (1.0 - s) * (1.0 + 3.0 * 0.044715 * x * x)


@triton.jit
def _gelu_fwd(X, TX, Y, TY, N, ISL: tl.constexpr, HAS_TX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < N
    x_raw = tl.load(X + offs, mask=msk, other=0.0)
    x = x_raw.to(ISL)
    s = _sigma_2u(x)
    tl.store(Y + offs, (x * s).to(x_raw.dtype), mask=msk)
    if HAS_TX:
        t = tl.load(TX + offs, mask=msk, other=0.0).to(ISL)
        tl.store(TY + offs, (t * _derivative(x, s)).to(x_raw.dtype), mask=msk)


@triton.jit
def _gelu_bwd(X, GY, DX, N, ISL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < N
    x_raw = tl.load(X + offs, mask=msk, other=0.0)
    x = x_raw.to(ISL)
    g = tl.load(GY + offs, mask=msk, other=0.0).to(ISL)
    tl.store(DX + offs, (g * _derivative(x, _sigma_2u(x))).to(x_raw.dtype), mask=msk)


def _triton_fwd(x: Tensor, tx: Tensor | None) -> Pair:
    x, tx = x.contiguous(), (None if tx is None else tx.contiguous())
    y = torch.empty_like(x)
    ty = None if tx is None else torch.empty_like(x)
    n = x.numel()
    _gelu_fwd[(triton.cdiv(n, _BLOCK),)](x, tx, y, ty, n, ISL=TL[island(x.dtype)], HAS_TX=tx is not None,
                                         BLOCK=_BLOCK, num_warps=8, **OPTS)
    return y, ty


def _triton_bwd(gy: Tensor, need, x: Tensor, tx: Tensor | None) -> tuple[Tensor | None, None]:
    if not need[0]:
        return None, None
    x, gy = x.contiguous(), gy.contiguous()
    dx = torch.empty_like(x)
    n = x.numel()
    _gelu_bwd[(triton.cdiv(n, _BLOCK),)](x, gy, dx, n, ISL=TL[island(x.dtype)], BLOCK=_BLOCK, num_warps=8, **OPTS)
    return dx, None


def gelu_tanh(x: Tensor, tx: Tensor | None, *, impl: str | None = None) -> Pair:
    """``(gelu_tanh(x), gelu_tanh'(x)·ẋ | None)`` for ``x`` of any shape; differentiable in ``x``."""
    if tx is not None and tx.shape != x.shape:
        raise ValueError(f"gelu_tanh: tx {tuple(tx.shape)} must match x {tuple(x.shape)}")
    if resolve_impl(x, impl, lambda: None if x.dtype in TL else f"x dtype {x.dtype}") == "reference":
        return gelu_tanh_reference(x, tx)
    return fused_apply(_triton_fwd, gelu_tanh_reference, (x, tx), (True, False), {}, _triton_bwd)
