"""Wan2.1 DiT building blocks: self/cross attention, the transformer block, the head, the CLIP projection.

Every ``forward`` takes primal tensors with their tangents (``t<name>``, ``None`` = zero) and returns
``(primal, tangent)`` pairs (see ``_ops``). Attribute names and parameter shapes are the official ones.
Legend: B batch, L tokens (local to this rank under context parallel), Lc context rows, H heads,
D head dim, C = dim. Modulation tensors are ``[B, Tm, n, C]`` with Tm = 1 (one time per sample) or
Tm = frames (per-frame times, expanded per token through ``mod_index [L]``).
The norms, the modulation, the gated residuals and the q/k RMSNorm + RoPE go through ``_ops``/``_rope``
entry points that run the fused kernels of ``rcm_kernels.fused`` when ``_ops.use_fused`` says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcm_kernels.attention import Attention

from ._ops import (
    Pair,
    add,
    gated_residual,
    gelu_tanh,
    island,
    layer_norm,
    layer_norm_modulate,
    linear,
    rms_norm,
    use_fused,
)
from ._rope import apply_rope
from .configs import WanConfig

__all__ = ["RMSNorm", "WanSelfAttention", "WanCrossAttention", "WanBlock", "Head", "MLPProj", "CLIP_DIM"]

CLIP_DIM = 1280  # width of the CLIP ViT-H/14 tokens; fixed in the official img_emb


class RMSNorm(nn.Module):
    """Holds the ``weight [C]`` of a Wan RMSNorm over the full width (the math is ``_ops.rms_norm``)."""

    def __init__(self, dim: int, **factory):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, **factory))


class _Mod:
    """Modulation chunks ``table + e`` (fp32 island); tokens pick their row through ``index`` where used.

    ``table [1, n, C]``, ``e [B, Tm, n, C]``; ``self[i]`` is ``(m_i, tm_i)`` with shape ``[B, Tm, C]``.
    """

    def __init__(self, table: Tensor, e: Tensor, te: Tensor | None, index: Tensor | None):
        self.m, self.index = table.to(e.dtype) + e, index
        self.tm = None if te is None else te.expand(self.m.shape)  # the table has no tangent

    def __getitem__(self, i: int) -> Pair:
        return self.m[:, :, i], (None if self.tm is None else self.tm[:, :, i])


def _shared_rope(cos: Tensor) -> bool:
    """Whether ``cos`` is ``[1, L, 1, D/2]`` (one rotation per token for every sample and head), the layout the
    fused q/k kernel takes; any other layout runs the unfused ops."""
    return cos.dim() == 4 and cos.shape[0] == 1 and cos.shape[2] == 1


def _project(lin: nn.Linear, norm: RMSNorm | None, x: Tensor, tx: Tensor | None, eps: float,
             heads: int, rope: tuple[Tensor, Tensor] | None = None) -> Pair:
    """``rope(norm(lin(x)))`` viewed as ``[B, L, H, D]`` (norm and rope optional; fused into one kernel)."""
    y, ty = linear(x, tx, lin.weight, lin.bias)
    if norm is not None and use_fused(y) and (rope is None or _shared_rope(rope[0])):
        from rcm_kernels.fused import rms_norm_rope

        cos, sin = (None, None) if rope is None else (rope[0][0, :, 0], rope[1][0, :, 0])  # [L, D/2]
        return rms_norm_rope(y, ty, norm.weight, eps=eps, heads=heads, cos=cos, sin=sin)
    if norm is not None:
        y, ty = rms_norm(y, ty, norm.weight, eps)
    y, ty = y.unflatten(-1, (heads, -1)), (None if ty is None else ty.unflatten(-1, (heads, -1)))
    return (y, ty) if rope is None else apply_rope(y, ty, *rope)


class _QKVO(nn.Module):
    """The q, k, v, o projections (official keys), optional qk RMSNorm over the full width, one attention seam."""

    def __init__(self, cfg: WanConfig, context_parallel: bool, **factory):
        super().__init__()
        c = cfg.dim
        self.num_heads, self.eps = cfg.num_heads, cfg.eps
        self.q, self.k, self.v, self.o = (nn.Linear(c, c, **factory) for _ in range(4))
        self.norm_q = RMSNorm(c, **factory) if cfg.qk_norm else None
        self.norm_k = RMSNorm(c, **factory) if cfg.qk_norm else None
        self.attn = Attention(context_parallel=context_parallel)

    def out(self, o: Tensor, to: Tensor | None) -> Pair:
        """Merge heads of ``o [B, L, H, D]`` and apply the output projection."""
        return linear(o.flatten(2), None if to is None else to.flatten(2), self.o.weight, self.o.bias)


class WanSelfAttention(_QKVO):
    """Self-attention with qk RMSNorm over the full width, 3-D RoPE on q and k, one attention seam."""

    def __init__(self, cfg: WanConfig, **factory):
        super().__init__(cfg, True, **factory)

    def qkv(self, x: Tensor, tx: Tensor | None, rope: tuple[Tensor, Tensor]):
        """``(q, k, v), (tq, tk, tv)`` as ``[B, L, H, D]``; RoPE applied to q and k."""
        q, tq = _project(self.q, self.norm_q, x, tx, self.eps, self.num_heads, rope)
        k, tk = _project(self.k, self.norm_k, x, tx, self.eps, self.num_heads, rope)
        v, tv = _project(self.v, None, x, tx, self.eps, self.num_heads)
        return (q, k, v), (tq, tk, tv)

    def forward(self, x: Tensor, tx: Tensor | None, rope: tuple[Tensor, Tensor], block_mask=None) -> Pair:
        (q, k, v), (tq, tk, tv) = self.qkv(x, tx, rope)
        o, to = self.attn(q, k, v, tq, tk, tv, block_mask=block_mask)
        return self.out(o, to)


class WanCrossAttention(_QKVO):
    """Cross-attention to the text (and, for i2v, separately to the CLIP image tokens; outputs summed)."""

    def __init__(self, cfg: WanConfig, **factory):
        super().__init__(cfg, False, **factory)
        if cfg.model_type == "i2v":
            c = cfg.dim
            self.k_img, self.v_img = nn.Linear(c, c, **factory), nn.Linear(c, c, **factory)
            self.norm_k_img = RMSNorm(c, **factory) if cfg.qk_norm else None

    def context_kv(self, ctx: Tensor, img: Tensor | None) -> tuple[Tensor, ...]:
        """Keys and values of the context (a cache may keep them): ``(k, v)`` or ``(k, v, k_img, v_img)``."""
        h = self.num_heads
        kv = (_project(self.k, self.norm_k, ctx, None, self.eps, h)[0], _project(self.v, None, ctx, None, self.eps, h)[0])
        if img is None:
            return kv
        return kv + (_project(self.k_img, self.norm_k_img, img, None, self.eps, h)[0],
                     _project(self.v_img, None, img, None, self.eps, h)[0])

    def forward(self, x: Tensor, tx: Tensor | None, ctx: Tensor, img: Tensor | None = None,
                kv: tuple[Tensor, ...] | None = None) -> Pair:
        """``x [B, L, C]`` attends to ``ctx [B, Lc, C]`` (+ ``img [B, Li, C]``); the context has no tangent."""
        q, tq = _project(self.q, self.norm_q, x, tx, self.eps, self.num_heads)
        kv = self.context_kv(ctx, img) if kv is None else kv
        o, to = self.attn(q, kv[0], kv[1], tq, None, None)
        if len(kv) == 4:
            oi, toi = self.attn(q, kv[2], kv[3], tq, None, None)
            o, to = o + oi, add(to, toi)
        return self.out(o, to)


class WanBlock(nn.Module):
    """One transformer block (docs/nets.md); ``forward`` is factored so a KV cache can be threaded in."""

    def __init__(self, cfg: WanConfig, **factory):
        super().__init__()
        c = cfg.dim
        self.eps = cfg.eps
        self.modulation = nn.Parameter(torch.empty(1, 6, c, **factory))
        self.self_attn = WanSelfAttention(cfg, **factory)
        self.norm3 = nn.LayerNorm(c, eps=cfg.eps, **factory) if cfg.cross_attn_norm else None
        self.cross_attn = WanCrossAttention(cfg, **factory)
        self.ffn = nn.Sequential(nn.Linear(c, cfg.ffn_dim, **factory), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, c, **factory))

    def _ffn(self, f: Tensor, tf: Tensor | None, compute: torch.dtype | None) -> Pair:
        h, th = gelu_tanh(*linear(f, tf, self.ffn[0].weight, self.ffn[0].bias, compute))
        return linear(h, th, self.ffn[2].weight, self.ffn[2].bias, compute)

    def forward(self, x: Tensor, tx: Tensor | None, e0: Tensor, te0: Tensor | None, ctx: Tensor,
                img: Tensor | None, rope: tuple[Tensor, Tensor], *, mod_index: Tensor | None = None,
                block_mask=None, precision: str = "teacher") -> Pair:
        """``x [B, L, C]`` (residual stream, parameter dtype) -> same; ``e0 [B, Tm, 6, C]`` fp32."""
        dt, isl = x.dtype, e0.dtype
        mod = _Mod(self.modulation, e0, te0, mod_index)
        idx = mod.index
        # self-attention: modulated LN (fp32 island, result in dt), gated residual
        a, ta = layer_norm_modulate(x, tx, self.eps, *mod[0], *mod[1], index=idx, out_dtype=dt)
        y, ty = self.self_attn(a, ta, rope, block_mask)
        x, tx = gated_residual(x, tx, y, ty, *mod[2], isl if precision == "student" else dt, index=idx, out_dtype=dt)
        # cross-attention: affine LN, no modulation, no gate
        c, tc = (x, tx) if self.norm3 is None else layer_norm_modulate(x, tx, self.eps, weight=self.norm3.weight,
                                                                       bias=self.norm3.bias)
        z, tz = self.cross_attn(c, tc, ctx, img)
        if precision == "student":  # rCM student: cross residual + FFN + residual in fp32 (docs/nets.md, precision)
            h, th = gated_residual(x, tx, z, tz, None, None, isl, out_dtype=isl)  # x + z in fp32
            f, tf = layer_norm_modulate(h, th, self.eps, *mod[3], *mod[4], index=idx)
            return gated_residual(h, th, *self._ffn(f, tf, isl), *mod[5], isl, index=idx, out_dtype=dt)
        x, tx = gated_residual(x, tx, z, tz, None, None, dt)  # x + z
        f, tf = layer_norm_modulate(x, tx, self.eps, *mod[3], *mod[4], index=idx, out_dtype=dt)
        return gated_residual(x, tx, *self._ffn(f, tf, None), *mod[5], dt, index=idx)


class Head(nn.Module):
    """Output head: ``head(LN(x)·(1 + scale) + shift)`` in the fp32 island, modulated by ``e`` (not e0)."""

    def __init__(self, cfg: WanConfig, **factory):
        super().__init__()
        self.eps = cfg.eps
        p = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        self.modulation = nn.Parameter(torch.empty(1, 2, cfg.dim, **factory))
        self.head = nn.Linear(cfg.dim, p * cfg.out_dim, **factory)

    def forward(self, x: Tensor, tx: Tensor | None, e: Tensor, te: Tensor | None,
                mod_index: Tensor | None = None) -> Pair:
        """``x [B, L, C]``, ``e [B, Tm, C]`` -> ``[B, L, prod(patch)·out_dim]`` in the island dtype."""
        mod = _Mod(self.modulation, e[:, :, None], None if te is None else te[:, :, None], mod_index)
        f, tf = layer_norm_modulate(x, tx, self.eps, *mod[0], *mod[1], index=mod.index)
        return linear(f, tf, self.head.weight, self.head.bias, island(e.dtype))


class MLPProj(nn.Module):
    """i2v ``img_emb``: LN(1280) → Linear → exact GELU → Linear(→C) → LN(C), LN eps 1e-5 (no tangent)."""

    def __init__(self, dim: int, **factory):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(CLIP_DIM, eps=1e-5, **factory), nn.Linear(CLIP_DIM, CLIP_DIM, **factory),
                                  nn.GELU(), nn.Linear(CLIP_DIM, dim, **factory), nn.LayerNorm(dim, eps=1e-5, **factory))

    def forward(self, clip_fea: Tensor) -> Tensor:
        """``clip_fea [B, Li, 1280]`` -> ``[B, Li, C]`` in the parameter dtype."""
        n0, l1, _, l3, n4 = self.proj
        dt = l1.weight.dtype
        h = layer_norm(clip_fea.to(dt), None, n0.eps, n0.weight, n0.bias)[0]
        h = F.gelu(linear(h, None, l1.weight, l1.bias)[0])
        h = linear(h, None, l3.weight, l3.bias)[0]
        return layer_norm(h, None, n4.eps, n4.weight, n4.bias)[0]
