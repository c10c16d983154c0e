"""Shared plumbing of the fused ops: which implementation runs, and the autograd Function that wraps them.

Dispatch (``impl=``, or the environment variable ``RCM_FUSED_IMPL``): ``"auto"`` (default) runs the Triton
kernel on CUDA when the call is supported and the reference twin otherwise; ``"triton"`` forces the kernel (an
error naming why if it cannot run; CPU tensors need ``TRITON_INTERPRET=1``); ``"reference"`` forces the twin.

Backward: when the forward ran the kernel, the gradient comes from the op's Triton backward (``bwd``): one pass
over the saved inputs (norm statistics recomputed from the row, nothing else saved) writes the row gradients,
and the per-channel gradients of the modulation rows and norm weights are per-program partial sums, added up
by a small deterministic ``sum`` (no atomics). The formulas follow autograd through the reference twin, casts
included (docs/kernels.md, fused ops). ``RCM_FUSED_BACKWARD=reference`` (read at the forward) keeps the
recompute backward instead: the reference twin is recomputed from the saved inputs and differentiated by
autograd (plain torch; the gradient of the unfused math by construction). Only the inputs are saved either way.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad

_IMPLS = ("auto", "triton", "reference")
_BACKWARDS = ("triton", "reference")


def resolve_impl(x: Tensor, impl: str | None, unsupported: Callable[[], str | None]) -> str:
    """``"triton"`` or ``"reference"`` for a call on ``x``; ``unsupported()`` returns why Triton cannot run."""
    impl = impl or os.environ.get("RCM_FUSED_IMPL", "auto")
    if impl not in _IMPLS:
        raise ValueError(f"fused ops: unknown impl {impl!r} (RCM_FUSED_IMPL or impl=); one of {_IMPLS}")
    if impl == "reference" or (impl == "auto" and not x.is_cuda):
        return "reference"
    reason = unsupported()
    if reason is None:
        return "triton"
    if impl == "triton":
        raise ValueError(f"fused ops: impl='triton' cannot run this call: {reason}")
    return "reference"


def backward_impl() -> str:
    """``"triton"`` (default) or ``"reference"``: the backward of a kernel forward (``RCM_FUSED_BACKWARD``)."""
    impl = os.environ.get("RCM_FUSED_BACKWARD", "triton")
    if impl not in _BACKWARDS:
        raise ValueError(f"fused ops: RCM_FUSED_BACKWARD={impl!r} is not one of {_BACKWARDS}")
    return impl


class _FusedOp(torch.autograd.Function):
    """Outputs ``(primal, tangent | None)`` of ``fast(*args, **kw)``. The primal's backward is
    ``bwd(grad_y, need, *args, **kw)`` (one gradient or None per argument; tangent arguments are None), or,
    with ``bwd=None``, autograd through ``ref(*args, **kw)`` recomputed with every tangent argument None."""

    @staticmethod
    def forward(ctx, fast, ref, bwd, kw, is_primal, *args):
        ctx.ref, ctx.bwd, ctx.kw, ctx.is_primal = ref, bwd, kw, is_primal
        ctx.save_for_backward(*(a if p else None for a, p in zip(args, is_primal)))
        y, ty = fast(*args, **kw)
        if ty is not None:
            ctx.mark_non_differentiable(ty)
        return y, ty

    @staticmethod
    def backward(ctx, grad_y, _grad_ty):
        saved = ctx.saved_tensors
        need = tuple(n and a is not None for a, n in zip(saved, ctx.needs_input_grad[5:]))
        if ctx.bwd is not None:
            return (None, None, None, None, None, *ctx.bwd(grad_y, need, *saved, **ctx.kw))
        with torch.enable_grad():
            inputs = [None if a is None else (a.detach().requires_grad_(True) if n else a.detach())
                      for a, n in zip(saved, need)]
            y, _ = ctx.ref(*inputs, **ctx.kw)
            wrt = [a for a, n in zip(inputs, need) if n]
            grads = iter(torch.autograd.grad(y, wrt, grad_y, allow_unused=True))
        return (None, None, None, None, None, *(next(grads) if n else None for n in need))


def _transformed(t) -> bool:
    """True for a tensor under a torch.func transform or carrying a forward-AD tangent."""
    if not isinstance(t, Tensor):
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or forward_ad.unpack_dual(t).tangent is not None


def fused_apply(fast: Callable, ref: Callable, args: tuple, is_primal: tuple[bool, ...], kw: dict,
                bwd: Callable | None = None):
    """``fast(*args, **kw)``, through the autograd Function only when a primal input needs a gradient; its
    backward is ``bwd`` (the Triton backward) unless :func:`backward_impl` says ``"reference"``.

    Under ``torch.func`` transforms or ``forward_ad`` (the generic ``torch.func.jvp`` fallbacks of the losses)
    the reference twin runs instead: plain torch ops, so the transform sees through it.
    """
    if any(_transformed(t) for t in (*args, *kw.values())):
        return ref(*args, **kw)
    if torch.is_grad_enabled() and any(p and isinstance(a, Tensor) and a.requires_grad
                                       for a, p in zip(args, is_primal)):
        return _FusedOp.apply(fast, ref, bwd if backward_impl() == "triton" else None, kw, is_primal, *args)
    with torch.no_grad():
        return fast(*args, **kw)
