"""KV caches for a causal WanDiT: :func:`make_kv_cache` builds an ``rcm_kernels.KVCache`` with the network's
geometry (layers, heads, head size, tokens per latent frame) for a :class:`~rcm_kernels.blockmask.BlockLayout`.

The causal mechanics themselves (block passes that read and write the cache, teacher-forcing and block-causal
masks) are ``WanDiT`` methods; block-by-block generation on top of them is ``rcm_pipelines.streaming``
(docs/causal.md).
"""

from __future__ import annotations

import torch

from rcm_kernels.blockmask import BlockLayout
from rcm_kernels.kv_cache import Extrapolation, KeySmoothing, KVCache, KVDtype, PositionPolicy

from .dit import WanDiT

__all__ = ["make_kv_cache", "video_kv_cache"]


def make_kv_cache(net: WanDiT, *, batch: int, height: int, width: int, layout: BlockLayout,
                  window_frames: int, sink_frames: int = 0, rolling: bool = True, kv_dtype: KVDtype = "bfloat16",
                  position_policy: PositionPolicy = "absolute", group_size: int = 64,
                  key_smoothing: KeySmoothing = "none", extrapolation: Extrapolation = "sink_window",
                  trained_frames: int | None = None, sink_bank_frames: int | None = None,
                  device: torch.device | str | None = None) -> KVCache:
    """A ``KVCache`` with the net's geometry for latents of ``height x width``.

    ``window_frames``: most recent committed frames kept (without ``rolling``, the capacity beyond the sink:
    set it to the whole video). A block-causal mask with a window of K blocks of n frames and s sink blocks
    corresponds to ``window_frames = (K − 1)·n``, ``sink_frames = s·n``. ``position_policy="reindexed"``
    stores pre-RoPE keys (rotated when read).

    ``extrapolation`` (``sink_window``, ``infinity_rope`` with ``trained_frames``, ``rolling_sink`` with
    ``sink_bank_frames``), ``group_size`` (int4) and ``key_smoothing`` (int8/fp8) are ``KVCache``'s options
    (docs/kv_cache.md); the extrapolation policies re-index cached keys, so the cache stores them pre-RoPE and
    ``WanDiT.forward_block`` rotates them when read, at ``cache.frame_positions()``.
    """
    cfg = net.config
    _, ph, pw = cfg.patch_size
    if height % ph or width % pw:
        raise ValueError(f"latent size {height}x{width} is not divisible by the patch {ph}x{pw}")
    max_block = max(layout.first, layout.frames_per_block)
    return KVCache(cfg.num_layers, batch=batch, heads=net.local_heads, head_dim=cfg.head_dim,
                   tokens_per_frame=(height // ph) * (width // pw), window_frames=window_frames,
                   sink_frames=sink_frames, rolling=rolling, max_block_frames=max_block if rolling else None,
                   kv_dtype=kv_dtype, position_policy=position_policy,
                   keys_pre_rope=position_policy == "reindexed" or extrapolation != "sink_window",
                   group_size=group_size, key_smoothing=key_smoothing, extrapolation=extrapolation,
                   trained_frames=trained_frames, sink_bank_frames=sink_bank_frames, device=device)


def video_kv_cache(net: WanDiT, shape: tuple[int, ...], device: torch.device | str | None, *, layout: BlockLayout,
                   kv_dtype: KVDtype = "bfloat16") -> KVCache:
    """A non-rolling cache of ``net`` holding a whole latent video of ``shape`` ``(B, C, T, H, W)`` in
    ``layout`` (the window is all ``T`` frames): the self-forcing rollout of training and its sample hook."""
    b, _, t, h, w = shape
    return make_kv_cache(net, batch=b, height=h, width=w, layout=layout, window_frames=t, rolling=False,
                         kv_dtype=kv_dtype, device=device)
