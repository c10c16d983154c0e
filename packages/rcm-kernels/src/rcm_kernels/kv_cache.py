"""KV cache for block-autoregressive (streaming) attention: rolling window with sink frames, quantized storage.

Layout legend: B batch, S storage frame slots, T tokens per frame, H heads, D head dim, F cached (visible)
frames, N layers. Attention tensors are ``[B, L, H, D]``; storage is ``[N, B, S, T, H, D]``.

Storage is preallocated once (``S = sink_frames + window_frames (+ max_block_frames when rolling)``) and never
grows or moves: appending past the window only changes bookkeeping (ring buffer, no compaction copies).

* Slots ``[0, sink_frames)`` hold the first ``sink_frames`` frames ever written, forever.
* The remaining ``R`` slots are a ring: absolute frame ``a >= sink_frames`` lives in slot
  ``sink_frames + (a - sink_frames) % R``. With ``rolling=True``, ``R = window_frames + max_block_frames``: the
  extra ``max_block_frames`` slots receive the block being computed while the ``window_frames`` most recent
  committed frames stay intact and readable, so every layer can attend to the old window and then write its
  new k/v in the same forward.
* The *visible* frames (what attention reads) are the sink frames plus the ``window_frames`` most recent
  committed frames, listed in chronological order (``CacheLayer.frame_slots``). Attention is invariant to the
  order of keys, so the wrap-around of the ring costs nothing: the kernel walks the frame list.

Protocol for one block (all layers share the bookkeeping; each layer owns its storage)::

    blk = cache.begin_block(num_frames)          # plans slots and RoPE positions, evicts nothing yet
    for i, layer in enumerate(blocks):           # inside the network's forward
        out = cache_attention(q, cache.layer(i), extra_k=k, extra_v=v)   # committed frames + own k/v
        cache.write(i, blk, k, v)                # quantize on write; may be repeated (overwrites)
    cache.commit(blk)                            # visible from now on; the oldest window frames drop out
    cache.write(i, cache.last_block, k2, v2)     # later: overwrite the most recent block in place

RoPE position policy for the frames that remain after eviction (``position_policy``):

* ``"absolute"``: a frame keeps its true index ``a`` forever; the block being computed gets indices
  ``num_frames_written + [0, n)``. Positions grow without bound (computed on the fly, no table). Works with
  keys stored post-RoPE (the default) since a stored key never changes phase.
* ``"reindexed"``: the visible frames get positions ``0 .. F-1`` in chronological order (sink frames first),
  and the block being computed gets ``F .. F+n-1``; the relative geometry equals that of a fresh cache holding
  only the kept frames. Positions of cached keys change after each eviction, so keys must be stored
  pre-RoPE (``keys_pre_rope=True``) and rotated when read (``cache_attention(..., k_rope=...)``).

Length extrapolation (``extrapolation``; which frames are visible and where their RoPE positions are, as
generation runs past the trained length; docs/kv_cache.md cites the methods):

* ``"sink_window"`` (default): the sink frames plus the most recent window, positions by ``position_policy``
  (attention sink: StreamingLLM, arXiv 2309.17453).
* ``"infinity_rope"``: Block-Relativistic RoPE (Infinity-RoPE, arXiv 2511.20649): the block being computed
  sits at positions ``[L - n, L)`` with ``L = trained_frames``, the visible frames right before it in
  chronological order, ``L - n - F + j`` for the j-th of F, clamped at 0 (frames that would fall before 0
  share position 0). Every position lies in ``[0, L)``, so no query-key offset exceeds ``L - 1``.
* ``"rolling_sink"``: sink refresh (Rolling Sink, arXiv 2602.07775): the first ``sink_bank_frames`` (K)
  frames are kept as a bank; once the bank is full the sink shows ``sink_frames`` (S) bank frames that slide
  by the committed frames, forward through the bank, then backward (frames in reverse order), and so on;
  the window holds the most recent ``window_frames``. Positions are re-indexed ``0 .. F-1`` (sink first) and
  the block gets ``F .. F+n-1``, so the largest offset is ``S + window + n - 1``.

Both re-index cached keys, so they need pre-RoPE keys. Memory stays constant: only bookkeeping changes.

No host syncs: the index tensors the bookkeeping hands to attention (visible slots, RoPE positions, the
block's positions) reach the device through pinned memory without blocking the host. With
:meth:`KVCache.use_static_indices` they are moreover views of fixed buffers updated in place and writes take
their slots from a device buffer, so a captured CUDA graph of a cached forward replays for any block of
the same shape (``rcm_pipelines.streaming``).

Cross-attention k/v (text, once per prompt) do not belong here: :class:`CrossAttentionCache` is a tiny
per-layer dict the network may use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .devices import parse_dtype
from .quant import (
    quantize_int4_keys,
    quantize_int4_values,
    quantize_keys,
    quantize_keys_smoothed,
    quantize_values,
    smoothing_factors,
    storage_dtype,
    value_groups,
)

__all__ = ["KVCache", "CacheLayer", "CacheBlock", "CrossAttentionCache", "KVDtype", "PositionPolicy",
           "Extrapolation", "KeySmoothing"]

KVDtype = Literal["bfloat16", "float16", "float32", "int8", "fp8", "int4"]
PositionPolicy = Literal["absolute", "reindexed"]
Extrapolation = Literal["sink_window", "infinity_rope", "rolling_sink"]
KeySmoothing = Literal["none", "first_block"]
_NATIVE = {name: parse_dtype(name) for name in ("bfloat16", "float16", "float32")}


@dataclass(frozen=True)
class CacheBlock:
    """Handle of one appended block (returned by :meth:`KVCache.begin_block`)."""

    index: int  # blocks begun since the last reset, 0-based
    first_frame: int  # absolute index of the block's first frame
    num_frames: int
    slots: tuple[int, ...]  # storage slot of each frame
    positions: tuple[int, ...]  # RoPE frame positions of the block's queries and keys while it is computed


class CacheLayer(NamedTuple):
    """One layer's cache as attention reads it (storage views, no copies)."""

    k: Tensor  # [B, S*T, H, D] codes: compute dtype, int8 or float8_e4m3fn; int4: uint8 [B, S*T, H, D/2]
    v: Tensor  # [B, S*T, H, D] (int4: [B, S*T, H, D/2])
    # float32 key scales; None for unquantized storage. int8/fp8: [B, S, H, D] per (frame, channel), or with
    # smoothing [B, S*T, H] per token; int4: [B, S, ceil(T/G), H, D] per (frame, token group, channel)
    k_scale: Tensor | None
    v_scale: Tensor | None  # float32 [B, S*T, H] per token; int4: [B, S*T, H, D/G] per (token, channel group)
    frame_slots: Tensor  # [F] int32 on the storage device: slots of the visible frames, chronological
    num_frames: int  # F
    tokens_per_frame: int  # T
    keys_pre_rope: bool  # True: keys need rotation at read time (cache_attention's k_rope)
    k_smooth: Tensor | None = None  # [B, H, D] float32 key smoothing factors (keys stored as k/c); None: off
    int4_group: int = 0  # G of int4 storage (two codes per byte); 0: not int4

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame


