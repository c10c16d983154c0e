"""Block-structured attention masks for causal video: block-causal, teacher-forcing, sliding window + sink.

Frames are grouped in blocks: block 0 holds ``first_block_frames`` latent frames, every later block
``frames_per_block`` (patterns ``c1-1``, ``c3-3``, ``c1-4`` = first/then); a frame is ``tokens_per_frame``
tokens, so block boundaries need not be multiples of any tile size. Attention inside a block is bidirectional.

Every mask reduces to at most two key intervals per query row, ``[s0, e0) ∪ [s1, e1)`` (absolute key indices),
and each mask object derives its three views from them (all cached by shape):

* ``dense(lq, lk, device)`` -> ``[Lq, Lk]`` bool (True = attend): what the reference attention consumes;
* ``flex(lq, lk, device)`` -> a FlexAttention ``BlockMask`` built straight from the tile table (no ``mask_mod``
  sweep over the L×L grid);
* ``tiles(lq, lk, block_m, block_n, device)`` -> :class:`TileTable`, the per-tile sparsity lists the Triton
  kernels use to skip empty tiles, run full tiles unmasked and mask partial tiles from the row intervals.

Queries sit at absolute token positions ``q_offset + i`` (``q_offset=0``: self-attention over the whole
sequence; a later block's queries against a cached prefix use ``q_offset`` = tokens before that block); keys
are positions ``0 .. lk-1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["BlockLayout", "BlockCausalMask", "TeacherForcingMask", "TileTable", "block_causal", "sliding_window",
           "teacher_forcing", "teacher_forcing_positions"]

_ROW_CHUNK = 8192  # rows classified per step when building tile tables (bounds the temporary [rows, tiles])


class TileTable(NamedTuple):
    """Tile sparsity for one ``(lq, lk, block_m, block_n)``: entries are int32 tile indices, sorted.

    ``kv_*``: for each of ``nq = ceil(lq/block_m)`` query tiles, the key tiles to visit (``*_num [nq]``,
    ``*_idx [nq, nk]``, only the first ``num`` entries of a row are meaningful); ``q_*``: the transpose, for
    each of the ``nk`` key tiles the query tiles (backward dK/dV). ``full`` tiles need no mask at all;
    ``part`` tiles are masked elementwise with ``row_iv`` (``[lq, 4]`` int32 ``s0, e0, s1, e1``).
    """

    row_iv: Tensor
    kv_full_num: Tensor
    kv_full_idx: Tensor
    kv_part_num: Tensor
    kv_part_idx: Tensor
    q_full_num: Tensor
    q_full_idx: Tensor
    q_part_num: Tensor
    q_part_idx: Tensor
    density: float  # fraction of allowed (query, key) pairs


@dataclass(frozen=True)
class BlockLayout:
    """Latent frames grouped in blocks: ``[first_block_frames | frames_per_block | ...]`` (c3-3, c1-4, ...).

    The one frame-block layout of the kernels, networks, training and pipelines (``rcm_losses.FrameBlocks``
    is its twin for a fixed video length, kept there because rcm-losses depends on torch alone)."""

    frames_per_block: int
    first_block_frames: int | None = None

    def __post_init__(self):
        if self.frames_per_block < 1 or (self.first_block_frames is not None and self.first_block_frames < 1):
            raise ValueError(f"BlockLayout: block sizes must be >= 1, got {self}")

    @property
    def first(self) -> int:
        """Latent frames of block 0."""
        return self.frames_per_block if self.first_block_frames is None else self.first_block_frames

    def block_frames(self, index: int) -> int:
        """Latent frames of block ``index``."""
        return self.first if index == 0 else self.frames_per_block

    def block_start(self, index: int) -> int:
        """First latent frame of block ``index`` (``index`` may be the block count: one past the end)."""
        return 0 if index <= 0 else self.first + (index - 1) * self.frames_per_block

    def num_blocks(self, frames: int) -> int:
        """Blocks needed to cover at least ``frames`` latent frames."""
        if frames <= self.first:
            return 1
        return 1 + -(-(frames - self.first) // self.frames_per_block)

    def covers_exactly(self, frames: int) -> bool:
        """Whether ``frames`` latent frames are a whole number of blocks."""
        return self.block_start(self.num_blocks(frames)) == frames

    def mask(self, num_blocks: int, tokens_per_frame: int, *, window_blocks: int | None = None,
             sink_blocks: int = 0, teacher_forcing: bool = False) -> BlockCausalMask | TeacherForcingMask:
        """The full-sequence mask of this layout: block-causal, sliding window + sink, or teacher forcing over
        ``[clean ; noisy]``."""
        kw = dict(first_block_frames=self.first)
        if teacher_forcing:
            return TeacherForcingMask(_blocks(num_blocks, self.frames_per_block, tokens_per_frame, self.first))
        if window_blocks is not None:
            return sliding_window(num_blocks, self.frames_per_block, tokens_per_frame,
                                  window_blocks=window_blocks, sink_blocks=sink_blocks, **kw)
        return block_causal(num_blocks, self.frames_per_block, tokens_per_frame, **kw)


@dataclass(frozen=True)
class _Blocks:
    """A :class:`BlockLayout` of ``num_blocks`` blocks seen at token level (``tokens_per_frame`` tokens a
    frame), with the position arithmetic vectorized over tensors."""

    num_blocks: int
    frames_per_block: int
    tokens_per_frame: int
    first_block_frames: int

    def __post_init__(self):
        for name in ("num_blocks", "frames_per_block", "tokens_per_frame", "first_block_frames"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_tokens(self) -> int:
        return BlockLayout(self.frames_per_block, self.first_block_frames).block_start(self.num_blocks) \
            * self.tokens_per_frame

    def block_of(self, pos: Tensor) -> Tensor:
        """Block index of absolute token positions (int64)."""
        f = pos // self.tokens_per_frame
        return torch.where(f < self.first_block_frames, 0,
                           1 + (f - self.first_block_frames).clamp_min(0) // self.frames_per_block)

    def start(self, blk: Tensor) -> Tensor:
        """First token of block ``blk`` (``blk`` may equal ``num_blocks``: one past the end); tensor form of
        :meth:`BlockLayout.block_start`."""
        frames = torch.where(blk <= 0, 0, self.first_block_frames + (blk - 1) * self.frames_per_block)
        return frames * self.tokens_per_frame


class _Mask:
    """Shared machinery: subclasses define ``num_tokens`` and ``_row_intervals(pos) -> (s0, e0, s1, e1)``."""

    num_tokens: int
    q_offset: int
    _cache: dict

    def _row_intervals(self, pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _check(self, lq: int, lk: int) -> None:
        if lk > self.num_tokens or self.q_offset + lq > self.num_tokens or lq < 1 or lk < 1:
            raise ValueError(f"{type(self).__name__} covers {self.num_tokens} tokens; got lq={lq} "
                             f"(q_offset={self.q_offset}), lk={lk}")

    def intervals(self, lq: int, lk: int, device) -> Tensor:
        """``[lq, 4]`` int32: each query row attends to keys in ``[s0, e0) ∪ [s1, e1)`` (clipped to ``lk``,
        disjoint and not touching; an empty interval has ``s >= e``)."""
        key = ("iv", lq, lk, str(device))
        if key not in self._cache:
            self._check(lq, lk)
            pos = torch.arange(lq, device=device, dtype=torch.int64) + self.q_offset
            s0, e0, s1, e1 = (x.clamp(0, lk) for x in self._row_intervals(pos))
            # merge touching/overlapping intervals: then a tile is "full" iff one interval covers it
            merge = (s0 < e0) & (s1 < e1) & (s1 <= e0) & (s0 <= e1)
            s0, e0 = torch.where(merge, torch.minimum(s0, s1), s0), torch.where(merge, torch.maximum(e0, e1), e0)
            s1, e1 = torch.where(merge, 0, s1), torch.where(merge, 0, e1)
            self._cache[key] = torch.stack((s0, e0, s1, e1), dim=1).to(torch.int32).contiguous()
        return self._cache[key]

    def dense(self, lq: int, lk: int, device) -> Tensor:
        """``[lq, lk]`` boolean twin (True = attend)."""
        iv = self.intervals(lq, lk, device).unsqueeze(-1)  # [lq, 4, 1]
        return _in_intervals(torch.arange(lk, device=device, dtype=torch.int32), *iv.unbind(1))

    def tiles(self, lq: int, lk: int, block_m: int, block_n: int, device) -> TileTable:
        """Per-tile sparsity lists for tiles of ``block_m`` queries x ``block_n`` keys (cached)."""
        key = ("tiles", lq, lk, block_m, block_n, str(device))
        if key not in self._cache:
            self._cache[key] = _build_tiles(self.intervals(lq, lk, device), lk, block_m, block_n)
        return self._cache[key]

    def flex(self, lq: int, lk: int, device, block_size: int = 128):
        """A FlexAttention ``BlockMask`` (batch and head broadcast), from the tile table at ``block_size``."""
        key = ("flex", lq, lk, block_size, str(device))
        if key not in self._cache:
            from torch.nn.attention.flex_attention import BlockMask

            t = self.tiles(lq, lk, block_size, block_size, device)
            pad = -lq % block_size  # Flex may evaluate the mask on the padded rows of the last tile
            iv = torch.nn.functional.pad(self.intervals(lq, lk, device), (0, 0, 0, pad))
            # four 1-D columns indexed by q_idx alone: Flex's flash-attn-4 (CuTeDSL) lowering cannot index a
            # captured tensor with a constant (iv[q_idx, 0] fails there with "Expected TensorSSA")
            s0, e0, s1, e1 = (c.contiguous() for c in iv.unbind(1))

            def mask_mod(b, h, q_idx, kv_idx):
                return _in_intervals(kv_idx, s0[q_idx], e0[q_idx], s1[q_idx], e1[q_idx])

            mask_mod.__name__ = f"{type(self).__name__}_mask"
            self._cache[key] = BlockMask.from_kv_blocks(
                t.kv_part_num[None, None], t.kv_part_idx[None, None], t.kv_full_num[None, None],
                t.kv_full_idx[None, None], BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(lq, lk))
        return self._cache[key]

    def density(self, lq: int, lk: int, device="cpu") -> float:
        """Fraction of allowed (query, key) pairs."""
        return _density(self.intervals(lq, lk, device), lk)


def _in_intervals(k: Tensor, s0: Tensor, e0: Tensor, s1: Tensor, e1: Tensor) -> Tensor:
    """Whether key index ``k`` lies in ``[s0, e0) ∪ [s1, e1)`` (broadcasting)."""
    return ((k >= s0) & (k < e0)) | ((k >= s1) & (k < e1))


def _density(iv: Tensor, lk: int) -> float:
    """Fraction of allowed pairs for row intervals ``iv [lq, 4]`` over ``lk`` keys."""
    allowed = (iv[:, 1] - iv[:, 0]).clamp_min(0) + (iv[:, 3] - iv[:, 2]).clamp_min(0)
    return float(allowed.double().sum()) / (iv.shape[0] * lk)


def _sorted_lists(sel: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of a boolean ``[R, C]`` matrix: the count of True and their column indices (sorted, padded)."""
    cols = torch.arange(sel.shape[1], device=sel.device, dtype=torch.int32)
    keyed = torch.where(sel, cols, cols + sel.shape[1])
    idx = keyed.sort(dim=1).values
    idx = torch.where(idx >= sel.shape[1], 0, idx)
    return sel.sum(1, dtype=torch.int32).contiguous(), idx.to(torch.int32).contiguous()


