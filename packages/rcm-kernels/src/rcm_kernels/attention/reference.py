"""Reference attention and its JVP in plain torch (any device, any dtype).

Layout legend: B batch, L sequence (Lq queries, Lk keys), H heads, D head dim. Inputs are ``[B, L, H, D]``.
This is the math every fast path is checked against (in float64) and falls back to off CUDA.

JVP of softmax attention (S = s·QKᵀ, P = softmax(S), O = PV), for tangents (Q̇, K̇, V̇):
    Ṡ = s·(Q̇Kᵀ + QK̇ᵀ),   Ȯ = P V̇ + (P⊙Ṡ) V − rowsum(P⊙Ṡ) ⊙ O.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class AttentionOutput(NamedTuple):
    out: Tensor  # [B, Lq, H, D]
    tangent: Tensor | None  # [B, Lq, H, D] or None when every input tangent is None
    lse: Tensor  # [B, H, Lq] float32 (natural log-sum-exp of the scaled logits)


def softmax_scale(head_dim: int, scale: float | None) -> float:
    """The logit scale: ``scale``, or ``1/sqrt(head_dim)`` when None (every attention entry point's default)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def dense_mask(mask, lq: int, lk: int, device: torch.device) -> Tensor | None:
    """Turn a mask argument into a boolean tensor broadcastable to ``[B, H, Lq, Lk]`` (True = attend).

    Accepts ``None``, a boolean tensor of shape ``[Lq, Lk]``/``[B, 1|H, Lq, Lk]``, or any object with a
    ``dense(lq, lk, device)`` method (the mask objects of :mod:`rcm_kernels.blockmask`).
    """
    if mask is None:
        return None
    if hasattr(mask, "dense"):
        mask = mask.dense(lq, lk, device)
    if mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be boolean (True = attend), got {mask.dtype}")
    if mask.shape[-2:] != (lq, lk):
        raise ValueError(f"attention mask has shape {tuple(mask.shape)}, expected [..., {lq}, {lk}]")
    return mask.to(device)


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects [B, L, H, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attention shape mismatch: q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: {q.shape[3]} vs {k.shape[3]}")


def attention_reference(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None = None, tk: Tensor | None = None,
                        tv: Tensor | None = None, *, scale: float | None = None, mask=None) -> AttentionOutput:
    """Attention (and its JVP when any tangent is given), computed with fp32-or-wider softmax.

    Rows whose keys are all masked out give a zero output and zero tangent (their LSE is -inf).
    Outputs are in the input dtype; the LSE is float32 (float64 for float64 inputs).
    """
    _check(q, k, v)
    scale = softmax_scale(q.shape[-1], scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh = (x.transpose(1, 2).to(acc) for x in (q, k, v))  # [B, H, L, D]
    s = scale * qh @ kh.transpose(-1, -2)  # [B, H, Lq, Lk]
    m = dense_mask(mask, q.shape[1], k.shape[1], q.device)
    if m is not None:
        s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, H, Lq]
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = torch.nan_to_num(p, nan=0.0)
    o = p @ vh
    tangent = None
    if tq is not None or tk is not None or tv is not None:
        ds = torch.zeros_like(s)  # masked entries need no care: P = 0 there
        if tq is not None:
            ds = ds + scale * tq.transpose(1, 2).to(acc) @ kh.transpose(-1, -2)
        if tk is not None:
            ds = ds + scale * qh @ tk.transpose(1, 2).to(acc).transpose(-1, -2)
        pds = p * ds
        to = pds @ vh - pds.sum(-1, keepdim=True) * o
        if tv is not None:
            to = to + p @ tv.transpose(1, 2).to(acc)
        tangent = to.transpose(1, 2).to(q.dtype)
    return AttentionOutput(o.transpose(1, 2).to(q.dtype), tangent, lse.to(acc))


def attention_reference_backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor, *,
                                 scale: float | None = None, mask=None) -> tuple[Tensor, Tensor, Tensor]:
    """Closed-form gradients ``(dq, dk, dv)`` of attention from the saved output and LSE (FlashAttention-2 math).

    ``dP = dO Vᵀ``, ``dS = P ⊙ (dP − rowsum(dO ⊙ O))``, ``dQ = s·dS K``, ``dK = s·dSᵀ Q``, ``dV = Pᵀ dO``.
    All ``[B, L, H, D]`` in the input dtype; ``lse`` is ``[B, H, Lq]``. Plain torch: any device, any transform.
    """
    _check(q, k, v)
    scale = softmax_scale(q.shape[-1], scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qh, kh, vh, oh, doh = (x.transpose(1, 2).to(acc) for x in (q, k, v, out, grad_out))  # [B, H, L, D]
    s = scale * qh @ kh.transpose(-1, -2)
    m = dense_mask(mask, q.shape[1], k.shape[1], q.device)
    lse = lse.to(acc).unsqueeze(-1)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), float("inf")))  # fully masked rows: P = 0
    if m is not None:
        p = p.masked_fill(~m, 0.0)
    dp = doh @ vh.transpose(-1, -2)
    ds = p * (dp - (doh * oh).sum(-1, keepdim=True))
    dq, dk, dv = scale * ds @ kh, scale * ds.transpose(-1, -2) @ qh, p.transpose(-1, -2) @ doh
    return tuple(x.transpose(1, 2).to(q.dtype) for x in (dq, dk, dv))
