"""Wan2.1 DiT (``WanModel``): text-to-video and image-to-video; plain, JVP and causal modes.

State-dict keys and shapes are the official ones (``patch_embedding.weight [C, in_dim, 1, 2, 2]`` included:
the Conv3d weight is used as the Linear it is, through a flattened view), so official checkpoints load with
``strict=True``; there are no buffers. Numbers follow docs/nets.md and the fp32 islands of docs/nets.md, precision

Legend: x_bcthw latent video, B batch, T latent frames, L tokens = T·H·W / prod(patch), C = dim.

Seams for parallelism applied from outside: ``blocks`` (a ModuleList: FSDP / activation checkpointing per
block), every attention goes through a ``rcm_kernels.attention.Attention`` module (``self_attn.attn`` with
``context_parallel=True``, ``cross_attn.attn`` with ``False``), and the token sequence is wrapped by
``seq_shard`` (a ``SequenceShard``: ``shard`` right after patch embedding on the tokens, their tangents, the
RoPE angles and the per-token time index; ``gather`` of the head output and its tangent before unpatchify).

Causal (block-autoregressive) mode (docs/causal.md):

* masked full-sequence pass (training): :meth:`WanDiT.forward` / :meth:`WanDiT.forward_jvp` with per-frame
  times ``t [B, T]``, a ``block_mask`` from ``rcm_kernels.blockmask`` and optional explicit RoPE frame
  positions ``frame_pos`` (teacher forcing: the packed ``[clean ; noisy]`` sequence with
  ``rcm_kernels.blockmask.teacher_forcing`` and ``teacher_forcing_positions``; the packing itself is
  ``rcm_losses.causal.TeacherForcingVelocity``);
* block-by-block pass (inference, self forcing): :meth:`WanDiT.forward_block` runs one block of frames
  against a ``rcm_kernels.kv_cache.KVCache`` (RoPE positions from the cache's pending block), optionally
  writing the block's k/v; text k/v come from :meth:`WanDiT.encode_prompt` (computed once per prompt).
  The cached pass goes through ``block.__call__`` like the plain one (see ``_causal_seam``).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from rcm_kernels.attention import SequenceShard
from rcm_kernels.kv_cache import CacheBlock, KVCache

from ._blocks import CLIP_DIM, Head, MLPProj, RMSNorm, WanBlock
from ._causal_seam import CacheCall, PromptKV, install_causal_hooks
from ._ops import Pair, cast, gelu_tanh, island, linear, silu, sinusoid
from ._rope import rope_angles, rope_cos_sin
from .configs import WanConfig, get_config

__all__ = ["WanDiT", "PromptKV"]


def _per_frame(t: Tensor | float, batch: int, frames: int, device) -> Tensor:
    """A time given as a number, ``[B]``, ``[B, 1]`` or ``[B, T]`` as ``[B, T]``."""
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        return t.expand(batch, frames)
    if t.dim() == 1 and t.shape[0] == batch:
        return t[:, None].expand(batch, frames)
    if t.dim() == 2 and t.shape[0] == batch and t.shape[1] in (1, frames):
        return t.expand(batch, frames)
    raise ValueError(f"time of shape {tuple(t.shape)} does not fit batch {batch} and {frames} frames")


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
        install_causal_hooks(self.blocks)  # cache-aware self-attention seams, prompt k/v pre-hooks

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

    @property
    def local_heads(self) -> int:
        """Self-attention heads this process computes: ``num_heads``, or ``num_heads / c`` when the sequence
        seam is a context-parallel one over ``c`` ranks (its ``size``; Ulysses splits heads after the
        all-to-all). A KV cache of the block-by-block pass holds these heads."""
        return self.config.num_heads // getattr(self.seq_shard, "size", 1)

    # --------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, t: Tensor, context: Tensor | PromptKV, *, clip_fea: Tensor | None = None,
                y: Tensor | None = None, block_mask=None, frame_offset: int = 0, frame_pos: Tensor | None = None,
                tangents: tuple[Tensor | None, Tensor | None] | None = None):
        """Rectified-flow velocity of the latent video (float32; float64 for float64 parameters).

        Args:
            x: ``[B, C, T, H, W]`` noisy latents (C = out_dim; ``in_dim`` for t2v).
            t: ``[B]`` (or ``[B, 1]``) per-sample, or ``[B, T/pt]`` per-frame timesteps on Wan's 0..1000
                scale, int or float (the sinusoid is computed in float64 from it).
            context: ``[B, Lc, text_dim]`` text embeddings, ``Lc <= text_len``; zero-padded to ``text_len``
                rows before ``text_embedding``, all rows attended (as the official model). Or a
                :class:`PromptKV` from :meth:`encode_prompt` (text and CLIP k/v precomputed; then
                ``clip_fea`` is not needed).
            clip_fea: i2v only, ``[B, 257, 1280]`` CLIP ViT-H/14 penultimate tokens.
            y: i2v only, ``[B, in_dim − C, T, H, W]`` conditioning channels (4 mask + 16 latent),
                concatenated after ``x``; its tangent is zero.
            block_mask: passed to every self-attention (``None`` = bidirectional), e.g.
                ``rcm_kernels.blockmask.block_causal(num_blocks, frames_per_block, tokens_per_frame)``
                over the ``L = T/pt · H/ph · W/pw`` tokens (``tokens_per_frame = H/ph · W/pw``).
            frame_offset: temporal RoPE position of the first latent frame (causal blocks).
            frame_pos: explicit temporal RoPE positions ``[T/pt]`` (overrides ``frame_offset``), e.g.
                :func:`teacher_forcing_positions` for a packed teacher-forcing sequence.
            tangents: ``(tx, tt)`` to run in JVP mode (use :meth:`forward_jvp`).

        Returns: ``out [B, out_dim, T, H, W]``, or ``(out, tangent_out)`` when ``tangents`` is given.
        """
        tx, tt = tangents if tangents is not None else (None, None)
        self._check(x, t, context, clip_fea, y, tx, tt)
        frames = x.shape[2] // self.config.patch_size[0]
        if frame_pos is None:
            frame_pos = frame_offset + torch.arange(frames, device=x.device)
        elif tuple(frame_pos.shape) != (frames,):
            raise ValueError(f"frame_pos has shape {tuple(frame_pos.shape)}, expected [{frames}] (one RoPE "
                             "position per latent frame)")
        out, tout = self._run(x, tx, t, tt, context, clip_fea, y, block_mask, frame_pos.to(x.device))
        if tangents is None:
            return out
        return out, (torch.zeros_like(out) if tout is None else tout.detach())

    def forward_jvp(self, x: Tensor, t: Tensor, context: Tensor | PromptKV, tx: Tensor | None, tt: Tensor | None,
                    *, clip_fea: Tensor | None = None, y: Tensor | None = None, block_mask=None,
                    frame_offset: int = 0, frame_pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Output and its directional derivative along ``(tx, tt)`` (tangents of ``x`` and ``t``).

        Forward-mode by hand through every op, tangents detached (no graph for them; the primal keeps
        the caller's grad mode and is bit-identical to :meth:`forward`). ``None`` tangents are zero and
        cost nothing; the context (and ``y``, ``clip_fea``) have zero tangent. ``tt`` has ``t``'s shape.
        Works with a ``block_mask`` (causal sCM: the fused JVP attention takes the mask).
        Goes through ``__call__`` so module hooks (FSDP, checkpointing wrappers) fire as for ``forward``.
        """
        return self(x, t, context, clip_fea=clip_fea, y=y, block_mask=block_mask, frame_offset=frame_offset,
                    frame_pos=frame_pos, tangents=(tx, tt))

    @torch.no_grad()
    def encode_prompt(self, context: Tensor, *, clip_fea: Tensor | None = None) -> PromptKV:
        """Cross-attention k/v of every layer for one prompt, to reuse across blocks and steps.

        ``context [B, Lc, text_dim]``; i2v also ``clip_fea [B, 257, 1280]``. Computed without gradient (the
        text path of a streaming student is frozen input). Calls the cross-attention modules directly, so
        under FSDP pass the raw context to :meth:`forward_block` instead.
        """
        cfg = self.config
        if context.dim() != 3 or context.shape[2] != cfg.text_dim or context.shape[1] > cfg.text_len:
            raise ValueError(f"context has shape {tuple(context.shape)}, expected [B, L <= {cfg.text_len}, "
                             f"{cfg.text_dim}]")
        if (cfg.model_type == "i2v") != (clip_fea is not None):
            raise ValueError("encode_prompt: clip_fea is required for an i2v model and refused for t2v")
        ctx = self._text(context)
        img = self.img_emb(clip_fea) if clip_fea is not None else None
        return PromptKV(tuple(blk.cross_attn.context_kv(ctx, img) for blk in self.blocks))

    def forward_block(self, x: Tensor, t: Tensor, context: Tensor | PromptKV, *, cache: KVCache,
                      block: CacheBlock, write: bool = False, y: Tensor | None = None,
                      clip_fea: Tensor | None = None) -> Tensor:
        """One block of frames attending to the KV cache (block-by-block causal inference, self forcing).

        The block's queries see the cache's visible (committed) frames plus the block's own tokens, which is
        the block-causal (or sliding-window + sink) mask restricted to this block's rows. RoPE temporal
        positions are ``block.positions`` (absolute frame index, or re-indexed within the window, as the
        cache's ``position_policy`` says); cached keys keep theirs.

        Args:
            x: ``[B, C, n·pt, H, W]`` the block's latents, ``n = block.num_frames``.
            t: ``[B]`` or ``[B, n]`` Wan-scale times.
            context: a :class:`PromptKV` (:meth:`encode_prompt`, once per prompt) or raw text embeddings.
            cache: the ``KVCache`` (``num_layers`` layers, the net's heads/head dim, ``tokens_per_frame =
                H/ph·W/pw``).
            block: the pending block, ``cache.begin_block(n)``; commit it after the write pass.
            write: store this pass's k/v of every layer for ``block`` (detached; quantized on write). The
                denoising steps read only; the context refresh (re-run at t=0 on the denoised block)
                writes, then the caller calls ``cache.commit(block)``.
            y, clip_fea: i2v conditioning of the block (``clip_fea`` only with raw context).

        Returns the velocity ``[B, C, n·pt, H, W]``. Differentiable in the parameters and ``x`` (the cache is
        a constant: the self-forcing exit step); no JVP mode. Under Ulysses context parallel the block's tokens
        are split like a full sequence and the cache holds this rank's :attr:`local_heads`.
        """
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        if cache.layer(0).k.shape[2] != self.local_heads:
            raise ValueError(f"cache holds {cache.layer(0).k.shape[2]} heads; this net computes {self.local_heads} "
                             "per process (num_heads / context-parallel size): build it with make_kv_cache")
        if cache.num_layers != cfg.num_layers or cache.tokens_per_frame != (x.shape[3] // ph) * (x.shape[4] // pw):
            raise ValueError(f"cache geometry (layers={cache.num_layers}, tokens_per_frame="
                             f"{cache.tokens_per_frame}) does not fit the net ({cfg.num_layers} layers) and x "
                             f"{tuple(x.shape)} (tokens per frame {(x.shape[3] // ph) * (x.shape[4] // pw)})")
        if x.dim() != 5 or x.shape[2] != block.num_frames * pt:
            raise ValueError(f"x has shape {tuple(x.shape)}; block {block.index} has {block.num_frames} frames "
                             f"(x needs {block.num_frames * pt} along T)")
        if block.first_frame != cache.frames_written or block is cache.last_block:
            raise ValueError(f"block {block.index} is not the cache's pending block (begin_block it first)")
        dev = x.device
        pos = cache.block_positions(block).to(dev)  # no host sync (a captured graph reads it in place)
        call = CacheCall(cache, block, write, tuple(cache.layer(i) for i in range(cfg.num_layers)))
        if cache.keys_pre_rope:  # rotate q/k inside the seam; the blocks run with an identity rotation
            hw = (x.shape[3] // ph, x.shape[4] // pw)
            q_ang = rope_angles(pos, *hw, cfg.head_dim)
            k_ang = rope_angles(cache.frame_positions().to(dev), *hw, cfg.head_dim)
            call.q_rope, call.k_rope = (torch.cos(q_ang), torch.sin(q_ang)), (torch.cos(k_ang), torch.sin(k_ang))
        self._check(x, t, context, clip_fea, y, None, None)
        out, _ = self._run(x, None, t, None, context, clip_fea, y, call, pos, identity_rope=cache.keys_pre_rope)
        return out

    def _run(self, x, tx, t, tt, context, clip_fea, y, block_mask, frame_pos, identity_rope=False) -> Pair:
        cfg = self.config
        pt, ph, pw = cfg.patch_size
        grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
        tok, ttok = self._embed_patches(x, tx, y)
        e, te, e0, te0 = self._time(t, tt)
        mod_index = None
        if e.shape[1] > 1:  # per-frame times: each token takes its frame's modulation
            idx = torch.arange(grid[0], device=x.device).repeat_interleave(grid[1] * grid[2])
            mod_index = self.seq_shard.shard(idx[None], dim=1)[0]
        if isinstance(context, PromptKV):
            ctx, img = context, None  # the blocks' cross-attention pre-hooks take the k/v from it
        else:
            ctx = self._text(context)
            img = self.img_emb(clip_fea) if cfg.model_type == "i2v" else None
        ang = rope_angles(frame_pos, grid[1], grid[2], cfg.head_dim)
        if identity_rope:
            ang = torch.zeros_like(ang)
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
        prompt = isinstance(context, PromptKV)
        if cfg.model_type == "i2v":
            if y is None or (clip_fea is None and not prompt):
                raise ValueError("the i2v model needs y [B, in_dim - C, T, H, W] and clip_fea [B, 257, 1280]")
            if prompt and clip_fea is not None:
                raise ValueError("clip_fea is already inside the PromptKV (encode_prompt); do not pass it again")
            if y.dim() != 5 or y.shape[0] != b or y.shape[2:] != x.shape[2:]:
                raise ValueError(f"y has shape {tuple(y.shape)}, expected [{b}, *, {', '.join(map(str, x.shape[2:]))}]")
            if c + y.shape[1] != cfg.in_dim:
                raise ValueError(f"latent channel count: x has {c} and y has {y.shape[1]} channels, together "
                                 f"{c + y.shape[1]}; the model expects in_dim={cfg.in_dim}")
            if not prompt and (clip_fea.dim() != 3 or clip_fea.shape[0] != b or clip_fea.shape[2] != CLIP_DIM):
                raise ValueError(f"clip_fea has shape {tuple(clip_fea.shape)}, expected [{b}, N, {CLIP_DIM}]")
        else:
            if y is not None or clip_fea is not None:
                raise ValueError("a t2v model takes no y / clip_fea (use an i2v config)")
            if c != cfg.in_dim:
                raise ValueError(f"latent channel count: x has {c} channels, the model expects in_dim={cfg.in_dim}")
        bad = [f"{n}={s} (patch {p})" for n, s, p in zip("THW", x.shape[2:], cfg.patch_size) if s % p]
        if bad:
            raise ValueError(f"x frames/height/width must be divisible by patch_size {cfg.patch_size}: {', '.join(bad)}")
        if prompt:
            want = 4 if cfg.model_type == "i2v" else 2
            if len(context.layers) != cfg.num_layers or any(len(kv) != want for kv in context.layers):
                raise ValueError(f"PromptKV has {len(context.layers)} layers, expected {cfg.num_layers} layers "
                                 f"of {want} tensors (encode_prompt of this net)")
            if context.batch != b:
                raise ValueError(f"PromptKV has batch {context.batch}, x has batch {b}")
        elif context.dim() != 3 or context.shape[0] != b or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context has shape {tuple(context.shape)}, expected [{b}, L, text_dim={cfg.text_dim}]")
        if not prompt and context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} rows, longer than text_len={cfg.text_len}")
        frames = x.shape[2] // cfg.patch_size[0]
        if not (t.shape == (b,) or (t.dim() == 2 and t.shape[0] == b and t.shape[1] in (1, frames))):
            raise ValueError(f"t has shape {tuple(t.shape)}, expected [{b}] or [{b}, {frames}] (per frame)")
        if tx is not None and tx.shape != x.shape:
            raise ValueError(f"tangent tx has shape {tuple(tx.shape)}, expected x's {tuple(x.shape)}")
        if tt is not None and tt.numel() != t.numel():
            raise ValueError(f"tangent tt has shape {tuple(tt.shape)}, expected t's {tuple(t.shape)}")
