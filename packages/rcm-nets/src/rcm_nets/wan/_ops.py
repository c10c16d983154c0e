"""Primitives of the Wan DiT with an optional forward-mode tangent, written out by hand.

Every function takes primal tensors and their tangents (``t<name>``) and returns ``(primal, tangent)``. A
``None`` tangent means zero: it costs nothing and yields ``None`` when every input tangent is ``None``, so
the plain forward is the same code with all tangents ``None`` (the primal of the JVP pass is bit-identical
to the plain forward). Tangents are computed under ``torch.no_grad()``: they never build an autograd graph,
while the primal keeps the caller's grad mode.

Precision: ``island(dtype)`` is the dtype of the fp32 islands (float32, or float64 for float64 params).
Linear layers run in their weight's dtype (inputs are cast to it), or in ``compute`` when given.

Fused ops: ``layer_norm_modulate``, ``gated_residual``, ``gelu_tanh`` (here), the q/k RMSNorm + RoPE
(``_blocks._project``) and ``_rope.apply_rope`` run the fused Triton kernels of ``rcm_kernels.fused`` (primal
and tangent in one pass, same precision) when :func:`use_fused` says so, else the unfused functions below. One switch: the module attribute
``fused_ops_mode`` (initialized from the environment variable ``RCM_FUSED_OPS``; scoped with :func:`fused_ops`):
``"auto"`` (default) fuses on CUDA tensors, ``"on"`` fuses everywhere (off CUDA the reference twins of
``rcm_kernels.fused`` run), ``"off"`` never fuses (docs/kernels.md, fused ops).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from rcm_kernels.fused.reference import add_tangents as add
from rcm_kernels.fused.reference import gelu_tanh_reference, island, mod_rows

Pair = tuple[Tensor, Tensor | None]


FUSED_MODES = ("auto", "on", "off")
fused_ops_mode: str = os.environ.get("RCM_FUSED_OPS", "auto")


def use_fused(x: Tensor) -> bool:
    """Whether an op on ``x`` takes the fused kernels (``fused_ops_mode``, see the module docstring)."""
    if fused_ops_mode not in FUSED_MODES:
        raise ValueError(f"RCM_FUSED_OPS / fused_ops_mode: {fused_ops_mode!r} is not one of {FUSED_MODES}")
    return fused_ops_mode == "on" or (fused_ops_mode == "auto" and x.is_cuda)


@contextmanager
def fused_ops(mode: str) -> Iterator[None]:
    """Run the enclosed code with ``fused_ops_mode = mode`` (``"auto"``, ``"on"`` or ``"off"``)."""
    global fused_ops_mode
    if mode not in FUSED_MODES:
        raise ValueError(f"fused_ops: mode {mode!r} is not one of {FUSED_MODES}")
    old, fused_ops_mode = fused_ops_mode, mode
    try:
        yield
    finally:
        fused_ops_mode = old


def cast(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x.to(dtype)


def linear(x: Tensor, tx: Tensor | None, weight: Tensor, bias: Tensor | None,
           compute: torch.dtype | None = None) -> Pair:
    """``y = x Wᵀ + b`` in ``compute`` (default: the weight dtype); tangent ``ẏ = ẋ Wᵀ``."""
    dt = weight.dtype if compute is None else compute
    w, b = weight.to(dt), (None if bias is None else bias.to(dt))
    y = F.linear(x.to(dt), w, b)
    if tx is None:
        return y, None
    with torch.no_grad():
        return y, F.linear(tx.to(dt), w)


def silu(x: Tensor, tx: Tensor | None) -> Pair:
    """SiLU; ``d/dx x·σ(x) = σ(x)·(1 + x·(1 − σ(x)))``."""
    y = F.silu(x)
    if tx is None:
        return y, None
    with torch.no_grad():
        s = torch.sigmoid(x)
        return y, tx * (s * (1 + x * (1 - s)))


def gelu_tanh(x: Tensor, tx: Tensor | None) -> Pair:
    """tanh-approximate GELU ``½x(1 + tanh u)``, ``u = c(x + 0.044715x³)``; derivative written out
    (``rcm_kernels.fused.reference.gelu_tanh_reference``, evaluated op by op in ``x.dtype``).

    Fused (one pass, the derivative in float32, rounded once) when :func:`use_fused`."""
    if use_fused(x):
        from rcm_kernels.fused import gelu_tanh as fused

        return fused(x, tx)
    return gelu_tanh_reference(x, tx)


def layer_norm(x: Tensor, tx: Tensor | None, eps: float, weight: Tensor | None = None,
               bias: Tensor | None = None) -> Pair:
    """LayerNorm over the last dim, statistics and affine in the island dtype, result cast to ``x.dtype``.

    Tangent: with ``n = (x − μ)·r``, ``ṅ = r·(ẋ − mean(ẋ) − n·mean(n·ẋ))``; affine scales it by ``weight``.
    """
    dt = island(x.dtype)
    xf = x.to(dt)
    w = None if weight is None else weight.to(dt)
    b = None if bias is None else bias.to(dt)
    y = F.layer_norm(xf, xf.shape[-1:], w, b, eps).to(x.dtype)
    if tx is None:
        return y, None
    with torch.no_grad():
        mu = xf.mean(-1, keepdim=True)
        r = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
        n = (xf - mu) * r
        t = tx.to(dt)
        tn = r * (t - t.mean(-1, keepdim=True) - n * (n * t).mean(-1, keepdim=True))
        if w is not None:
            tn = tn * w
        return y, tn.to(x.dtype)


def rms_norm(x: Tensor, tx: Tensor | None, weight: Tensor, eps: float) -> Pair:
    """Wan RMSNorm: ``(x·rsqrt(mean(x²) + eps))`` in the island dtype, cast to ``x.dtype``, times ``weight``.

    Tangent: with ``n = x·r``, ``ṅ = r·(ẋ − n·mean(n·ẋ))``, cast the same way, times ``weight``.
    """
    dt = island(x.dtype)
    xf = x.to(dt)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * r
    y = n.to(x.dtype) * weight
    if tx is None:
        return y, None
    with torch.no_grad():
        t = tx.to(dt)
        tn = r * (t - n * (n * t).mean(-1, keepdim=True))
        return y, tn.to(x.dtype) * weight


def modulate(n: Tensor, tn: Tensor | None, shift: Tensor, tshift: Tensor | None, scale: Tensor,
             tscale: Tensor | None) -> Pair:
    """AdaLN modulation ``n·(1 + scale) + shift`` in the dtype of ``scale`` (the fp32 island)."""
    nf = n.to(scale.dtype)
    y = nf * (1 + scale) + shift
    if tn is None and tshift is None and tscale is None:
        return y, None
    with torch.no_grad():
        return y, add(None if tn is None else tn.to(scale.dtype) * (1 + scale),
                      None if tscale is None else nf * tscale, tshift)


def gated(y: Tensor, ty: Tensor | None, gate: Tensor, tgate: Tensor | None,
          dtype: torch.dtype) -> Pair:
    """``y·gate`` computed in ``dtype`` (``gate`` is cast to it): the gated branch of a residual."""
    g = gate.to(dtype)
    out = y.to(dtype) * g
    if ty is None and tgate is None:
        return out, None
    with torch.no_grad():
        return out, add(None if ty is None else ty.to(dtype) * g,
                        None if tgate is None else y.to(dtype) * tgate.to(dtype))


def layer_norm_modulate(x: Tensor, tx: Tensor | None, eps: float, shift: Tensor | None = None,
                        tshift: Tensor | None = None, scale: Tensor | None = None, tscale: Tensor | None = None, *,
                        index: Tensor | None = None, weight: Tensor | None = None, bias: Tensor | None = None,
                        out_dtype: torch.dtype | None = None) -> Pair:
    """``modulate(layer_norm(x))`` (LN alone without ``shift``/``scale``), cast to ``out_dtype`` when given.

    ``x [B, L, C]``; ``shift``/``scale [B, Tm, C]`` with ``index [L]`` picking each token's row (Tm = 1 without
    it). Fused into one kernel when :func:`use_fused`; the unfused path is ``layer_norm`` then ``modulate``.
    """
    if use_fused(x):
        from rcm_kernels.fused import layer_norm_modulate as fused

        return fused(x, tx, shift, tshift, scale, tscale, eps=eps, weight=weight, bias=bias, index=index,
                     out_dtype=out_dtype)
    y, ty = layer_norm(x, tx, eps, weight, bias)
    if scale is not None:
        y, ty = modulate(y, ty, mod_rows(shift, index), mod_rows(tshift, index), mod_rows(scale, index),
                         mod_rows(tscale, index))
    return (y, ty) if out_dtype is None else (y.to(out_dtype), cast(ty, out_dtype))


def gated_residual(x: Tensor, tx: Tensor | None, y: Tensor, ty: Tensor | None, gate: Tensor | None,
                   tgate: Tensor | None, compute: torch.dtype, *, index: Tensor | None = None,
                   out_dtype: torch.dtype | None = None) -> Pair:
    """``x + y·gate``: ``gated`` in ``compute``, the sum in ``compute``, the result in ``out_dtype`` (default
    ``x.dtype``); ``gate [B, Tm, C]`` rows picked per token by ``index [L]``; ``gate=None``: ``x + y``.
    Fused when :func:`use_fused`."""
    od = out_dtype or x.dtype
    if use_fused(x):
        from rcm_kernels.fused import gated_residual as fused

        return fused(x, tx, y, ty, gate, tgate, compute=compute, index=index, out_dtype=od)
    if gate is None:
        g, tg = y.to(compute), cast(ty, compute)
    else:
        g, tg = gated(y, ty, mod_rows(gate, index), mod_rows(tgate, index), compute)
    return (x.to(compute) + g).to(od), cast(add(cast(tx, compute), tg), od)


def sinusoid(t: Tensor, tt: Tensor | None, dim: int) -> Pair:
    """Wan timestep embedding ``[cos(t·ω), sin(t·ω)]`` (cos first), ``ω_k = 10000^(−k/(dim/2))``.

    Computed in float64 from ``t`` (any shape, int or float; output ``[*t.shape, dim]``) and returned as
    float64: the caller casts it to its island dtype. Tangent: ``[−ω·sin(tω)·ṫ, ω·cos(tω)·ṫ]``.
    """
    half = dim // 2
    omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    ang = t.to(torch.float64)[..., None] * omega
    y = torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)
    if tt is None:
        return y, None
    with torch.no_grad():
        d = tt.to(torch.float64)[..., None] * omega
        return y, torch.cat([-torch.sin(ang) * d, torch.cos(ang) * d], dim=-1)
