"""Wan2.1 DiT (``WanModel``): text-to-video and image-to-video, plain and JVP modes.

State-dict keys and shapes are the official ones (``patch_embedding.weight [C, in_dim, 1, 2, 2]`` included:
the Conv3d weight is used as the Linear it is, through a flattened view), so official checkpoints load with
``strict=True``; there are no buffers. Numbers follow WAN21.md §1 and the fp32 islands of RCM_SPEC §7.

Legend: x_bcthw latent video, B batch, T latent frames, L tokens = T·H·W / prod(patch), C = dim.

Seams for parallelism applied from outside: ``blocks`` (a ModuleList: FSDP / activation checkpointing per
block), every attention goes through a ``rcm_kernels.attention.Attention`` module (``self_attn.attn`` with
``context_parallel=True``, ``cross_attn.attn`` with ``False``), and the token sequence is wrapped by
``seq_shard`` (a ``SequenceShard``: ``shard`` right after patch embedding on the tokens, their tangents, the
RoPE angles and the per-token time index; ``gather`` of the head output and its tangent before unpatchify).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from rcm_kernels.attention import SequenceShard

from ._blocks import CLIP_DIM, Head, MLPProj, RMSNorm, WanBlock
from ._ops import Pair, cast, gelu_tanh, island, linear, silu, sinusoid
from ._rope import rope_angles, rope_cos_sin
from .configs import WanConfig, get_config

__all__ = ["WanDiT"]


class WanDiT(nn.Module):
    """The Wan2.1 diffusion transformer (official keys; T2V and I2V; per-sample or per-frame timesteps).

    Build big models on ``meta`` and materialize afterwards::

        with torch.device("meta"):
            net = WanDiT.from_config("t2v-1.3B")
        net.to_empty(device="cuda"); net.init_weights()        # or rcm_nets.checkpoint.load_checkpoint(...)
    """

    def __init__(self, config: WanConfig, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.config = cfg = config
        self.precision = cfg.precision
        fk = dict(device=device, dtype=dtype)
        c = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, c, cfg.patch_size, stride=cfg.patch_size, **fk)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, c, **fk), nn.GELU(approximate="tanh"),
                                            nn.Linear(c, c, **fk))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, c, **fk), nn.SiLU(), nn.Linear(c, c, **fk))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c, **fk))
        self.blocks = nn.ModuleList(WanBlock(cfg, **fk) for _ in range(cfg.num_layers))
        self.head = Head(cfg, **fk)
        if cfg.model_type == "i2v":
            self.img_emb = MLPProj(c, **fk)
        self.seq_shard = SequenceShard()

    @classmethod
    def from_config(cls, name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    **overrides) -> WanDiT:
        """``WanDiT(get_config(name, **overrides))``; names in :mod:`rcm_nets.wan.configs`."""
        return cls(get_config(name, **overrides), device=device, dtype=dtype)

    # ------------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Wan's initialization, in place (after ``to_empty``): xavier-uniform linears and patch embedding,
        zero biases, N(0, 0.02) text/time MLPs, N(0, 1/C) modulation tables, unit norms, zero head.

        The zero head makes a fresh model output exactly 0 (as the official init); tests that check
        tangents must randomize it.
        """
        g = generator
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, generator=g)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) or isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embedding.weight  # xavier over the flattened [C, in_dim·prod(patch)] Linear view
        bound = math.sqrt(6.0 / (w.shape[0] + math.prod(w.shape[1:])))
        nn.init.uniform_(w, -bound, bound, generator=g)
        nn.init.zeros_(self.patch_embedding.bias)
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02, generator=g)
        for table in [b.modulation for b in self.blocks] + [self.head.modulation]:
            nn.init.normal_(table, std=self.config.dim**-0.5, generator=g)
        nn.init.zeros_(self.head.head.weight)

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, t: Tensor, context: Tensor, *, clip_fea: Tensor | None = None,
                y: Tensor | None = None, block_mask=None, frame_offset: int = 0,
                tangents: tuple[Tensor | None, Tensor | None] | None = None):
        """Rectified-flow velocity of the latent video (float32; float64 for float64 parameters).

        Args:
            x: ``[B, C, T, H, W]`` noisy latents (C = out_dim; ``in_dim`` for t2v).
            t: ``[B]`` (or ``[B, 1]``) per-sample, or ``[B, T/pt]`` per-frame timesteps on Wan's 0..1000
                scale, int or float (the sinusoid is computed in float64 from it).
            context: ``[B, Lc, text_dim]`` text embeddings, ``Lc <= text_len``; zero-padded to ``text_len``
                rows before ``text_embedding``, all rows attended (as the official model).
            clip_fea: i2v only, ``[B, 257, 1280]`` CLIP ViT-H/14 penultimate tokens.
            y: i2v only, ``[B, in_dim − C, T, H, W]`` conditioning channels (4 mask + 16 latent),
                concatenated after ``x``; its tangent is zero.
            block_mask: passed to every self-attention (``None`` = bidirectional).
            frame_offset: temporal RoPE position of the first latent frame (causal blocks).
            tangents: ``(tx, tt)`` to run in JVP mode (use :meth:`forward_jvp`).

        Returns: ``out [B, out_dim, T, H, W]``, or ``(out, tangent_out)`` when ``tangents`` is given.
        """
        tx, tt = tangents if tangents is not None else (None, None)
        self._check(x, t, context, clip_fea, y, tx, tt)
        out, tout = self._run(x, tx, t, tt, context, clip_fea, y, block_mask, frame_offset)
        if tangents is None:
            return out
        return out, (torch.zeros_like(out) if tout is None else tout.detach())

    def forward_jvp(self, x: Tensor, t: Tensor, context: Tensor, tx: Tensor | None, tt: Tensor | None, *,
                    clip_fea: Tensor | None = None, y: Tensor | None = None, block_mask=None,
                    frame_offset: int = 0) -> tuple[Tensor, Tensor]:
        """Output and its directional derivative along ``(tx, tt)`` (tangents of ``x`` and ``t``).

        Forward-mode by hand through every op, tangents detached (no graph for them; the primal keeps
        the caller's grad mode and is bit-identical to :meth:`forward`). ``None`` tangents are zero and
        cost nothing; the context (and ``y``, ``clip_fea``) have zero tangent. ``tt`` has ``t``'s shape.
        Goes through ``__call__`` so module hooks (FSDP, checkpointing wrappers) fire as for ``forward``.
        """
        return self(x, t, context, clip_fea=clip_fea, y=y, block_mask=block_mask, frame_offset=frame_offset,
                    tangents=(tx, tt))

    def _run(self, x, tx, t, tt, context, clip_fea, y, block_mask, frame_offset) -> Pair:
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        tok, ttok = self._embed_patches(x, tx, y)
        e, te, e0, te0 = self._time(t, tt)
        mod_index = None
        if e.shape[1] > 1:  # per-frame times: each token takes its frame's modulation
            idx = torch.arange(grid[0], device=x.device).repeat_interleave(grid[1] * grid[2])
            mod_index = self.seq_shard.shard(idx[None], dim=1)[0]
        ctx = self._text(context)
        img = self.img_emb(clip_fea) if cfg.model_type == "i2v" else None
        frame_pos = frame_offset + torch.arange(grid[0], device=x.device)
        ang = rope_angles(frame_pos, grid[1], grid[2], cfg.head_dim)
        rope = tuple(self.seq_shard.shard(r, dim=1) for r in rope_cos_sin(ang, e.dtype))
        tok, ttok = self.seq_shard.shard(tok, dim=1), (None if ttok is None else self.seq_shard.shard(ttok, dim=1))
        for block in self.blocks:
            tok, ttok = block(tok, ttok, e0, te0, ctx, img, rope, mod_index=mod_index, block_mask=block_mask,
                              precision=self.precision)
        out, tout = self.head(tok, ttok, e, te, mod_index)
        out, tout = self.seq_shard.gather(out, dim=1), (None if tout is None else self.seq_shard.gather(tout, dim=1))
        return self._unpatchify(out, grid), (None if tout is None else self._unpatchify(tout, grid))

    # ------------------------------------------------------------------------------------ embeddings
    def _patchify(self, x: Tensor) -> Tensor:
        pt, ph, pw = self.config.patch_size
        return rearrange(x, "b c (f pt) (h ph) (w pw) -> b (f h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)

    def _unpatchify(self, out: Tensor, grid: tuple[int, int, int]) -> Tensor:
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        return rearrange(out, "b (f h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w,
                         pt=pt, ph=ph, pw=pw)

    def _embed_patches(self, x: Tensor, tx: Tensor | None, y: Tensor | None) -> Pair:
        """Conv3d patch embedding as a Linear over ``(c, pt, ph, pw)`` features: ``[B, L, C]``."""
        w = self.patch_embedding.weight.flatten(1)  # [C, in_dim·prod(patch)], a view of the official weight
        xin = x if y is None else torch.cat([x, y.to(x.dtype)], dim=1)
        tok = linear(self._patchify(xin), None, w, self.patch_embedding.bias)[0]
        if tx is None:
            return tok, None
        with torch.no_grad():  # y has zero tangent: only the x columns of the weight act on tx
            return tok, linear(self._patchify(tx), None, w[:, : tx.shape[1] * w.shape[1] // xin.shape[1]], None)[0]

    def _time(self, t: Tensor, tt: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """``e [B, Tm, C]`` and ``e0 [B, Tm, 6, C]`` (+ tangents) in the fp32 island (Tm = 1 or frames)."""
        t = t[:, None] if t.dim() == 1 else t
        tt = None if tt is None else tt.reshape(t.shape)
        te0_, te2 = self.time_embedding[0], self.time_embedding[2]
        isl = island(te0_.weight.dtype)
        s, ts = sinusoid(t, tt, self.config.freq_dim)
        h, th = silu(*linear(s.to(isl), cast(ts, isl), te0_.weight, te0_.bias, isl))
        e, te = linear(h, th, te2.weight, te2.bias, isl)
        p = self.time_projection[1]
        e0, te0 = linear(*silu(e, te), p.weight, p.bias, isl)
        return e, te, e0.unflatten(-1, (6, -1)), (None if te0 is None else te0.unflatten(-1, (6, -1)))

    def _text(self, context: Tensor) -> Tensor:
        """Zero-pad ``context`` to ``text_len`` rows, then ``text_embedding``: ``[B, text_len, C]``."""
        l0, l2 = self.text_embedding[0], self.text_embedding[2]
        pad = self.config.text_len - context.shape[1]
        ctx = torch.nn.functional.pad(context.to(l0.weight.dtype), (0, 0, 0, pad))
        h = gelu_tanh(linear(ctx, None, l0.weight, l0.bias)[0], None)[0]
        return linear(h, None, l2.weight, l2.bias)[0]

    # ---------------------------------------------------------------------------------------- checks
    def _check(self, x, t, context, clip_fea, y, tx, tt) -> None:
        cfg = self.config
        if x.dim() != 5:
            raise ValueError(f"x must be a latent video [B, C, T, H, W], got shape {tuple(x.shape)}")
        b, c = x.shape[:2]
        if cfg.model_type == "i2v":
            if y is None or clip_fea is None:
                raise ValueError("the i2v model needs y [B, in_dim - C, T, H, W] and clip_fea [B, 257, 1280]")
            if y.dim() != 5 or y.shape[0] != b or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"y has shape {tuple(y.shape)}, expected [{b}, *, {', '.join(map(str, x.shape[2:]))}]")
            if c + y.shape[1] != cfg.in_dim:
                raise ValueError(f"latent channel count: x has {c} and y has {y.shape[1]} channels, together "
                                 f"{c + y.shape[1]}; the model expects in_dim={cfg.in_dim}")
            if clip_fea.dim() != 3 or clip_fea.shape[0] != b or clip_fea.shape[2] != CLIP_DIM:
                raise ValueError(f"clip_fea has shape {tuple(clip_fea.shape)}, expected [{b}, N, {CLIP_DIM}]")
        else:
            if y is not None or clip_fea is not None:
                raise ValueError("a t2v model takes no y / clip_fea (use an i2v config)")
            if c != cfg.in_dim:
                raise ValueError(f"latent channel count: x has {c} channels, the model expects in_dim={cfg.in_dim}")
        bad = [f"{n}={s} (patch {p})" for n, s, p in zip("THW", x.shape[2:], cfg.patch_size) if s % p]
        if bad:
            raise ValueError(f"x frames/height/width must be divisible by patch_size {cfg.patch_size}: {', '.join(bad)}")
        if context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context has shape {tuple(context.shape)}, expected [{b}, L, text_dim={cfg.text_dim}]")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} rows, longer than text_len={cfg.text_len}")
        frames = x.shape[2] // cfg.patch_size[0]
        if not (t.shape == (b,) or (t.dim() == 2 and t.shape[0] == b and t.shape[1] in (1, frames))):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected [{b}] or [{b}, {frames}] (per frame)")
        if tx is not None and tx.shape != x.shape:
            raise ValueError(f"tangent tx has shape {tuple(tx.shape)}, expected x's {tuple(x.shape)}")
        if tt is not None and tt.numel() != t.numel():
            raise ValueError(f"tangent tt has shape {tuple(tt.shape)}, expected t's {tuple(t.shape)}")
