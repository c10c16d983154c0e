"""Launch helpers shared by the fused kernels: dtype map, warps per row width, modulation-row strides, and the
row split of the backward kernels (token chunks per modulation row)."""

from __future__ import annotations

import functools
import weakref

import torch
import triton
import triton.language as tl
from torch import Tensor

TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# No fused multiply-add contraction: every product and sum rounds as in the unfused torch ops (the kernels are
# memory-bound, FMA buys nothing), so elementwise results match torch bit for bit. Set explicitly: triton 3.9
# warns when it is left to its default.
OPTS = dict(enable_fp_fusion=False)


def num_warps(block: int) -> int:
    """Warps for one row of ``block`` elements (8 elements per thread at C = 1536)."""
    return 1 if block <= 256 else 4 if block <= 1024 else 8


def rows(m: Tensor | None) -> tuple[Tensor | None, int, int]:
    """A modulation tensor ``[B, Tm, C]`` with unit stride on C, and its (batch, row) strides."""
    if m is None:
        return None, 0, 0
    if m.stride(-1) != 1:
        m = m.contiguous()
    return m, m.stride(0), m.stride(1)


# Backward row split: about PROGRAMS_PER_SM programs per SM (each loops over >= MIN_ROWS token rows and keeps
# its partial sums of the per-channel gradients in registers), so the [programs, C] float32 partials stay a few
# percent of the activation traffic at the 480p shape (1.3B: ~3 MB per gradient against ~300 MB).
PROGRAMS_PER_SM = 4
MIN_ROWS = 16


def row_split(x: Tensor, index: Tensor | None, tm: int) -> tuple[Tensor | None, Tensor | None, int]:
    """How the backward kernels split the ``[B, L]`` token rows of ``x`` among programs ``(b, row t, chunk k)``.

    Tokens are taken in the order of their modulation row: ``order [L]`` (stable ``argsort(index)``) and
    ``bounds [Tm + 1]`` (tokens of row ``t`` are ``order[bounds[t]:bounds[t + 1]]``), both None without
    ``index`` (one row, tokens in order). Row ``t``'s tokens are cut into ``chunks`` contiguous chunks, one per
    program, so each program adds its tokens' gradient terms into one partial row: no atomics, and the final
    ``sum`` over chunks is deterministic. Built on the device without a host sync (static shapes), and kept
    for the last ``index`` seen (every block of a DiT backward passes the same one).
    """
    b, length = x.shape[0], x.shape[1]
    sms = _sm_count(x.device.index) if x.is_cuda else 4
    chunks = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, b * tm), triton.cdiv(length, tm * MIN_ROWS)))
    if index is None:
        return None, None, chunks
    key = (index._version, tm)
    if _last_split.get("key") == key and _last_split["ref"]() is index:
        return *_last_split["plan"], chunks
    order = torch.argsort(index, stable=True)
    bounds = torch.searchsorted(index[order], torch.arange(tm + 1, device=index.device, dtype=index.dtype))
    _last_split.update(key=key, ref=weakref.ref(index), plan=(order, bounds))
    return order, bounds, chunks


_last_split: dict = {}  # the split of the last index seen: key (version, Tm), weak reference, (order, bounds)


@functools.cache
def _sm_count(device: int | None) -> int:
    return torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device()
                                            ).multi_processor_count


@triton.jit
def chunk_range(BOUNDS, t, k, L, K, HAS_IDX: tl.constexpr):
    """Token positions ``[s, e)`` of chunk ``k`` (of ``K``) of modulation row ``t`` (:func:`row_split`)."""
    if HAS_IDX:
        s0 = tl.load(BOUNDS + t)
        e0 = tl.load(BOUNDS + t + 1)
    else:
        s0 = 0
        e0 = L
    n = (e0 - s0 + K - 1) // K
    s = s0 + k * n
    return s, tl.minimum(s + n, e0)


@triton.jit
def first_token(ORDER, s, e, HAS_IDX: tl.constexpr):
    """What :func:`token_row` starts from for the chunk ``[s, e)``: the first token of ``ORDER`` (with an index)."""
    nxt = s
    if HAS_IDX:
        nxt = tl.load(ORDER + s, mask=s < e, other=0)
    return nxt


@triton.jit
def token_row(b, L, pos, nxt, ORDER, e, HAS_IDX: tl.constexpr):
    """Flat row of the token at chunk position ``pos`` of sample ``b``, and the carry for the next position:
    with an index, the token ``ORDER[pos]`` (fetched a row ahead, so its load overlaps this row's work)."""
    if HAS_IDX:
        row = b * L + nxt
        nxt = tl.load(ORDER + pos + 1, mask=pos + 1 < e, other=0)
    else:
        row = b * L + pos
    return row, nxt
