"""umT5-xxl text encoder as Wan2.1 uses it (``models_t5_umt5-xxl-enc-bf16.pth``), docs/nets_encoders.md, umT5

Layout legend: ``b`` batch, ``l`` tokens, ``n`` heads, ``d`` head dim. T5 v1.1 encoder: unscaled token
embedding, pre-RMSNorm blocks (attention with a per-layer bidirectional relative-position bias and **no**
``1/sqrt(d)`` scaling; gated tanh-GELU FFN), final RMSNorm, no biases anywhere. Keys are the official ones.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UMT5Encoder", "relative_position_buckets"]


def relative_position_buckets(lq: int, lk: int, num_buckets: int = 32, max_distance: int = 128,
                              device: torch.device | None = None) -> Tensor:
    """Bidirectional T5 bucket of ``r = key_pos − query_pos`` for every (query, key): ``[lq, lk]`` int64.

    Half of the buckets are for ``r > 0``; within a half, ``|r| < nb/2`` is exact and larger distances are
    log-spaced up to ``max_distance`` (float32 log, truncated, clamped to the last bucket).
    """
    r = torch.arange(lk, device=device)[None, :] - torch.arange(lq, device=device)[:, None]
    half = num_buckets // 2
    base = (r > 0).long() * half
    a = r.abs()
    max_exact = half // 2
    # clamp a to >= 1 inside the log only to avoid log(0); those entries take the exact branch anyway
    log_ratio = torch.log(a.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (half - max_exact)).long()).clamp(max=half - 1)
    return base + torch.where(a < max_exact, a, large)


class _RMSNorm(nn.Module):
    """T5 LayerNorm: ``x · rsqrt(mean(x²) + eps) · weight``; statistic in float32, cast to a half weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.type_as(self.weight)
        return self.weight * y


class _RelativeBias(nn.Module):
    """Relative-position bias table ``embedding [num_buckets, num_heads]`` → bias ``[1, n, lq, lk]``."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int = 128):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, lq: int, lk: int) -> Tensor:
        buckets = relative_position_buckets(lq, lk, self.num_buckets, self.max_distance,
                                            self.embedding.weight.device)
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


class _Attention(nn.Module):
    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn={dim_attn} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(dim, dim_attn, bias=False) for _ in range(3))
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x_bld: Tensor, key_mask_bl: Tensor, bias_1nqk: Tensor) -> Tensor:
        b, l, _ = x_bld.shape
        q, k, v = (p(x_bld).view(b, l, self.num_heads, -1) for p in (self.q, self.k, self.v))
        # masked keys: the bias is *replaced* by the most negative finite value (not added to)
        bias = bias_1nqk.to(x_bld.dtype).expand(b, -1, -1, -1)
        bias = bias.masked_fill(~key_mask_bl[:, None, None, :], torch.finfo(x_bld.dtype).min)
        logits = torch.einsum("bind,bjnd->bnij", q, k) + bias  # no 1/sqrt(d) scaling (T5)
        attn = F.softmax(logits.float(), dim=-1).type_as(logits)
        y = torch.einsum("bnij,bjnd->bind", attn, v).reshape(b, l, -1)
        return self.o(y)


class _FeedForward(nn.Module):
    """``fc2(fc1(x) · gelu_tanh(gate(x)))``; ``gate`` is a Sequential so its key is ``gate.0``."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), nn.GELU(approximate="tanh"))
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: Tensor) -> Tensor:
    # the reference keeps fp16 activations finite by clamping after each residual add
    if x.dtype == torch.float16 and torch.isinf(x).any():
        c = torch.finfo(x.dtype).max - 1000
        x = x.clamp(-c, c)
    return x


class _Block(nn.Module):
    def __init__(self, dim: int, dim_attn: int, dim_ffn: int, num_heads: int, num_buckets: int,
                 shared_pos: bool, dropout: float):
        super().__init__()
        self.norm1 = _RMSNorm(dim)
        self.attn = _Attention(dim, dim_attn, num_heads)
        self.norm2 = _RMSNorm(dim)
        self.ffn = _FeedForward(dim, dim_ffn)
        self.pos_embedding = None if shared_pos else _RelativeBias(num_buckets, num_heads)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor, shared_bias: Tensor | None) -> Tensor:
        l = x.shape[1]
        bias = shared_bias if self.pos_embedding is None else self.pos_embedding(l, l)
        x = _fp16_clamp(x + self.dropout(self.attn(self.norm1(x), key_mask, bias)))
        return _fp16_clamp(x + self.dropout(self.ffn(self.norm2(x))))


class UMT5Encoder(nn.Module):
    """umT5 encoder; defaults are umt5-xxl (vocab 256384, dim 4096, 64 heads, FFN 10240, 24 layers).

    Constructor arguments use the official names. ``shared_pos=False`` (umT5) gives every block its own
    relative-bias table ``blocks.<i>.pos_embedding.embedding.weight``; ``True`` gives one shared table
    ``pos_embedding.embedding.weight`` (T5 v1.1). ``dropout`` is inactive in eval mode.
    """

    def __init__(self, vocab: int = 256384, dim: int = 4096, dim_attn: int = 4096, dim_ffn: int = 10240,
                 num_heads: int = 64, num_layers: int = 24, num_buckets: int = 32, shared_pos: bool = False,
                 dropout: float = 0.1):
        super().__init__()
        self.vocab, self.dim = vocab, dim
        self.token_embedding = nn.Embedding(vocab, dim)
        self.pos_embedding = _RelativeBias(num_buckets, num_heads) if shared_pos else None
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            _Block(dim, dim_attn, dim_ffn, num_heads, num_buckets, shared_pos, dropout) for _ in range(num_layers)
        )
        self.norm = _RMSNorm(dim)

    def forward(self, ids: Tensor, mask: Tensor | None = None, *, zero_padding: bool = True) -> Tensor:
        """Encode token ids.

        Args:
            ids: ``[B, L]`` integer token ids (right-padded).
            mask: ``[B, L]``, nonzero for real tokens; ``None`` means no padding. Only keys are masked.
            zero_padding: set rows at padded positions (``mask == 0``) to zero, as the rCM pipeline does;
                ``False`` returns the encoder's values there too (the official module's raw output).

        Returns:
            ``[B, L, dim]`` hidden states in the parameters' dtype.
        """
        if ids.ndim != 2 or ids.is_floating_point():
            raise ValueError(f"UMT5Encoder: ids must be an integer [B, L] tensor, got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        if mask is None:
            mask = torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise ValueError(f"UMT5Encoder: mask shape {tuple(mask.shape)} must equal ids shape {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise ValueError(f"UMT5Encoder: token ids must lie in [0, {self.vocab}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        key_mask = mask.to(ids.device) != 0
        x = self.dropout(self.token_embedding(ids))
        l = ids.shape[1]
        shared = None if self.pos_embedding is None else self.pos_embedding(l, l)
        for block in self.blocks:
            x = block(x, key_mask, shared)
        x = self.dropout(self.norm(x))
        if zero_padding:
            x = x.masked_fill(~key_mask[..., None], 0.0)
        return x
