"""Plain (primal-only) attention through library kernels, chosen by name or ``RCM_ATTENTION_BACKEND``.

Names:
  * ``"rcm"`` (default): our own autograd Function (Triton on CUDA, reference elsewhere; forward AD works);
  * ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention``, letting torch pick the kernel;
  * ``"cudnn"`` / ``"flash"`` / ``"efficient"`` / ``"math"``: SDPA pinned to one kernel;
  * ``"flex"``: ``torch.nn.attention.flex_attention`` (compiled) with the mask's Flex ``BlockMask``;
    ``"flex_fa4"`` the same with the flash-attn-4 CuTeDSL backend (``pip install flash-attn-4``, Hopper+);
  * ``"flash_attn"``: the ``flash_attn`` package (FA3 ``flash_attn_interface`` when importable, else FA2).
All take ``[B, L, H, D]`` tensors and return ``[B, Lq, H, D]``; gradients flow through each library's own backward.
Masks: ``rcm_kernels.blockmask`` masks become a dense boolean ``attn_mask`` for SDPA (efficient/math/cudnn
kernels accept one; flash does not) and a Flex ``BlockMask`` for Flex; ``flash_attn`` takes no mask.
"""

from __future__ import annotations

import functools
import os

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
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(q: Tensor, k: Tensor, v: Tensor, scale: float, block_mask, fa4: bool) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention  # imported lazily: ~2 s

    if block_mask is not None and not hasattr(block_mask, "flex"):
        raise TypeError("backend 'flex' needs a rcm_kernels.blockmask mask (or None), not a dense tensor")
    bm = None if block_mask is None else block_mask.flex(q.shape[1], k.shape[1], q.device)
    kwargs = {}
    if fa4:
        try:
            import flash_attn.cute  # noqa: F401  (flash-attn-4 ships the CuTeDSL kernels)
        except ImportError as err:
            raise ImportError("backend 'flex_fa4' needs flash-attn-4: pip install --pre flash-attn-4") from err
        kwargs["kernel_options"] = {"BACKEND": "FLASH"}
    fn = _compiled_flex() if q.is_cuda else flex_attention
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    return fn(qh, kh, vh, block_mask=bm, scale=scale, **kwargs).transpose(1, 2)


def _flash_attn(q: Tensor, k: Tensor, v: Tensor, scale: float, block_mask) -> Tensor:
    if block_mask is not None:
        raise ValueError("backend 'flash_attn' takes no block mask; use 'rcm' or 'flex' for masked attention")
    try:
        from flash_attn_interface import flash_attn_func  # FA3 (Hopper)
    except ImportError:
        try:
            from flash_attn import flash_attn_func  # FA2
        except ImportError as err:
            raise ImportError("backend 'flash_attn' needs the flash-attn package: pip install flash-attn "
                              "--no-build-isolation (FA2), or build FA3 from its hopper/ folder") from err
    o = flash_attn_func(q, k, v, softmax_scale=scale)  # takes [B, L, H, D] directly
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
