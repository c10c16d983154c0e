"""Tiny DiT-like networks for the trainer tests: the same seams as WanDiT, a few thousand parameters."""

from __future__ import annotations

import torch
from torch import nn

from rcm_kernels.attention import Attention, SequenceShard


class TinyBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.self_attn = Attention(context_parallel=True)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.calls = 0  # forward calls, to see activation-checkpoint recomputation

    def forward(self, x):  # x [B, L, dim]
        self.calls += 1
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).unbind(2)  # [B, L, H, D] each
        o, _ = self.self_attn(q, k, v)
        x = x + self.proj(o.flatten(2))
        return x + self.ffn(self.norm2(x))


class TinyDiT(nn.Module):
    """``forward(x [B, L, C], t [B]) -> [B, L, C]``: patch embed, time embed, blocks between the sequence seams."""

    def __init__(self, in_dim: int = 4, dim: int = 16, heads: int = 4, depth: int = 2):
        super().__init__()
        self.patch_embedding = nn.Linear(in_dim, dim)
        self.time_embedding = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(TinyBlock(dim, heads) for _ in range(depth))
        self.head = nn.Linear(dim, in_dim)
        self.seq = SequenceShard()

    def forward(self, x, t):
        h = self.patch_embedding(x) + self.time_embedding(t[:, None].to(x.dtype))[:, None]
        h = self.seq.shard(h, dim=1)
        for block in self.blocks:
            h = block(h)
        return self.seq.gather(self.head(h), dim=1)  # parameters run before the gather (as in WanDiT)


def tiny_dit(seed: int = 0, **kw) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT(**kw)
