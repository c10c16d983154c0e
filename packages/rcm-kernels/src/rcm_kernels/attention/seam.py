"""The two seams through which parallelism reaches a network from outside.

Networks call an :class:`Attention` module for every attention and a :class:`SequenceShard` module around
their token sequence. Both are plain, single-device no-ops here; ``rcm_train.parallel`` replaces them with
Ulysses context-parallel versions (all-to-all of q/k/v and their tangents; token split and gather)
without the network knowing about ``torch.distributed``.
"""

from __future__ import annotations

from torch import Tensor, nn

from .jvp import jvp_attention


class Attention(nn.Module):
    """Attention call site: ``forward(q, k, v, tq=None, tk=None, tv=None, *, scale, block_mask)``.

    Tensors are ``[B, L, H, D]``. Returns ``(out, tangent_out)``; ``tangent_out`` is None when all tangents
    are None. ``context_parallel`` marks self-attention sites that a context-parallel wrapper should take
    over (cross-attention to the text stays local).
    """

    def __init__(self, context_parallel: bool = True):
        super().__init__()
        self.context_parallel = context_parallel

    def forward(self, q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None = None, tk: Tensor | None = None,
                tv: Tensor | None = None, *, scale: float | None = None, block_mask=None):
        return jvp_attention(q, k, v, tq, tk, tv, scale=scale, block_mask=block_mask)


class SequenceShard(nn.Module):
    """Token-sequence seam: ``shard`` keeps this rank's part of a full sequence, ``gather`` undoes it.

    Single-device default: both are the identity. A context-parallel replacement splits along ``dim``
    (padding to a multiple of the group size) and gathers with gradient flowing only into the local part.
    """

    def shard(self, x: Tensor, dim: int = 1) -> Tensor:
        return x

    def gather(self, x: Tensor, dim: int = 1) -> Tensor:
        return x