class KVCache:
    """Per-layer k/v storage for streaming attention: rolling window, sink frames, int8/fp8/int4 storage and
    length-extrapolation policies.

    Args:
        num_layers: attention layers that each own a k/v store.
        batch, heads, head_dim, tokens_per_frame: the ``[B, T, H, D]`` geometry of one frame.
        window_frames: most recent committed frames kept (without ``rolling``: capacity beyond the sink).
        sink_frames: first frames kept forever.
        rolling: evict the oldest non-sink frames once more than ``window_frames`` are committed; without it,
            writing past capacity raises.
        max_block_frames: largest block ever appended (spare ring slots; required when ``rolling``).
        kv_dtype: storage: ``bf16`` / ``fp16`` / ``fp32`` (as is), ``int8`` or ``fp8`` (e4m3) with per-channel
            key scales per frame and per-token value scales, or ``int4`` (two codes per byte, group-wise
            scales; ``rcm_kernels.quant``).
        position_policy: ``absolute`` or ``reindexed`` (module docstring); ``sink_window`` only.
        keys_pre_rope: the caller stores un-rotated keys and passes ``k_rope`` to ``cache_attention``.
        group_size: int4 only: keys take one scale per ``group_size`` consecutive tokens of a frame and channel,
            values one per ``min(group_size, head_dim)`` consecutive channels of a token (must divide head_dim).
            Default 64 (the released playground's default); smaller groups: lower error, 4/G more bytes.
        key_smoothing: int8/fp8 only. ``"first_block"``: per-channel factors c (the channel absmax of the first
            block written, tied within RoPE pairs) are divided out of the keys before per-token quantization
            and folded into q at attention time (``rcm_kernels.quant``); ``"none"``: per-channel scales.
        extrapolation: ``sink_window``, ``infinity_rope`` or ``rolling_sink`` (module docstring).
        trained_frames: infinity_rope only: the trained temporal horizon L (frames); positions stay in [0, L).
        sink_bank_frames: rolling_sink only: K, the first frames kept as the sink bank (>= sink_frames; default
            sink_frames, i.e. a fixed sink).
    """

    def __init__(self, num_layers: int, *, batch: int, heads: int, head_dim: int, tokens_per_frame: int,
                 window_frames: int, sink_frames: int = 0, rolling: bool = True,
                 max_block_frames: int | None = None, kv_dtype: KVDtype = "bfloat16",
                 position_policy: PositionPolicy = "absolute", keys_pre_rope: bool = False,
                 group_size: int = 64, key_smoothing: KeySmoothing = "none",
                 extrapolation: Extrapolation = "sink_window", trained_frames: int | None = None,
                 sink_bank_frames: int | None = None, device: torch.device | str | None = None):
        for name, val in dict(num_layers=num_layers, batch=batch, heads=heads, head_dim=head_dim,
                              tokens_per_frame=tokens_per_frame, window_frames=window_frames).items():
            if val < 1:
                raise ValueError(f"KVCache: {name} must be >= 1, got {val}")
        if sink_frames < 0:
            raise ValueError(f"KVCache: sink_frames must be >= 0, got {sink_frames}")
        if rolling and max_block_frames is None:
            raise ValueError("KVCache: rolling=True needs max_block_frames (spare slots for the block being written)")
        if max_block_frames is not None and not 1 <= max_block_frames <= window_frames:
            raise ValueError(f"KVCache: max_block_frames must be in [1, window_frames={window_frames}], "
                             f"got {max_block_frames}")
        if position_policy not in ("absolute", "reindexed"):
            raise ValueError(f"KVCache: position_policy must be 'absolute' or 'reindexed', got {position_policy!r}")
        if position_policy == "reindexed" and not keys_pre_rope:
            raise ValueError("KVCache: position_policy='reindexed' needs keys_pre_rope=True (post-RoPE keys "
                             "cannot be re-indexed after eviction)")
        _check_format(kv_dtype, head_dim, group_size, key_smoothing)
        sink_bank_frames = _check_extrapolation(extrapolation, position_policy, keys_pre_rope, rolling,
                                                trained_frames, max_block_frames or window_frames, sink_frames,
                                                sink_bank_frames)
        self.num_layers, self.tokens_per_frame = num_layers, tokens_per_frame
        self.sink_frames, self.window_frames, self.rolling = sink_frames, window_frames, rolling
        self.max_block_frames = max_block_frames or window_frames
        self.kv_dtype, self.position_policy, self.keys_pre_rope = kv_dtype, position_policy, keys_pre_rope
        self.extrapolation, self.trained_frames = extrapolation, trained_frames
        self.key_smoothing = key_smoothing
        self.int4_group = group_size if kv_dtype == "int4" else 0
        self.quantized = kv_dtype in ("int8", "fp8", "int4")
        # frames kept forever in slots [0, bank): the sink (the rolling sink's bank)
        self._bank = sink_bank_frames if extrapolation == "rolling_sink" else sink_frames
        self.sink_bank_frames = self._bank
        self._ring = window_frames + (self.max_block_frames if rolling else 0)
        self._allocate(batch, self._bank + self._ring, heads, head_dim, group_size, device)
        self._static: dict[str, Tensor] | None = None
        self.reset()

    def _allocate(self, batch: int, slots: int, h: int, d: int, group_size: int, device) -> None:
        """Preallocate codes, scales and smoothing factors of every layer (layouts: ``CacheLayer``)."""
        n, t, kv_dtype = self.num_layers, self.tokens_per_frame, self.kv_dtype
        self._k_scale = self._v_scale = self._k_smooth = None
        if kv_dtype == "int4":
            shape = (n, batch, slots, t, h, d // 2)
            self._k = torch.zeros(shape, dtype=torch.uint8, device=device)
            self._v = torch.zeros(shape, dtype=torch.uint8, device=device)
            self._k_scale = torch.zeros(n, batch, slots, -(-t // group_size), h, d, device=device)
            self._v_scale = torch.zeros(n, batch, slots * t, h, d // value_groups(d, group_size), device=device)
            return
        code = storage_dtype(kv_dtype) if self.quantized else _NATIVE[kv_dtype]
        self._k = torch.zeros(n, batch, slots, t, h, d, dtype=code, device=device)
        self._v = torch.zeros(n, batch, slots, t, h, d, dtype=code, device=device)
        if self.quantized:
            if self.key_smoothing == "none":
                self._k_scale = torch.zeros(n, batch, slots, h, d, device=device)
            else:
                self._k_scale = torch.zeros(n, batch, slots * t, h, device=device)
                self._k_smooth = torch.ones(n, batch, h, d, device=device)
            self._v_scale = torch.zeros(n, batch, slots * t, h, device=device)

    def use_static_indices(self) -> None:
        """From now on keep the index tensors in fixed buffers updated in place (stable addresses, what a CUDA
        graph captures) and write through a device index (any storage format). The views
        handed out earlier (``CacheLayer.frame_slots``) then change at the next commit: do not use this for
        passes recomputed later (activation checkpointing of a self-forcing rollout)."""
        if self._static is None:
            dev, s = self._k.device, self._bank + self._ring
            self._static = dict(slots=torch.zeros(s, dtype=torch.int32, device=dev),
                                pos=torch.zeros(s, dtype=torch.long, device=dev),
                                block_pos=torch.zeros(self.max_block_frames, dtype=torch.long, device=dev),
                                write_idx=torch.zeros(self.max_block_frames, dtype=torch.long, device=dev))
            self.reset()

    @property
    def static_indices(self) -> bool:
        return self._static is not None

    def _device_ints(self, values: list[int] | tuple[int, ...], dtype: torch.dtype, buf: str | None = None) -> Tensor:
        """``values`` as a tensor on the storage device without a host sync (pinned host copy); in static mode
        copied into the front of buffer ``buf`` (the view is returned)."""
        cpu = torch.tensor(values, dtype=dtype)
        dev = self._k.device
        if dev.type == "cuda" and cpu.numel():
            cpu = cpu.pin_memory()
        if self._static is None or buf is None:
            return cpu.to(dev, non_blocking=True)
        out = self._static[buf][:len(values)]
        out.copy_(cpu, non_blocking=True)
        return out

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        """Forget every frame (storage is kept: no reallocation)."""
        self.frames_written = 0  # committed frames since reset (absolute index of the next frame)
        self._blocks = 0
        self._pending: CacheBlock | None = None
        self._pending_written: set[int] = set()
        self.last_block: CacheBlock | None = None
        self._block_pos: Tensor | None = None  # RoPE positions of the pending block, on the device
        self._write_idx: Tensor | None = None  # static mode: slots of the pending block, on the device
        self._smooth_frozen = False  # key smoothing factors fixed once a second block begins
        self._refresh_visible()

    def _slot(self, frame: int) -> int:
        if frame < self._bank:
            return frame
        return self._bank + (frame - self._bank) % self._ring

    def _visible_frames(self, written: int) -> list[int]:
        if self.extrapolation == "rolling_sink":
            return self._rolling_sink_frames(written)
        sink = range(min(written, self.sink_frames))
        start = max(self.sink_frames, written - self.window_frames) if self.rolling else self.sink_frames
        return [*sink, *range(start, written)]

    def _rolling_sink_frames(self, written: int) -> list[int]:
        """Rolling Sink: all frames while the bank fills; then S bank frames sliding by ``o = written - K``
        frames (forward through the bank for even ``o // K``, backward for odd), and the recent window (less
        any frame the sink already shows)."""
        k, s = self._bank, self.sink_frames
        if written <= k:
            return list(range(written))
        o = written - k
        if (o // k) % 2 == 0:
            sink = [(o % k + i) % k for i in range(s)]
        else:
            sink = [(k - 1 - o % k - i) % k for i in range(s)]
        return [*sink, *(f for f in range(max(0, written - self.window_frames), written) if f not in sink)]

    def _frame_positions(self, num_visible: int, next_block: int) -> list[int]:
        """RoPE positions of the visible frames, given the size of the block that will read them."""
        if self.extrapolation == "infinity_rope":
            end = self.trained_frames - next_block
            return [max(0, end - num_visible + j) for j in range(num_visible)]
        if self.extrapolation == "sink_window" and self.position_policy == "absolute":
            return list(self._visible)
        return list(range(num_visible))

    def _refresh_visible(self, next_block: int | None = None) -> None:
        frames = self._visible_frames(self.frames_written)
        self._visible = frames
        self._frame_slots = self._device_ints([self._slot(f) for f in frames], torch.int32, "slots")
        pos = self._frame_positions(len(frames), next_block or self.max_block_frames)
        self._positions = self._device_ints(pos, torch.long, "pos")

    @property
    def num_cached_frames(self) -> int:
        """Frames attention currently reads (sink + window, committed only)."""
        return len(self._visible)

    def cached_frames(self) -> list[int]:
        """Absolute indices of the visible frames, chronological (the order of ``CacheLayer.frame_slots``)."""
        return list(self._visible)

    def frame_positions(self) -> Tensor:
        """RoPE frame positions ``[F]`` (long, storage device) of the visible frames under the policy (for
        ``infinity_rope`` relative to the pending block, or to a block of ``max_block_frames`` if none)."""
        return self._positions

    def begin_block(self, num_frames: int) -> CacheBlock:
        """Plan the next block: its storage slots and the RoPE positions of its frames. Evicts nothing yet."""
        if self._pending is not None:
            raise RuntimeError(f"KVCache: block {self._pending.index} is still pending; commit it first")
        if not 1 <= num_frames <= self.max_block_frames:
            raise ValueError(f"KVCache: a block has 1..{self.max_block_frames} frames "
                             f"(max_block_frames), got {num_frames}")
        first = self.frames_written
        if not self.rolling and first + num_frames > self.sink_frames + self.window_frames:
            raise RuntimeError(f"KVCache full: {first} + {num_frames} frames exceed the capacity "
                               f"{self.sink_frames + self.window_frames} (use rolling=True to evict)")
        if self.extrapolation == "infinity_rope":
            positions = tuple(range(self.trained_frames - num_frames, self.trained_frames))
            self._refresh_visible(num_frames)
        elif self.extrapolation == "sink_window" and self.position_policy == "absolute":
            positions = tuple(range(first, first + num_frames))
        else:
            positions = tuple(range(len(self._visible), len(self._visible) + num_frames))
        if self._blocks >= 1:
            self._smooth_frozen = True
        slots = tuple(self._slot(f) for f in range(first, first + num_frames))
        self._pending = CacheBlock(self._blocks, first, num_frames, slots, positions)
        self._pending_written = set()
        self._block_pos = self._device_ints(positions, torch.long, "block_pos")
        if self._static is not None:
            self._write_idx = self._device_ints(slots, torch.long, "write_idx")
        return self._pending

    def block_positions(self, block: CacheBlock) -> Tensor:
        """``block.positions`` as a long tensor ``[n]`` on the storage device (made once per block, no host sync;
        in static mode a view of a fixed buffer)."""
        if block == self._pending and self._block_pos is not None:
            return self._block_pos
        return self._device_ints(block.positions, torch.long)

    def mark_written(self, block: CacheBlock) -> None:
        """Record that every layer of the pending ``block`` was written by a replayed CUDA graph (the graph
        writes the storage; the Python bookkeeping of :meth:`write` ran only at capture)."""
        if block != self._pending:
            raise RuntimeError(f"KVCache: block {block.index} is not the pending block")
        self._pending_written = set(range(self.num_layers))

    def commit(self, block: CacheBlock) -> None:
        """Make a fully written pending block visible; the oldest non-sink frames beyond the window drop out."""
        if block != self._pending:
            raise RuntimeError(f"KVCache: block {block.index} is not the pending block")
        missing = sorted(set(range(self.num_layers)) - self._pending_written)
        if missing:
            raise RuntimeError(f"KVCache: block {block.index} was not written for layers {missing}")
        self.frames_written += block.num_frames
        self._blocks += 1
        self.last_block, self._pending = block, None
        self._refresh_visible()

    # ------------------------------------------------------------------ data
    def write(self, layer: int, block: CacheBlock, k: Tensor, v: Tensor) -> None:
        """Store one layer's k/v ``[B, n·T, H, D]`` for ``block`` (pending or the last committed one).

        Values are detached, cast or quantized on write. Writing again overwrites (denoising steps, or the
        re-computation of the block's k/v from its denoised latents).
        """
        if block != self._pending and block != self.last_block:
            raise RuntimeError(f"KVCache: block {block.index} is neither pending nor the last committed block")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"KVCache: layer {layer} out of range [0, {self.num_layers})")
        _, b, _, t, h, d = self._k.shape
        d = d * 2 if self.kv_dtype == "int4" else d
        want = (b, block.num_frames * t, h, d)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"KVCache.write: expected k and v of shape {want} (block of {block.num_frames} "
                             f"frames), got {tuple(k.shape)} and {tuple(v.shape)}")
        if self._static is not None and block == self._pending:
            idx = self._write_idx  # from a device buffer: a captured write replays for any block of this size
        else:
            idx = self._slot_index(block.slots)
        k5, v5 = k.detach().reshape(b, block.num_frames, t, h, d), v.detach().reshape(b, block.num_frames, t, h, d)
        n = block.num_frames
        if self.kv_dtype == "int4":
            kq, vq = quantize_int4_keys(k5, self.int4_group), quantize_int4_values(v5.flatten(1, 2), self.int4_group)
            _put(self._k[layer], idx, kq.data)
            _put(self._k_scale[layer], idx, kq.scale)
            _put(self._v[layer], idx, vq.data.unflatten(1, (n, t)))
            _put(self._v_scale[layer].unflatten(1, (-1, t)), idx, vq.scale.unflatten(1, (n, t)))
        elif self.quantized:
            if self._k_smooth is not None:
                if not self._smooth_frozen:  # the first block (re)defines the factors; later ones reuse them
                    self._k_smooth[layer] = smoothing_factors(k5)
                kq = quantize_keys_smoothed(k5, self._k_smooth[layer], self.kv_dtype)
                _put(self._k_scale[layer].unflatten(1, (-1, t)), idx, kq.scale)
            else:
                kq = quantize_keys(k5, self.kv_dtype)
                _put(self._k_scale[layer], idx, kq.scale)
            vq = quantize_values(v5.flatten(1, 2), self.kv_dtype)
            _put(self._k[layer], idx, kq.data)
            _put(self._v[layer], idx, vq.data.unflatten(1, (n, t)))
            _put(self._v_scale[layer].unflatten(1, (-1, t)), idx, vq.scale.unflatten(1, (n, t)))
        else:
            _put(self._k[layer], idx, k5.to(self._k.dtype))
            _put(self._v[layer], idx, v5.to(self._v.dtype))
        if block == self._pending:
            self._pending_written.add(layer)

    def _slot_index(self, slots: tuple[int, ...]) -> slice | Tensor:
        if all(b == a + 1 for a, b in zip(slots, slots[1:])):
            return slice(slots[0], slots[-1] + 1)
        return self._device_ints(slots, torch.long)  # the block wraps around the ring

    def append(self, ks: list[Tensor], vs: list[Tensor]) -> CacheBlock:
        """Begin, write every layer (``ks[i]``, ``vs[i]``: ``[B, n·T, H, D]``) and commit one block."""
        if len(ks) != self.num_layers or len(vs) != self.num_layers:
            raise ValueError(f"KVCache.append: need k and v for all {self.num_layers} layers, "
                             f"got {len(ks)} and {len(vs)}")
        block = self.begin_block(ks[0].shape[1] // self.tokens_per_frame)
        for i, (k, v) in enumerate(zip(ks, vs)):
            self.write(i, block, k, v)
        self.commit(block)
        return block

    def layer(self, i: int) -> CacheLayer:
        """What attention of layer ``i`` reads: storage views plus the visible frames' slots."""
        b, s, t, h, d = self._k.shape[1:]
        scales = (None, None) if not self.quantized else (self._k_scale[i], self._v_scale[i])
        smooth = None if self._k_smooth is None else self._k_smooth[i]
        return CacheLayer(self._k[i].view(b, s * t, h, d), self._v[i].view(b, s * t, h, d), *scales,
                          self._frame_slots, len(self._visible), t, self.keys_pre_rope, smooth, self.int4_group)

    def storage(self) -> tuple[Tensor, ...]:
        """Every preallocated tensor (k, v, scales and smoothing factors of all layers)."""
        return tuple(x for x in (self._k, self._v, self._k_scale, self._v_scale, self._k_smooth) if x is not None)

    def nbytes(self) -> int:
        """Bytes held by the cache (codes and scales of all layers), constant over its lifetime."""
        return sum(x.numel() * x.element_size() for x in self.storage())


def _put(dst: Tensor, idx: slice | Tensor, src: Tensor) -> None:
    """``dst[:, idx] = src`` in place: a slice copy, or ``index_copy_`` along dim 1 for a device index (no host
    sync; a captured CUDA graph reads the index at replay)."""
    if isinstance(idx, Tensor):
        src = src.to(dst.dtype)
        if dst.dtype.is_floating_point and dst.element_size() == 1:  # no fp8 index_copy_: copy the bytes
            dst, src = dst.view(torch.uint8), src.view(torch.uint8)
        dst.index_copy_(1, idx, src)
    else:
        dst[:, idx] = src


def _check_format(kv_dtype: str, head_dim: int, group_size: int, key_smoothing: str) -> None:
    if kv_dtype not in (*_NATIVE, "int8", "fp8", "int4"):
        raise ValueError(f"KVCache: kv_dtype must be one of bf16, fp16, fp32, int8, fp8, int4; got {kv_dtype!r}")
    if kv_dtype == "int4":
        if group_size < 1:
            raise ValueError(f"KVCache: group_size must be >= 1, got {group_size}")
        if head_dim % 2:
            raise ValueError(f"KVCache: int4 packs two channels per byte: head_dim must be even, got {head_dim}")
        value_groups(head_dim, group_size)
    if key_smoothing not in ("none", "first_block"):
        raise ValueError(f"KVCache: key_smoothing must be 'none' or 'first_block', got {key_smoothing!r}")
    if key_smoothing != "none" and kv_dtype not in ("int8", "fp8"):
        raise ValueError(f"KVCache: key_smoothing applies to int8/fp8 keys, not kv_dtype={kv_dtype!r}")


def _check_extrapolation(extrapolation: str, position_policy: str, keys_pre_rope: bool, rolling: bool,
                         trained_frames: int | None, max_block: int, sink_frames: int,
                         sink_bank_frames: int | None) -> int | None:
    """Validate the extrapolation options; returns the rolling sink's bank size (its default filled in)."""
    if extrapolation not in ("sink_window", "infinity_rope", "rolling_sink"):
        raise ValueError(f"KVCache: extrapolation must be 'sink_window', 'infinity_rope' or 'rolling_sink', "
                         f"got {extrapolation!r}")
    if extrapolation != "sink_window":
        if position_policy != "absolute":
            raise ValueError(f"KVCache: position_policy applies to extrapolation='sink_window'; "
                             f"{extrapolation} sets positions itself (leave position_policy='absolute')")
        if not keys_pre_rope or not rolling:
            raise ValueError(f"KVCache: extrapolation={extrapolation!r} re-indexes cached keys: it needs "
                             f"keys_pre_rope=True and rolling=True")
    if extrapolation == "infinity_rope":
        if trained_frames is None or trained_frames < max_block + 1:
            raise ValueError(f"KVCache: extrapolation='infinity_rope' needs trained_frames > max_block_frames "
                             f"({max_block}), got {trained_frames}")
    elif trained_frames is not None:
        raise ValueError("KVCache: trained_frames is an infinity_rope setting")
    if extrapolation != "rolling_sink":
        if sink_bank_frames is not None:
            raise ValueError("KVCache: sink_bank_frames is a rolling_sink setting")
        return None
    bank = sink_frames if sink_bank_frames is None else sink_bank_frames
    if sink_frames < 1 or bank < sink_frames:
        raise ValueError(f"KVCache: rolling_sink needs 1 <= sink_frames <= sink_bank_frames, got "
                         f"sink_frames={sink_frames}, sink_bank_frames={bank}")
    return bank


class CrossAttentionCache:
    """Per-layer cross-attention k/v, computed once per prompt (call :meth:`reset` when the prompt changes)."""

    def __init__(self) -> None:
        self._kv: dict[int, tuple[Tensor, Tensor]] = {}

    def get(self, layer: int, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """Return layer ``layer``'s ``(k, v)``, calling ``compute()`` only the first time."""
        if layer not in self._kv:
            self._kv[layer] = compute()
        return self._kv[layer]

    def reset(self) -> None:
        self._kv.clear()
