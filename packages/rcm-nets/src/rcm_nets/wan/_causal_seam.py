"""Plumbing of the DiT's block-by-block (KV-cached) mode: the cache-aware attention seam and prompt k/v.

The cached pass goes through ``block.__call__`` exactly like the plain one, so wrappers applied to
``WanDiT.blocks`` from outside (FSDP2 ``fully_shard``, activation checkpointing) keep working:

* every ``block.self_attn.attn`` is a :class:`CausalAttention`, an ``Attention`` seam that behaves as the
  plain one unless its ``block_mask`` argument is a :class:`CacheCall`; then the block's queries attend to
  the KV cache's visible frames plus the block's own k/v (``rcm_kernels.attention.cache_attention``), and
  the block's k/v are written to the cache when the call says so;
* every ``block.cross_attn`` carries a forward pre-hook (:class:`_PromptKVHook`) that, when the block passes
  a :class:`PromptKV` as the text context, swaps in that layer's precomputed cross-attention k/v
  (``WanCrossAttention.forward(..., kv=...)``): text k/v are computed once per prompt, not per call.

Layout legend: B batch, L tokens of the block, H heads, D head dim, Lc context rows, F cached frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rcm_kernels.attention import Attention
from rcm_kernels.attention.cache_attention import apply_rope_interleaved, cache_attention
from rcm_kernels.kv_cache import CacheBlock, CacheLayer, KVCache

__all__ = ["PromptKV", "CacheCall", "CausalAttention"]


@dataclass(frozen=True)
class PromptKV:
    """Cross-attention k/v of one prompt for every layer (``WanDiT.encode_prompt``).

    ``layers[i]`` is ``(k, v)`` (t2v) or ``(k, v, k_img, v_img)`` (i2v), each ``[B, Lc, H, D]``.
    """

    layers: tuple[tuple[Tensor, ...], ...]

    @property
    def batch(self) -> int:
        return self.layers[0][0].shape[0]

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for kv in self.layers for x in kv)


@dataclass
class CacheCall:
    """What one cached DiT call asks of every self-attention layer (passed as the seam's ``block_mask``).

    ``layers[i]``: a snapshot of layer i's cache view taken when the call began (the visible frames cannot
    change under it, e.g. during an activation-checkpointing recompute). ``q_rope``: ``(cos, sin)``
    ``[L, D/2]`` to rotate the block's q and k inside the seam, only for caches storing pre-RoPE keys (the
    network then runs with an identity rotation); ``k_rope``: the cached keys' rotation ``[F·T, D/2]``.
    """

    cache: KVCache
    block: CacheBlock
    write: bool
    layers: tuple[CacheLayer, ...]
    q_rope: tuple[Tensor, Tensor] | None = None
    k_rope: tuple[Tensor, Tensor] | None = None

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float | None) -> Tensor:
        """``q, k, v [B, L, H, D]`` of the block -> attention output ``[B, L, H, D]``; writes k/v if asked."""
        k_store = k
        if self.q_rope is not None:  # pre-RoPE cache: rotate here, store the un-rotated keys
            q, k = apply_rope_interleaved(q, *self.q_rope), apply_rope_interleaved(k, *self.q_rope)
        out = cache_attention(q, self.layers[layer], extra_k=k, extra_v=v, scale=scale, k_rope=self.k_rope)
        if self.write:
            self.cache.write(layer, self.block, k_store, v)
        return out


class CausalAttention(Attention):
    """Self-attention seam of layer ``layer_index``: plain attention, or cached attention for a CacheCall."""

    def __init__(self, layer_index: int):
        super().__init__(context_parallel=True)
        self.layer_index = layer_index

    def forward(self, q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None = None, tk: Tensor | None = None,
                tv: Tensor | None = None, *, scale: float | None = None, block_mask=None):
        if isinstance(block_mask, CacheCall):
            if tq is not None or tk is not None or tv is not None:
                raise ValueError("the cached (block-by-block) DiT pass has no JVP mode; use the masked "
                                 "full-sequence pass (forward_jvp with block_mask) for tangents")
            return block_mask.attend(self.layer_index, q, k, v, scale), None
        return super().forward(q, k, v, tq, tk, tv, scale=scale, block_mask=block_mask)

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}"


class _PromptKVHook:
    """Forward pre-hook of ``block.cross_attn``: a ``PromptKV`` given as the context becomes ``kv=``."""

    def __init__(self, layer_index: int):
        self.layer_index = layer_index

    def __call__(self, module, args, kwargs):
        if len(args) >= 3 and isinstance(args[2], PromptKV):
            return (args[0], args[1], None, None), {**kwargs, "kv": args[2].layers[self.layer_index]}
        return None


def install_causal_hooks(blocks: torch.nn.ModuleList) -> None:
    """Give each block a :class:`CausalAttention` self-attention seam and the prompt k/v pre-hook."""
    for i, blk in enumerate(blocks):
        blk.self_attn.attn = CausalAttention(i)
        blk.cross_attn.register_forward_pre_hook(_PromptKVHook(i), with_kwargs=True)
