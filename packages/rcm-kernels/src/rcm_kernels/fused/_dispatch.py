"""Shared plumbing of the fused ops: which implementation runs, and the autograd Function that wraps them.

Dispatch (``impl=``, or the environment variable ``RCM_FUSED_IMPL``): ``"auto"`` (default) runs the Triton
kernel on CUDA when the call is supported and the reference twin otherwise; ``"triton"`` forces the kernel (an
error naming why if it cannot run; CPU tensors need ``TRITON_INTERPRET=1``); ``"reference"`` forces the twin.

Backward: the kernels compute primal and tangent in one forward pass; the gradient of the primal is taken by
recomputing the reference twin from the saved inputs under autograd (plain torch). Why: the gradient is then
the one of the unfused math by construction (the same op sequence, rounding included), only the inputs are
saved (less memory than the unfused graph, which keeps its float32 intermediates), and the fused ops' main
customer is the no-grad JVP pass of the teacher. A Triton backward is future work (docs/kernels.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad

_IMPLS = ("auto", "triton", "reference")


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


class _FusedOp(torch.autograd.Function):
    """Outputs ``(primal, tangent | None)`` of ``fast(*args, **kw)``; the primal's backward runs autograd
    through ``ref(*args, **kw)`` recomputed with every tangent argument set to None."""

    @staticmethod
    def forward(ctx, fast, ref, kw, is_primal, *args):
        ctx.ref, ctx.kw, ctx.is_primal = ref, kw, is_primal
        ctx.save_for_backward(*(a if p else None for a, p in zip(args, is_primal)))
        y, ty = fast(*args, **kw)
        if ty is not None:
            ctx.mark_non_differentiable(ty)
        return y, ty

    @staticmethod
    def backward(ctx, grad_y, _grad_ty):
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[4:]
        with torch.enable_grad():
            inputs = [None if a is None else (a.detach().requires_grad_(True) if n else a.detach())
                      for a, n in zip(saved, need)]
            y, _ = ctx.ref(*inputs, **ctx.kw)
            wrt = [a for a, n in zip(inputs, need) if n and a is not None]
            grads = iter(torch.autograd.grad(y, wrt, grad_y, allow_unused=True))
        return (None, None, None, None, *(next(grads) if n and a is not None else None
                                          for a, n in zip(inputs, need)))


def _transformed(t) -> bool:
    """True for a tensor under a torch.func transform or carrying a forward-AD tangent."""
    if not isinstance(t, Tensor):
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or forward_ad.unpack_dual(t).tangent is not None


def fused_apply(fast: Callable, ref: Callable, args: tuple, is_primal: tuple[bool, ...], kw: dict):
    """``fast(*args, **kw)``, through the autograd Function only when a primal input needs a gradient.

    Under ``torch.func`` transforms or ``forward_ad`` (the generic ``torch.func.jvp`` fallbacks of the losses)
    the reference twin runs instead: plain torch ops, so the transform sees through it.
    """
    if any(_transformed(t) for t in (*args, *kw.values())):
        return ref(*args, **kw)
    if torch.is_grad_enabled() and any(p and isinstance(a, Tensor) and a.requires_grad
                                       for a, p in zip(args, is_primal)):
        return _FusedOp.apply(fast, ref, kw, is_primal, *args)
    with torch.no_grad():
        return fast(*args, **kw)
