"""Plain (primal-only) attention through library kernels, chosen by name or ``RCM_ATTENTION_BACKEND``.

Names:
  * ``"rcm"`` (default): our own autograd Function (Triton on CUDA, reference elsewhere; forward AD works);
  * ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, letting torch pick the kernel;
  * ``"cudnn"`` / ``"flash"`` / ``"efficient"`` / ``"math"``: SDPA pinned to one kernel;
  * ``"flex"``: ``torch.nn.attention.flex_attention`` with the mask's Flex ``BlockMask`` (compiled to a
    Triton kernel on CUDA; on CPU torch's eager, unfused path, forward only: torch has no CPU Flex backward);
    ``"flex_fa4"`` the same with ``kernel_options={"BACKEND": "FLASH"}``, torch's flash-attn-4 CuTeDSL
    backend (``pip install --pre flash-attn-4 nvidia-cutlass-dsl``; CUDA, Hopper or newer, bf16/fp16);
  * ``"flash_attn"``: the first importable of FA3 ``flash_attn_interface``, FA2 ``flash_attn`` and
    flash-attn-4 ``flash_attn.cute`` (unmasked only).
All take ``[B, L, H, D]`` tensors and return ``[B, Lq, H, D]``; gradients flow through each library's own backward.
Masks: ``rcm_kernels.blockmask`` masks become a dense boolean ``attn_mask`` for SDPA (efficient/math/cudnn
kernels accept one; flash does not) and a Flex ``BlockMask`` (``mask.flex(Lq, Lk, device)``: the tile table
as block lists plus an interval ``mask_mod`` for the partial tiles) for Flex; ``flash_attn`` takes no mask.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import dense_mask, softmax_scale

__all__ = ["BACKENDS", "resolve_backend", "sdpa_like_attention"]

BACKENDS = ("rcm", "sdpa", "cudnn", "flash", "efficient", "math", "flex", "flex_fa4", "flash_attn")


def resolve_backend(name: str | None = None) -> str:
    """The backend name to use: ``name``, else ``$RCM_ATTENTION_BACKEND``, else ``"rcm"``."""
    name = name or os.environ.get("RCM_ATTENTION_BACKEND") or "rcm"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (RCM_ATTENTION_BACKEND?); choose one of {BACKENDS}")
    return name


def _sdpa_kernel(name: str):
    from torch.nn.attention import SDPBackend

    return {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float, block_mask, name: str) -> Tensor:
    from torch.nn.attention import sdpa_kernel

    mask = dense_mask(block_mask, q.shape[1], k.shape[1], q.device)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D] views, no copies
    if name == "sdpa":
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    else:
        with sdpa_kernel(_sdpa_kernel(name)):
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


@functools.cache
def _compiled_flex(name: str):
    """One compiled ``flex_attention`` per backend name (each keeps its own recompile budget)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, scale: float, block_mask, fa4: bool) -> Tensor:
    name = "flex_fa4" if fa4 else "flex"
    if block_mask is not None and not hasattr(block_mask, "flex"):
        raise TypeError(f"backend {name!r} needs a rcm_kernels.blockmask mask (or None), not a dense tensor")
    kwargs = {}
    if fa4:
        if not q.is_cuda:
            raise ValueError(f"backend 'flex_fa4' runs on CUDA only (got {q.device} tensors); use 'flex' here")
        try:
            import flash_attn.cute  # noqa: F401  (flash-attn-4 ships the CuTeDSL kernels)
        except ImportError as err:
            raise ImportError("backend 'flex_fa4' needs flash-attn-4 (flash_attn.cute): "
                              "pip install --pre flash-attn-4 nvidia-cutlass-dsl") from err
        kwargs["kernel_options"] = {"BACKEND": "FLASH"}
    elif q.device.type == "cpu" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise NotImplementedError("backend 'flex' has no backward on CPU (torch FlexAttention limitation); "
                                  "use backend 'rcm' or 'sdpa' for gradients here")
    from torch.nn.attention.flex_attention import flex_attention  # imported lazily: ~2 s

    bm = None if block_mask is None else block_mask.flex(q.shape[1], k.shape[1], q.device)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, D] views
    if q.is_cuda:
        o = _compiled_flex(name)(qh, kh, vh, block_mask=bm, scale=scale, **kwargs)
    else:
        with warnings.catch_warnings():  # the eager path warns that it is unfused: that is the point here
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            o = flex_attention(qh, kh, vh, block_mask=bm, scale=scale)
    return o.transpose(1, 2)


def _flash_attn_func():
    """The first importable ``flash_attn_func``: FA3, FA2, then flash-attn-4's CuTeDSL one."""
    try:
        from flash_attn_interface import flash_attn_func  # FA3 (Hopper)

        return flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # FA2

        return flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn.cute import flash_attn_func  # flash-attn-4 (CuTeDSL, Hopper+)

        return flash_attn_func
    except ImportError as err:
        raise ImportError("backend 'flash_attn' needs the flash-attn package: pip install flash-attn "
                          "--no-build-isolation (FA2), pip install --pre flash-attn-4 (FA4), or build FA3 "
                          "from its hopper/ folder") from err


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, scale: float, block_mask) -> Tensor:
    if block_mask is not None:
        raise ValueError("backend 'flash_attn' takes no block mask; use 'rcm' or 'flex' for masked attention")
    o = _flash_attn_func()(q, k, v, softmax_scale=scale)  # takes [B, L, H, D] directly
    return o[0] if isinstance(o, tuple) else o


def sdpa_like_attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, block_mask=None,
                        backend: str | None = None) -> Tensor:
    """Primal attention ``[B, Lq, H, D]`` through the named library backend (module docstring)."""
    name = resolve_backend(backend)
    scale = softmax_scale(q.shape[-1], scale)
    if name == "rcm":
        from .jvp import attention

        return attention(q, k, v, scale=scale, block_mask=block_mask, backend="rcm")
    if name in ("flex", "flex_fa4"):
        return _flex(q, k, v, scale, block_mask, fa4=name == "flex_fa4")
    if name == "flash_attn":
        return _flash_attn(q, k, v, scale, block_mask)
    return _sdpa(q, k, v, scale, block_mask, name)