def _build_tiles(iv: Tensor, lk: int, block_m: int, block_n: int) -> TileTable:
    lq = iv.shape[0]
    nq, nk = -(-lq // block_m), -(-lk // block_n)
    n0 = torch.arange(nk, device=iv.device, dtype=torch.int32) * block_n
    n1 = (n0 + block_n).clamp_max(lk)  # last tile may be short
    in_bounds = n0 + block_n <= lk
    any_tiles, all_tiles = [], []
    for r0 in range(0, lq, _ROW_CHUNK):  # classify rows x key tiles, then reduce over each query tile's rows
        r = iv[r0:r0 + _ROW_CHUNK, :, None]  # [rows, 4, 1]
        overlap = ((r[:, 0] < n1) & (r[:, 1] > n0)) | ((r[:, 2] < n1) & (r[:, 3] > n0))  # [rows, nk]
        cover = (((r[:, 0] <= n0) & (r[:, 1] >= n1)) | ((r[:, 2] <= n0) & (r[:, 3] >= n1))) & in_bounds
        any_tiles.append(overlap)
        all_tiles.append(cover)
    overlap, cover = torch.cat(any_tiles), torch.cat(all_tiles)
    pad = nq * block_m - lq  # rows past lq: never overlap, never "full" (full tiles load without bounds)
    overlap = torch.nn.functional.pad(overlap, (0, 0, 0, pad), value=False).view(nq, block_m, nk).any(1)
    cover = torch.nn.functional.pad(cover, (0, 0, 0, pad), value=False).view(nq, block_m, nk).all(1)
    full, part = cover, overlap & ~cover  # [nq, nk]
    return TileTable(iv, *_sorted_lists(full), *_sorted_lists(part), *_sorted_lists(full.T),
                     *_sorted_lists(part.T), _density(iv, lk))


@dataclass(frozen=True)
class BlockCausalMask(_Mask):
    """Block-causal attention, optionally limited to the last ``window_blocks`` blocks plus ``sink_blocks``.

    A query in block ``b`` attends to keys in blocks ``<= b`` (bidirectional inside its block); with a
    window, only to blocks ``b - window_blocks + 1 .. b``, plus blocks ``< sink_blocks`` (those ``<= b``).
    """

    blocks: _Blocks
    window_blocks: int | None = None
    sink_blocks: int = 0
    q_offset: int = 0
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.window_blocks is not None and self.window_blocks < 1:
            raise ValueError(f"window_blocks must be >= 1 or None, got {self.window_blocks}")
        if self.sink_blocks < 0 or (self.sink_blocks and self.window_blocks is None):
            raise ValueError(f"sink_blocks={self.sink_blocks} needs a window (window_blocks) and must be >= 0")
        if self.q_offset < 0:
            raise ValueError(f"q_offset must be >= 0, got {self.q_offset}")

    @property
    def num_tokens(self) -> int:
        return self.blocks.num_tokens

    def _row_intervals(self, pos):
        b = self.blocks.block_of(pos)
        end = self.blocks.start(b + 1)
        if self.window_blocks is None:
            return torch.zeros_like(pos), end, torch.zeros_like(pos), torch.zeros_like(pos)
        win_start = self.blocks.start((b - self.window_blocks + 1).clamp_min(0))
        sink_end = self.blocks.start(torch.minimum(b + 1, torch.full_like(b, self.sink_blocks)))
        return torch.zeros_like(pos), sink_end, win_start, end


@dataclass(frozen=True)
class TeacherForcingMask(_Mask):
    """Teacher forcing on ``[clean blocks ; noisy blocks]`` (length ``2 x`` the block tokens).

    Noisy block ``i`` attends to clean blocks ``< i`` and to itself (never its own clean copy, which would leak
    the target, and never other noisy blocks). Clean block ``i`` attends block-causally to clean blocks
    ``<= i``: the clean half is then exactly a block-causal pass over the context, so its keys/values equal the
    ones a KV cache holds at inference.
    """

    blocks: _Blocks
    q_offset: int = 0
    _cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return 2 * self.blocks.num_tokens

    def _row_intervals(self, pos):
        clean = self.blocks.num_tokens
        noisy = pos >= clean
        b = self.blocks.block_of(torch.where(noisy, pos - clean, pos))
        start, end = self.blocks.start(b), self.blocks.start(b + 1)
        zero = torch.zeros_like(pos)
        e0 = torch.where(noisy, start, end)
        s1, e1 = torch.where(noisy, clean + start, zero), torch.where(noisy, clean + end, zero)
        return zero, e0, s1, e1


def _blocks(num_blocks, frames_per_block, tokens_per_frame, first_block_frames) -> _Blocks:
    first = frames_per_block if first_block_frames is None else first_block_frames
    return _Blocks(int(num_blocks), int(frames_per_block), int(tokens_per_frame), int(first))


def block_causal(num_blocks: int, frames_per_block: int, tokens_per_frame: int, *,
                 first_block_frames: int | None = None, q_offset: int = 0) -> BlockCausalMask:
    """Block-causal mask over ``num_blocks`` blocks (first block ``first_block_frames``, default
    ``frames_per_block``). ``c3-3``: ``block_causal(7, 3, 1560)``; ``c1-4``: ``block_causal(6, 4, 1560,
    first_block_frames=1)``; ``c1-1``: ``block_causal(21, 1, 1560)``."""
    return BlockCausalMask(_blocks(num_blocks, frames_per_block, tokens_per_frame, first_block_frames),
                           q_offset=q_offset)


def sliding_window(num_blocks: int, frames_per_block: int, tokens_per_frame: int, *, window_blocks: int,
                   sink_blocks: int = 0, first_block_frames: int | None = None,
                   q_offset: int = 0) -> BlockCausalMask:
    """Block-causal mask seeing only the last ``window_blocks`` blocks (its own included) plus the first
    ``sink_blocks`` blocks (the attention sink)."""
    return BlockCausalMask(_blocks(num_blocks, frames_per_block, tokens_per_frame, first_block_frames),
                           window_blocks=window_blocks, sink_blocks=sink_blocks, q_offset=q_offset)


def teacher_forcing(num_blocks: int, frames_per_block: int, tokens_per_frame: int, *,
                    first_block_frames: int | None = None) -> TeacherForcingMask:
    """Teacher-forcing mask over ``[clean ; noisy]``, each half ``num_blocks`` blocks (see the class)."""
    return TeacherForcingMask(_blocks(num_blocks, frames_per_block, tokens_per_frame, first_block_frames))


def teacher_forcing_positions(frames: int, device: torch.device | str | None = None) -> Tensor:
    """RoPE frame positions ``[2·frames]`` of a packed ``[clean ; noisy]`` teacher-forcing sequence: ``0..T-1``
    twice (the noisy copy of a frame sits at the same temporal position as its clean copy)."""
    pos = torch.arange(frames, device=device)
    return torch.cat([pos, pos])
