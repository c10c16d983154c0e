"""Ulysses context parallelism, applied at the two seams of ``rcm_kernels.attention``.

Layout legend: B batch, L full token sequence (Lp padded to a multiple of the CP size c), Lc = Lp / c
tokens per rank, H heads, D head dim.

* :class:`UlyssesSequenceShard` splits the token sequence after the patch embedding (``[B, L, ...] ->
  [B, Lc, ...]``, zero-padded when ``c`` does not divide ``L``) and gathers it back before the head, with the
  gradient of the gather flowing only into the local part.
* :class:`UlyssesAttention` turns "local tokens, all heads" into "all tokens, local heads" with one
  all-to-all of q, k, v and their tangents, runs the wrapped attention on the true (unpadded) sequence, and
  sends the output (and its tangent) back. Padding never reaches the attention: padded queries are cut
  before and re-added as zeros after it, so padded keys cannot be attended and the network's block mask
  (defined over the true length) applies unchanged. The ``block_mask`` argument passes through untouched, so
  a causal network's KV-cached block pass works too: the wrapped seam reads and writes the cache with the
  ``H/c`` heads of this rank (the cache holds head-sharded k/v, e.g. ``WanDiT.local_heads``), and the CP size
  is bound by the heads only, never by the number of tokens or frames.

Both collectives are autograd Functions with a forward-AD rule, so ``torch.func.jvp`` through a whole CP
network works as well as explicit tangents passed to the attention seam. Every rank of a CP group must see
the same inputs and randomness (:func:`broadcast_from_leader`); each then computes the full loss, and its
parameter gradients are the contribution of its own tokens (FSDP sums them over the CP dimension).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rcm_kernels.attention import Attention, SequenceShard

__all__ = ["UlyssesSequenceShard", "UlyssesAttention", "apply_context_parallel", "broadcast_from_leader"]


def _pad_zeros(x: Tensor, dim: int, n: int) -> Tensor:
    """``x`` with ``n`` zero entries appended along ``dim`` (``x`` itself when ``n == 0``)."""
    if not n:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([x, x.new_zeros(shape)], dim)


class _AllToAll(torch.autograd.Function):
    """Equal-split ``all_to_all_single`` over dim 0. The exchange is its own inverse, so backward and the
    forward-AD rule apply the same exchange to the gradient / tangent."""

    @staticmethod
    def forward(x: Tensor, group: dist.ProcessGroup) -> Tensor:
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.group = inputs[1]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllToAll.apply(grad, ctx.group), None

    @staticmethod
    def jvp(ctx, tangent: Tensor, _):
        return _AllToAll.apply(tangent, ctx.group)


class _GatherSeq(torch.autograd.Function):
    """All-gather along ``dim`` and cut to ``seq_len``; backward keeps only this rank's slice of the gradient
    (each rank computes the same full loss, so summing the per-rank slices over the group counts every
    token's gradient once)."""

    @staticmethod
    def forward(x: Tensor, dim: int, seq_len: int, group: dist.ProcessGroup) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        full = torch.cat(parts, dim)
        return full if full.shape[dim] == seq_len else full.narrow(dim, 0, seq_len).contiguous()

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.dim, ctx.seq_len, ctx.group = inputs
        ctx.local_len = x.shape[ctx.dim]

    @staticmethod
    def backward(ctx, grad: Tensor):
        start = dist.get_rank(ctx.group) * ctx.local_len
        keep = max(0, min(ctx.local_len, ctx.seq_len - start))
        # this rank's padded tokens get no gradient
        local = _pad_zeros(grad.narrow(ctx.dim, start, keep), ctx.dim, ctx.local_len - keep)
        return local.contiguous(), None, None, None

    @staticmethod
    def jvp(ctx, tangent: Tensor, *_):
        return _GatherSeq.apply(tangent, ctx.dim, ctx.seq_len, ctx.group)


class _LengthByMask:
    """The true sequence length each ``block_mask`` object was first used with (weakly keyed by identity).

    Activation checkpointing recomputes a block in backward, after later forwards have sharded other
    sequences: a causal network's cached blocks differ in length. A mask (a teacher-forcing mask, one cached
    call) is defined over one length, so the length it was first seen with is the one its recompute must cut
    the padding to. ``None`` (bidirectional attention) and objects without weak references fall back to the
    last sharded length.
    """

    def __init__(self):
        self._seen: dict[int, tuple[weakref.ref, int]] = {}

    def __call__(self, mask, seq_len: int) -> int:
        if mask is None:
            return seq_len
        key = id(mask)
        entry = self._seen.get(key)
        if entry is not None and entry[0]() is mask:
            return entry[1]
        try:
            ref = weakref.ref(mask, lambda _, key=key, seen=self._seen: seen.pop(key, None))
        except TypeError:
            return seq_len
        self._seen[key] = (ref, seq_len)
        return seq_len


class UlyssesSequenceShard(SequenceShard):
    """Token split/gather over a CP group. Remembers the true length of the last sharded sequence; the
    :class:`UlyssesAttention` modules of the same network read it to cut the padding.

    Every per-token tensor of one forward (tokens, RoPE tables, per-token modulation) must be sharded through
    this object with the same full length L.
    """

    def __init__(self, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.seq_len: int | None = None
        self.length_of = _LengthByMask()

    def padded_len(self, seq_len: int) -> int:
        return -(-seq_len // self.size) * self.size

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        seq_len = x.shape[dim]
        self.seq_len = seq_len
        return _pad_zeros(x, dim, self.padded_len(seq_len) - seq_len).chunk(self.size, dim)[self.rank]

    def gather(self, x: Tensor, dim: int = 1) -> Tensor:
        if self.seq_len is None:
            raise RuntimeError("SequenceShard.gather called before shard: the true sequence length is unknown")
        return _GatherSeq.apply(x, dim, self.seq_len, self.group)


def _seq_to_heads(xs: list[Tensor], group: dist.ProcessGroup, c: int) -> list[Tensor]:
    """``[B, Lc, H, D]`` (each rank its tokens) -> ``[B, c*Lc, H/c, D]`` (each rank its heads); one exchange."""
    b, lc, h, d = xs[0].shape
    x = torch.stack([t.reshape(b, lc, c, h // c, d).permute(2, 0, 1, 3, 4) for t in xs], 1)  # [c, n, B, Lc, H/c, D]
    y = _AllToAll.apply(x, group)  # dim 0 now indexes the source rank's token chunk
    return [y[:, i].transpose(0, 1).reshape(b, c * lc, h // c, d) for i in range(len(xs))]


def _heads_to_seq(xs: list[Tensor], group: dist.ProcessGroup, c: int) -> list[Tensor]:
    """Inverse of :func:`_seq_to_heads`: ``[B, c*Lc, H/c, D]`` -> ``[B, Lc, H, D]``."""
    b, lp, hc, d = xs[0].shape
    x = torch.stack([t.reshape(b, c, lp // c, hc, d).transpose(0, 1) for t in xs], 1)  # [c, n, B, Lc, H/c, D]
    y = _AllToAll.apply(x, group)  # dim 0 now indexes the source rank's head group
    return [y[:, i].permute(1, 2, 0, 3, 4).reshape(b, lp // c, c * hc, d) for i in range(len(xs))]


def _exchange(fn, xs: list[Tensor], group: dist.ProcessGroup, c: int) -> list[Tensor]:
    """Apply ``fn`` with one collective per dtype (q/k/v and tangents usually share one)."""
    out: list[Tensor | None] = [None] * len(xs)
    for dtype in dict.fromkeys(x.dtype for x in xs):
        idx = [i for i, x in enumerate(xs) if x.dtype == dtype]
        for i, y in zip(idx, fn([xs[i] for i in idx], group, c)):
            out[i] = y
    return out


class UlyssesAttention(nn.Module):
    """Context-parallel self-attention around an existing attention module (same call signature).

    Inputs are this rank's tokens ``[B, Lc, H, D]``; the wrapped module sees ``[B, L, H/c, D]``. ``H`` must be
    divisible by the CP size. The wrapped module is kept unregistered so parameter names do not change.
    """

    def __init__(self, inner: nn.Module, shard: UlyssesSequenceShard):
        super().__init__()
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "seq", shard)
        self.context_parallel = True

    def forward(self, q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None = None, tk: Tensor | None = None,
                tv: Tensor | None = None, *, scale: float | None = None, block_mask=None):
        c, group = self.seq.size, self.seq.group
        heads = q.shape[2]
        if heads % c:
            raise ValueError(f"context parallel size {c} must divide the number of attention heads {heads}")
        if not (q.shape == k.shape == v.shape):
            raise ValueError(f"Ulysses self-attention needs q, k, v of one shape, got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        seq_len = self.seq.seq_len if self.seq.seq_len is None else self.seq.length_of(block_mask, self.seq.seq_len)
        if seq_len is None or self.seq.padded_len(seq_len) != q.shape[1] * c:
            raise RuntimeError(f"attention got {q.shape[1]} local tokens x {c} ranks, but the sequence seam "
                               f"last sharded a sequence of {seq_len}: shard the tokens through the network's "
                               "SequenceShard before attention")
        tangents = [t for t in (tq, tk, tv) if t is not None]
        full = _exchange(_seq_to_heads, [q, k, v, *tangents], group, c)
        full = [x[:, :seq_len] for x in full]  # drop padded tokens: queries and keys
        it = iter(full[3:])
        tq, tk, tv = (None if t is None else next(it) for t in (tq, tk, tv))
        out, tout = self.inner(*full[:3], tq, tk, tv, scale=scale, block_mask=block_mask)
        pad = q.shape[1] * c - seq_len
        outs = [_pad_zeros(o, 1, pad) for o in ([out] if tout is None else [out, tout])]
        outs = _exchange(_heads_to_seq, outs, group, c)
        return outs[0], (outs[1] if tout is not None else None)


def _replace(model: nn.Module, match, make) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, name, make(child))
                count += 1
    return count


def apply_context_parallel(model: nn.Module, group: dist.ProcessGroup) -> UlyssesSequenceShard:
    """Swap the network's :class:`SequenceShard` and self-attention :class:`Attention` seams for Ulysses
    versions sharing one shard object. Cross-attention (``context_parallel=False``) stays local.

    Returns the shard object. Raises if the network has no sequence seam or no CP attention seam.
    """
    if any(isinstance(m, UlyssesSequenceShard) for m in model.modules()):
        raise ValueError("context parallel is already applied to this model")
    shard = UlyssesSequenceShard(group)
    n_seq = _replace(model, lambda m: isinstance(m, SequenceShard), lambda m: shard)
    n_att = _replace(model, lambda m: isinstance(m, Attention) and m.context_parallel,
                     lambda m: UlyssesAttention(m, shard))
    if n_seq == 0 or n_att == 0:
        raise ValueError(f"context parallel needs the rcm_kernels seams: found {n_seq} SequenceShard and {n_att} "
                         f"self-attention Attention modules in {type(model).__name__}")
    return shard


def broadcast_from_leader(tensors: list[Tensor] | Tensor, group: dist.ProcessGroup | None) -> None:
    """In place: every rank of ``group`` gets the values of the group's first rank (noise, times, batches).

    No-op for ``None`` or a group of one.
    """
    if group is None or dist.get_world_size(group) == 1:
        return
    src = dist.get_global_rank(group, 0)
    for t in [tensors] if isinstance(tensors, Tensor) else tensors:
        dist.broadcast(t, src=src, group=group)
