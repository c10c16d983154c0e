"""Public attention entry points: one ``torch.autograd.Function`` with forward, backward and a forward-AD rule.

Layout legend: B batch, L sequence (Lq queries, Lk keys), H heads, D head dim; tensors are ``[B, L, H, D]``.

Dispatch (``impl``, or the environment variable ``RCM_JVP_IMPL``):
  * ``"auto"`` (default): the fused Triton kernels on CUDA when the call is supported, else the reference math;
  * ``"triton"``: the Triton kernels, or an error naming why the call is unsupported (on CPU this needs
    ``TRITON_INTERPRET=1``, which the tests use);
  * ``"reference"``: plain torch math (:mod:`.reference`).
Plain attention (no tangents) can instead go through a library backend (SDPA cuDNN/flash/efficient, FlexAttention,
flash-attn) chosen by ``backend=`` or ``RCM_ATTENTION_BACKEND``; see :mod:`.backends`. JVP calls always use the
fused kernel or the reference, since the library backends have no fused tangent.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .reference import attention_reference, attention_reference_backward, softmax_scale

_IMPLS = ("auto", "triton", "reference")


def _triton():
    from . import triton_jvp  # imported lazily: keeps CPU-only users free of triton

    return triton_jvp


def _resolve_impl(q: Tensor, k: Tensor, v: Tensor, tangents, mask, impl: str | None) -> str:
    impl = impl or os.environ.get("RCM_JVP_IMPL", "auto")
    if impl not in _IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; choose one of {_IMPLS}")
    if impl == "reference" or (impl == "auto" and not q.is_cuda):
        return "reference"
    try:
        reason = _triton().unsupported_reason(q, k, v, tangents, mask)
    except ImportError as err:  # triton missing: only a forced "triton" is an error
        reason = f"triton is not importable ({err}); install triton>=3.6"
    if reason is None:
        return "triton"
    if impl == "triton":
        raise ValueError(f"impl='triton' cannot run this attention call: {reason}")
    return "reference"


def _forward(impl: str, q, k, v, tq, tk, tv, scale: float, mask):
    """``(out, tangent | None, lse)`` from the chosen implementation."""
    if impl == "triton":
        r = _triton().jvp_attention_fwd(q, k, v, tq, tk, tv, scale=scale, block_mask=mask)
    else:
        r = attention_reference(q, k, v, tq, tk, tv, scale=scale, mask=mask)
    return r.out, r.tangent, r.lse


class _JVPAttention(torch.autograd.Function):
    """Outputs ``(out, tangent_out | None, lse)``; only ``out`` is differentiable (backward and forward AD)."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, scale, mask, impl):
        return _forward(impl, q, k, v, tq, tk, tv, scale, mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, scale, mask, impl = inputs
        out, tangent, lse = output
        ctx.scale, ctx.mask, ctx.impl = scale, mask, impl
        ctx.mark_non_differentiable(*(t for t in (tangent, lse) if t is not None))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def backward(ctx, grad_out, _grad_tangent, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.impl == "triton":
            dq, dk, dv = _triton().attention_bwd(grad_out, q, k, v, out, lse, scale=ctx.scale, block_mask=ctx.mask)
        else:
            dq, dk, dv = attention_reference_backward(q, k, v, out, lse, grad_out, scale=ctx.scale, mask=ctx.mask)
        return dq, dk, dv, None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, q_dot, k_dot, v_dot, *_):
        # The forward pass already returned O; the fused kernel recomputes it next to Ȯ (4/3 of a fused
        # jvp_attention call). Networks call jvp_attention directly and pay 3x a forward, not 4x.
        q, k, v = ctx.saved_tensors
        _, out_dot, _ = _forward(ctx.impl, q, k, v, q_dot, k_dot, v_dot, ctx.scale, ctx.mask)
        if out_dot is None:
            out_dot = torch.zeros_like(q[..., :1]).expand(*q.shape[:-1], v.shape[-1])
        return out_dot, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, block_mask=None,
              impl: str | None = None, backend: str | None = None) -> Tensor:
    """Softmax attention ``[B, Lq, H, D] x [B, Lk, H, D] -> [B, Lq, H, D]``, differentiable both ways.

    ``block_mask``: None, a :mod:`rcm_kernels.blockmask` mask, or a boolean ``[.., Lq, Lk]`` tensor (True =
    attend; reference path only). ``torch.func.jvp`` / ``forward_ad`` through this function use the fused JVP
    kernel; plain autograd uses the saved LSE. ``backend`` (or ``RCM_ATTENTION_BACKEND``) routes the plain call
    to a library backend instead (see :mod:`.backends`); ``impl`` picks triton/reference (module docstring).
    """
    from .backends import resolve_backend, sdpa_like_attention

    name = resolve_backend(backend)
    if name != "rcm":
        return sdpa_like_attention(q, k, v, scale=scale, block_mask=block_mask, backend=name)
    impl = _resolve_impl(q, k, v, (), block_mask, impl)
    return _JVPAttention.apply(q, k, v, None, None, None, softmax_scale(q.shape[-1], scale), block_mask, impl)[0]


def jvp_attention(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None = None, tk: Tensor | None = None,
                  tv: Tensor | None = None, *, scale: float | None = None, block_mask=None,
                  impl: str | None = None) -> tuple[Tensor, Tensor | None]:
    """Attention and its tangent in one fused pass: returns ``(out, tangent_out)``, both ``[B, Lq, H, D]``.

    ``None`` tangents mean zero and cost nothing; with all three None this is :func:`attention` and
    ``tangent_out`` is None. ``out`` is differentiable (backward of the primal); ``tangent_out`` is detached.
    """
    tangents = (tq, tk, tv)
    if all(t is None for t in tangents):
        return attention(q, k, v, scale=scale, block_mask=block_mask, impl=impl), None
    impl = _resolve_impl(q, k, v, tangents, block_mask, impl)
    out, tangent, _ = _JVPAttention.apply(q, k, v, tq, tk, tv, softmax_scale(q.shape[-1], scale), block_mask, impl)
    return out, tangent.detach()
