"""Attention of a block's queries over a (possibly quantized) KV cache plus the block's own k/v.

Layout legend: B batch, Lq queries, F cached frames, T tokens per frame, Le extra (current block) tokens,
H heads, D head dim. Tensors are ``[B, L, H, D]``.

``cache_attention`` computes ``softmax(s·Q[K_cache; K_extra]ᵀ)[V_cache; V_extra]`` where the cache part is
the visible frames of a :class:`rcm_kernels.kv_cache.CacheLayer` (int8/fp8 codes with per-frame-per-channel
key scales, or per-token scales of smoothed keys, and per-token value scales; int4 codes with group-wise
scales; or plain compute-dtype storage).

* CUDA (and no autograd needed): one Triton kernel, FlashAttention-2 style online softmax, that walks the
  visible frames tile by tile, dequantizes each tile in registers and never materializes a dequantized copy
  of the cache. The per-channel key scale of a frame is folded into the query (``q·diag(s_k)·k_codesᵀ``) and
  the per-token value scale into the probabilities (``(p·diag(s_v))·v_codes``), so the inner loop does two
  ``tl.dot`` on codes cast to the compute dtype (int8 and e4m3 codes are exact in fp16/bf16).
  With ``k_rope`` (pre-RoPE keys) a tile is dequantized and rotated in registers (interleaved pairs, the
  partner channel ``d ^ 1`` loaded alongside). int4 storage (two codes per byte): each channel's nibble is
  decoded from its byte in registers and the tile is multiplied by its group scales (they vary along tokens
  and channels, so they are not folded). Smoothed int8/fp8 keys: the factors ``c`` are folded into q once,
  the per-token key scale multiplies a column of the logits.
* Elsewhere, or when gradients must flow into ``q``/``extra_k``/``extra_v`` (self-forcing's exit step): torch
  reference path that gathers and dequantizes the visible frames, then calls SDPA.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ..kv_cache import CacheLayer
from ..quant import dequantize, dequantize_int4_keys, dequantize_int4_values, dequantize_keys
from .reference import softmax_scale

__all__ = ["cache_attention", "cache_attention_torch", "cache_attention_triton", "gather_cache",
           "apply_rope_interleaved"]

_LOG2E = 1.4426950408889634  # exp(x) = exp2(x·log2(e))


def apply_rope_interleaved(x_blhd: Tensor, cos_lp: Tensor, sin_lp: Tensor) -> Tensor:
    """Rotate interleaved channel pairs ``(x[2i], x[2i+1])`` by per-token angles (Wan's RoPE convention).

    ``cos_lp``/``sin_lp``: ``[L, D/2]``. Computed in float32 (float64 for float64 input), returned in x's dtype.
    """
    acc = torch.float64 if x_blhd.dtype == torch.float64 else torch.float32
    x = x_blhd.to(acc).unflatten(-1, (-1, 2))  # [B, L, H, D/2, 2]
    c, s = cos_lp.to(acc)[None, :, None], sin_lp.to(acc)[None, :, None]  # [1, L, 1, D/2]
    x0, x1 = x[..., 0], x[..., 1]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x_blhd.dtype)


def gather_cache(layer: CacheLayer, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Dequantized ``(k, v)`` ``[B, F·T, H, D]`` of the visible frames, chronological (a materialized copy).

    The plain-torch twin of the kernel's in-register decoding, for every storage format: int4 codes are
    unpacked and scaled per group, smoothed keys are multiplied back by their factors ``c``."""
    b, _, h, dk = layer.k.shape
    t, idx = layer.tokens_per_frame, layer.frame_slots.long()
    k5, v5 = layer.k.view(b, -1, t, h, dk)[:, idx], layer.v.view(b, -1, t, h, dk)[:, idx]  # [B, F, T, H, D(/2)]
    if layer.k_scale is None:
        k, v = k5.to(dtype), v5.to(dtype)
    elif layer.int4_group:
        k = dequantize_int4_keys(k5, layer.k_scale[:, idx], layer.int4_group, dtype)
        vs = layer.v_scale.view(b, -1, t, h, layer.v_scale.shape[-1])[:, idx]
        v = dequantize_int4_values(v5.flatten(1, 2), vs.flatten(1, 2), dtype).unflatten(1, (-1, t))
    else:
        if layer.k_smooth is not None:  # per-token scales of k/c, then c back
            ksc = layer.k_scale.view(b, -1, t, h, 1)[:, idx]
            k = (dequantize((k5, ksc)) * layer.k_smooth[:, None, None]).to(dtype)
        else:
            k = dequantize_keys(k5, layer.k_scale[:, idx], dtype)
        v = dequantize((v5, layer.v_scale.view(b, -1, t, h, 1)[:, idx]), dtype)
    return k.flatten(1, 2), v.flatten(1, 2)


def _check(q: Tensor, layer: CacheLayer, extra_k: Tensor | None, extra_v: Tensor | None,
           k_rope: tuple[Tensor, Tensor] | None) -> None:
    if q.dim() != 4:
        raise ValueError(f"cache_attention: q must be [B, Lq, H, D], got {tuple(q.shape)}")
    b, _, h, d = q.shape
    dk = d // 2 if layer.int4_group else d  # int4 packs two channels per byte
    if (layer.k.shape[0], layer.k.shape[2], layer.k.shape[3]) != (b, h, dk):
        raise ValueError(f"cache_attention: cache [B, L, H, D]={tuple(layer.k.shape)} does not match q {tuple(q.shape)}")
    if (extra_k is None) != (extra_v is None):
        raise ValueError("cache_attention: give both extra_k and extra_v, or neither")
    if extra_k is not None:
        for name, x in (("extra_k", extra_k), ("extra_v", extra_v)):
            if x.dim() != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (b, h, d) or x.shape[1] != extra_k.shape[1]:
                raise ValueError(f"cache_attention: {name} must be [B, Le, H, D] matching q {tuple(q.shape)}, "
                                 f"got {tuple(x.shape)}")
    if layer.num_frames == 0 and (extra_k is None or extra_k.shape[1] == 0):
        raise ValueError("cache_attention: the cache is empty and no extra k/v were given (nothing to attend to)")
    if layer.keys_pre_rope != (k_rope is not None):
        need = "stores pre-RoPE keys: pass k_rope=(cos, sin)" if layer.keys_pre_rope else "keys are post-RoPE"
        raise ValueError(f"cache_attention: the cache {need} (k_rope given: {k_rope is not None})")
    if k_rope is not None:
        want = (layer.num_tokens, d // 2)
        if d % 2 or tuple(k_rope[0].shape) != want or tuple(k_rope[1].shape) != want:
            raise ValueError(f"cache_attention: k_rope cos/sin must be [F·T, D/2]={want}, got "
                             f"{tuple(k_rope[0].shape)} / {tuple(k_rope[1].shape)}")


def cache_attention_torch(q: Tensor, layer: CacheLayer, *, extra_k: Tensor | None = None,
                          extra_v: Tensor | None = None, scale: float | None = None,
                          k_rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Reference path: dequantize the visible frames, concatenate the extra k/v, SDPA. Differentiable in
    ``q``, ``extra_k``, ``extra_v`` (the cache is constant)."""
    _check(q, layer, extra_k, extra_v, k_rope)
    k, v = gather_cache(layer, q.dtype)
    if k_rope is not None:
        k = apply_rope_interleaved(k, *k_rope)
    if extra_k is not None:
        k, v = torch.cat([k, extra_k.to(q.dtype)], 1), torch.cat([v, extra_v.to(q.dtype)], 1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


@triton.jit
def _online_softmax_step(m_i, l_i, acc, s, v, pv_scale):
    # s: [M, N] log2-scaled logits (-inf where invalid); v: [N, D] codes or values; pv_scale: [N] or None.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if pv_scale is not None:
        p = p * pv_scale[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _load_codes(ptr, d, mask, INT4: tl.constexpr):
    # Codes of channels d at ptr (ptr broadcasts against d). int4: byte d // 2 holds channel 2i in its low
    # nibble and 2i+1 in its high nibble (two's complement); decoded to float32 in registers.
    if INT4:
        byte = tl.load(ptr + d // 2, mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((d % 2) * 4)) & 15
        return tl.where(nib >= 8, nib - 16, nib).to(tl.float32)
    else:
        return tl.load(ptr + d, mask=mask, other=0.0)


@triton.jit
def _cache_attn_fwd(Q, K, V, KS, VS, KSM, SLOTS, EK, EV, COS, SIN, O,
                    stride_qb, stride_ql, stride_qh, stride_kb, stride_kl, stride_kh,
                    stride_ksb, stride_ks1, stride_ks2, stride_ksh, stride_vsb, stride_vsl, stride_vsh,
                    stride_smb, stride_smh,
                    stride_eb, stride_el, stride_eh, stride_ob, stride_ol, stride_oh, stride_rl,
                    H, LQ, NF, LE, TPF, KG, VG, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    KMODE: tl.constexpr, VMODE: tl.constexpr, ROPE: tl.constexpr):
    # Grid: (cdiv(LQ, BLOCK_M), B·H). K and V share strides (same storage layout); EK and EV too.
    # KMODE: 0 plain keys; 1 int8/fp8 codes, scale per (frame, channel); 2 int8/fp8 codes of smoothed keys
    # k/c, scale per token, c [B, H, D] at KSM; 3 int4 (packed), scale per (frame, token group of KG, channel).
    # VMODE: 0 plain values; 1 codes with a per-token scale; 3 int4 (packed), scale per (token, VG channels).
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                mask=(offs_m < LQ)[:, None] & d_ok[None, :], other=0.0)
    cdt = q.dtype  # compute dtype of the dots
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_base = b * stride_kb + h * stride_kh
    qc = q
    if KMODE == 2:  # smoothing: q·(c ⊙ k̃) = (q ⊙ c)·k̃, c tied in RoPE pairs so it commutes with the rotation
        sm = tl.load(KSM + b * stride_smb + h * stride_smh + offs_d, mask=d_ok, other=0.0)
        qc = (q.to(tl.float32) * sm[None, :]).to(cdt)
    if ROPE:
        partner = offs_d ^ 1  # interleaved pairs: channel 2i pairs with 2i+1
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)  # rot(x)[2i] = x[2i]c - x[2i+1]s; rot(x)[2i+1] = x[2i+1]c + x[2i]s

    for f in range(0, NF):
        slot = tl.load(SLOTS + f)
        qf = qc
        if KMODE == 1:
            ks_ptr = KS + b * stride_ksb + slot * stride_ks1 + h * stride_ksh
            ks = tl.load(ks_ptr + offs_d, mask=d_ok, other=0.0)
            if ROPE:
                ks_p = tl.load(ks_ptr + partner, mask=d_ok, other=0.0)
            else:
                qf = (q.to(tl.float32) * ks[None, :]).to(cdt)  # fold the per-channel key scale into q
        for t0 in range(0, TPF, BLOCK_N):
            tt = t0 + offs_n
            t_ok = tt < TPF
            tok = slot * TPF + tt
            kt_ptr = K + kv_base + tok[None, :] * stride_kl  # [D, N] transposed key tile
            kt_mask = d_ok[:, None] & t_ok[None, :]
            kt = _load_codes(kt_ptr, offs_d[:, None], kt_mask, KMODE == 3)
            if ROPE:
                kp = _load_codes(kt_ptr, partner[:, None], kt_mask, KMODE == 3).to(tl.float32)
                kt = kt.to(tl.float32)
            if KMODE == 3:  # int4: dequantize the tile in registers (scales vary along tokens and channels)
                g_ptr = KS + b * stride_ksb + slot * stride_ks1 + (tt // KG)[None, :] * stride_ks2 + h * stride_ksh
                kt = kt * tl.load(g_ptr + offs_d[:, None], mask=kt_mask, other=0.0)
                if ROPE:
                    kp = kp * tl.load(g_ptr + partner[:, None], mask=kt_mask, other=0.0)
            if ROPE:
                if KMODE == 1:
                    kt, kp = kt * ks[:, None], kp * ks_p[:, None]
                r_ptr = (f * TPF + tt)[None, :] * stride_rl + (offs_d // 2)[:, None]
                cos = tl.load(COS + r_ptr, mask=kt_mask, other=0.0)
                sin = tl.load(SIN + r_ptr, mask=kt_mask, other=0.0)
                kt = kt * cos + kp * sin * sign[:, None]
            s = tl.dot(qf, kt.to(cdt)) * qk_scale
            if KMODE == 2:  # per-token key scale: a column scale of the logits
                s = s * tl.load(KS + b * stride_ksb + tok * stride_ks1 + h * stride_ksh, mask=t_ok, other=0.0)[None, :]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            v_mask = t_ok[:, None] & d_ok[None, :]
            v = _load_codes(V + kv_base + tok[:, None] * stride_kl, offs_d[None, :], v_mask, VMODE == 3)
            vs = None
            if VMODE == 1:
                vs = tl.load(VS + b * stride_vsb + h * stride_vsh + tok * stride_vsl, mask=t_ok, other=0.0)
            if VMODE == 3:
                v = v * tl.load(VS + b * stride_vsb + h * stride_vsh + tok[:, None] * stride_vsl
                                + (offs_d // VG)[None, :], mask=v_mask, other=0.0)
            m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v.to(cdt), vs)

    e_base = b * stride_eb + h * stride_eh
    for e0 in range(0, LE, BLOCK_N):
        te = e0 + offs_n
        e_ok = te < LE
        kt = tl.load(EK + e_base + te[None, :] * stride_el + offs_d[:, None],
                     mask=d_ok[:, None] & e_ok[None, :], other=0.0)
        s = tl.dot(q, kt.to(cdt)) * qk_scale
        s = tl.where(e_ok[None, :], s, float("-inf"))
        v = tl.load(EV + e_base + te[:, None] * stride_el + offs_d[None, :],
                    mask=e_ok[:, None] & d_ok[None, :], other=0.0).to(cdt)
        m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, v, None)

    out = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=(offs_m < LQ)[:, None] & d_ok[None, :])


def _modes(layer: CacheLayer) -> tuple[int, int]:
    """(KMODE, VMODE) of the kernel for a cache layer's storage format (see ``_cache_attn_fwd``)."""
    if layer.int4_group:
        return 3, 3
    if layer.k_scale is None:
        return 0, 0
    return (2 if layer.k_smooth is not None else 1), 1


def _strides4(ks: Tensor, kmode: int) -> tuple[int, int, int, int]:
    """(batch, slot-or-token, group, head) strides of the key scales for the kernel's KMODE."""
    if kmode == 3:  # [B, S, NG, H, D]
        return ks.stride(0), ks.stride(1), ks.stride(2), ks.stride(3)
    if kmode in (1, 2):  # [B, S, H, D] or [B, S*T, H]
        return ks.stride(0), ks.stride(1), 0, ks.stride(2)
    return 0, 0, 0, 0


def _default_blocks(q: Tensor, rope: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Tiny tiles in the CPU interpreter. On CUDA, measured on an
    H100 (Triton 3.6) at Wan 1.3B geometry (``benchmarks/RESULTS.md``): 128x64 with 4 warps for plain keys;
    with RoPE 8 warps (4 warps: +27-30%), and 2 stages, the most that fits in shared memory at D=128."""
    if not q.is_cuda:
        return 16, 16, 1, 1
    if q.dtype == torch.float32:
        return 64, 64, 4, 1
    if q.shape[-1] < 64:
        return 64, 64, 4, 2
    return (128, 64, 8, 2) if rope else (128, 64, 4, 2)


def _triton_supports(q: Tensor, layer: CacheLayer) -> bool:
    """Triton decodes e4m3 codes only on sm89+ (Ada/Hopper); head dims above 256 are not tiled."""
    if not q.is_cuda or q.shape[-1] > 256:
        return False
    return layer.k.dtype != torch.float8_e4m3fn or torch.cuda.get_device_capability(q.device) >= (8, 9)


def cache_attention_triton(q: Tensor, layer: CacheLayer, *, extra_k: Tensor | None = None,
                           extra_v: Tensor | None = None, scale: float | None = None,
                           k_rope: tuple[Tensor, Tensor] | None = None,
                           blocks: tuple[int, int, int, int] | None = None) -> Tensor:
    """Triton path (forward only). Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    _check(q, layer, extra_k, extra_v, k_rope)
    b, lq, h, d = q.shape
    if layer.k.stride(-1) != 1 or layer.k.stride() != layer.v.stride():
        raise ValueError("cache_attention: cache k and v must share a layout with unit channel stride")
    # No copies of the inputs: the kernel takes any strides with a unit channel stride (e.g. q/k/v views of
    # a fused qkv projection) and casts extra k/v tiles to q's dtype in registers.
    q = q if q.stride(-1) == 1 else q.contiguous()
    if extra_k is None:
        extra_k = extra_v = q.new_empty(b, 0, h, d)
    ek, ev = extra_k, extra_v
    if ek.stride(-1) != 1 or ek.stride() != ev.stride():  # the kernel shares one set of strides for both
        ek, ev = ek.contiguous(), ev.contiguous()
    o = q.new_empty(b, lq, h, d)
    kmode, vmode = _modes(layer)
    ph = layer.k  # placeholder pointer for absent tensors (never read: the mode flags are off)
    ks = layer.k_scale if kmode else ph
    vs = layer.v_scale if vmode else ph
    sm = layer.k_smooth if kmode == 2 else ph
    ks_st = _strides4(ks, kmode)
    cos, sin = (k_rope[0].float().contiguous(), k_rope[1].float().contiguous()) if k_rope else (ph, ph)
    block_m, block_n, warps, stages = blocks or _default_blocks(q, k_rope is not None)
    scale = softmax_scale(d, scale)
    grid = (triton.cdiv(lq, block_m), b * h)
    g = layer.int4_group
    _cache_attn_fwd[grid](
        q, layer.k, layer.v, ks, vs, sm, layer.frame_slots, ek, ev, cos, sin, o,
        q.stride(0), q.stride(1), q.stride(2), layer.k.stride(0), layer.k.stride(1), layer.k.stride(2),
        *ks_st, vs.stride(0), vs.stride(1), vs.stride(2), sm.stride(0), sm.stride(1),
        ek.stride(0), ek.stride(1), ek.stride(2), o.stride(0), o.stride(1), o.stride(2), cos.stride(0),
        h, lq, layer.num_frames, ek.shape[1], layer.tokens_per_frame, max(g, 1), max(min(g, d), 1), scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n,
        KMODE=kmode, VMODE=vmode, ROPE=k_rope is not None, num_warps=warps, num_stages=stages)
    return o


def cache_attention(q: Tensor, layer: CacheLayer, *, extra_k: Tensor | None = None,
                    extra_v: Tensor | None = None, scale: float | None = None,
                    k_rope: tuple[Tensor, Tensor] | None = None,
                    impl: Literal["auto", "triton", "torch"] = "auto") -> Tensor:
    """Queries ``q [B, Lq, H, D]`` attend to the cache's visible frames plus ``extra_k/extra_v [B, Le, H, D]``.

    ``extra_k/extra_v`` are the current block's own (unquantized, already rotated) k/v; ``None`` means none.
    ``k_rope=(cos, sin)``, each ``[F·T, D/2]`` in the cache's chronological token order, rotates the cached keys
    when the cache stores them pre-RoPE (``CacheLayer.keys_pre_rope``). ``scale`` defaults to ``1/sqrt(D)``.
    Returns ``[B, Lq, H, D]`` in q's dtype. ``impl="auto"`` takes the Triton kernel on CUDA for quantized
    (int8/fp8) storage, where not materializing a dequantized copy is the point of quantizing, unless autograd
    needs gradients of q/extra_k/extra_v. Native (bf16/fp16/fp32) storage, autograd, CPU tensors and fp8
    before sm89 take the torch path (cuDNN/flash SDPA over the visible frames): on an H100 it measured
    1.5x faster than the kernel for bf16 storage (benchmarks/RESULTS.md, cache_attention section), and a
    bf16 cache gains no memory from the kernel beyond one gathered copy of the window.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"cache_attention: impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, extra_k, extra_v))
    quantized = layer.k_scale is not None
    if impl == "triton" or (impl == "auto" and quantized and not needs_grad and _triton_supports(q, layer)):
        return cache_attention_triton(q, layer, extra_k=extra_k, extra_v=extra_v, scale=scale, k_rope=k_rope)
    return cache_attention_torch(q, layer, extra_k=extra_k, extra_v=extra_v, scale=scale, k_rope=k_rope)
