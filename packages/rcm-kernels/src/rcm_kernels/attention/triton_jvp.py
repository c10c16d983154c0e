"""Triton kernels: fused attention + JVP forward (O, Ȯ, LSE in one online-softmax pass) and the primal backward.

Layout legend: B batch, L sequence (Lq, Lk), H heads, D head dim. Inputs are ``[B, L, H, D]`` with any strides
(no copies on the way in); outputs are ``[B, L, H, D]`` contiguous, the LSE ``[B, H, Lq]`` float32.

Forward (FlashAttention-2 with a tangent, docs/kernels.md), per program = BLOCK_M query rows of one (b, h):
for each key tile, in base 2, ``P̃ = 2^(s·log2e·q kᵀ − m)``; with tangents ``Ṡ = s (q̇ kᵀ + q k̇ᵀ)``,
``H̃ = P̃ ⊙ Ṡ``; accumulators ``Õ += P̃ V``, ``T̃ += P̃ V̇ + H̃ V``, ``r̃ += rowsum H̃``, ``l += rowsum P̃``, all
rescaled by ``2^(m_old − m_new)``. Epilogue ``O = Õ/l``, ``Ȯ = T̃/l − (r̃/l) O``, ``LSE = (m + log2 l) ln 2``.
A None tangent removes its matmul at compile time; no tangent at all is plain FlashAttention-2. On Hopper the
key-side tiles are read through TMA descriptors (where strides allow), which frees the address registers, and
calls with all three tangents (block masks included) go to the warp-specialized kernel of :mod:`.hopper_jvp` where it applies
(``RCM_JVP_FWD_KERNEL``: auto | triton | hopper; this kernel stays the portable path and its check).

Masks come as a :class:`rcm_kernels.blockmask.TileTable`: programs visit only the listed key tiles, run
"full" tiles without any mask arithmetic and mask "partial" tiles from per-row key intervals. Without a mask
every tile but the ragged last one runs unmasked. Sequence lengths are runtime values (not specialized), so a
new length never recompiles; block sizes come from a fixed per-(head dim, dtype, tangent) table, not autotuning.

Backward (dq, dk, dv; the tangent output is not differentiated): FlashAttention-2 math from the saved LSE,
``δ = rowsum(dO ⊙ O)``, ``dS = P ⊙ (dO Vᵀ − δ)``, as two kernels (dK/dV over query tiles, dQ over key tiles),
both driven by the same tile table. :func:`attention_bwd` uses these for masked calls and feeds unmasked
fp16/bf16 calls to SDPA's cuDNN backward (same gradient from the same O and LSE; see its docstring).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import softmax_scale

__all__ = ["FwdResult", "attention_bwd", "jvp_attention_fwd", "unsupported_reason"]

_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x·log2 e): the kernels work in base 2
_LN2 = tl.constexpr(0.6931471805599453)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# Kernel switches (environment, for the tuning sweep; defaults are the measured best on H100):
# RCM_JVP_TMA: key-side tiles through TMA descriptors; RCM_JVP_LAZY_RESCALE: rescale only when the max grows
# by > 2^8; RCM_JVP_WARP_SPEC: Triton's automatic warp specialization of the unmasked loop.
_FLAG_DEFAULTS = {"RCM_JVP_TMA": "1", "RCM_JVP_LAZY_RESCALE": "0", "RCM_JVP_WARP_SPEC": "0"}


def _flag(name: str) -> bool:
    return os.environ.get(name, _FLAG_DEFAULTS[name]) == "1"


def _scratch(size: int, align: int, stream) -> Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _use_tma(q: Tensor, *key_side: Tensor | None) -> bool:
    """TMA needs a Hopper+ GPU, a unit last stride and 16-byte aligned rows/bases (else: pointer loads)."""
    if _INTERPRET or not _flag("RCM_JVP_TMA") or torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    for x in key_side:
        if x is not None and (x.stride(-1) != 1 or x.data_ptr() % 16
                              or any(st * x.element_size() % 16 for st in x.stride()[:-1])):
            return False
    # Device-side descriptors need scratch memory from the caller. Triton keeps the allocator in a
    # ContextVar, so it is set on every launch: autograd's backward thread (activation-checkpoint
    # recomputation runs there) does not inherit a value set once on the main thread.
    triton.set_allocator(_scratch)
    return True


class FwdResult(NamedTuple):
    out: Tensor  # [B, Lq, H, D], q's dtype
    tangent: Tensor | None  # [B, Lq, H, D] or None without tangents
    lse: Tensor  # [B, H, Lq] float32, natural log


# ----------------------------------------------------------------------------------------------- forward


@triton.jit
def _row_mask(cols, iv0, iv1, iv2, iv3):
    c = cols[None, :]
    return ((c >= iv0[:, None]) & (c < iv1[:, None])) | ((c >= iv2[:, None]) & (c < iv3[:, None]))


@triton.jit
def _load_row_iv(ROW_IV, rows, LQ):
    """The ``[s0, e0) ∪ [s1, e1)`` key intervals of query ``rows`` (0 for rows past LQ)."""
    iv = ROW_IV + rows * 4
    valid = rows < LQ
    return (tl.load(iv, mask=valid, other=0), tl.load(iv + 1, mask=valid, other=0),
            tl.load(iv + 2, mask=valid, other=0), tl.load(iv + 3, mask=valid, other=0))


@triton.jit
def _load_tile(src, start_n, stride_n, cols, LK, MODE: tl.constexpr, USE_TMA: tl.constexpr):
    """A [BLOCK_N, D] key-side tile: TMA descriptor (rows past LK come back zero) or a pointer block."""
    if USE_TMA:
        return src.load([start_n, 0])
    elif MODE == 0:
        return tl.load(src + start_n * stride_n)
    else:
        return tl.load(src + start_n * stride_n, mask=cols[:, None] < LK, other=0.0)


@triton.jit
def _finite_max(m, MODE: tl.constexpr):
    """The running max to subtract: in MODE 2 a row may have seen no allowed key yet (max -inf), so use 0
    there and keep exp2 away from (-inf) - (-inf)."""
    m_sub = m
    if MODE == 2:
        m_sub = tl.where(m == float("-inf"), 0.0, m)
    return m_sub


@triton.jit
def _rescale(acc_o, acc_t, l_i, r_i, m_i, m_new, MODE: tl.constexpr, HAS_T: tl.constexpr):
    """Accumulators moved from the running max ``m_i`` to ``m_new``: all scaled by ``2^(m_i − m_new)``."""
    alpha = tl.math.exp2(m_i - _finite_max(m_new, MODE))
    l_i = l_i * alpha
    r_i = r_i * alpha
    acc_o = acc_o * alpha[:, None]
    if HAS_T:
        acc_t = acc_t * alpha[:, None]
    return acc_o, acc_t, l_i, r_i


@triton.jit
def _fwd_tile(acc_o, acc_t, l_i, m_i, r_i, q, tq, k_ptrs, v_ptrs, tk_ptrs, tv_ptrs, start_n, offs_n,
              iv0, iv1, iv2, iv3, LK, qk_scale, scale,
              stride_kn, stride_vn, stride_tkn, stride_tvn,
              MODE: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
              LAZY: tl.constexpr, USE_TMA: tl.constexpr):
    """One key tile. MODE 0: no masking; 1: key bound only (ragged tail); 2: row intervals (partial tile).

    LAZY: rescale the accumulators only when some row's max grew by more than 2^8 (FlashAttention-4's
    trick); otherwise keep the stale max, so P̃ <= 2^8 — exact math, fewer multiplies per tile.
    """
    HAS_T: tl.constexpr = HAS_TQ or HAS_TK or HAS_TV
    cols = start_n + offs_n
    k = _load_tile(k_ptrs, start_n, stride_kn, cols, LK, MODE, USE_TMA)
    v = _load_tile(v_ptrs, start_n, stride_vn, cols, LK, MODE, USE_TMA)
    kt = tl.trans(k)
    qk = tl.dot(q, kt)
    sdot = qk
    if HAS_TQ or HAS_TK:  # issued next to q kᵀ: independent of the softmax below
        sdot = tl.zeros_like(qk)
        if HAS_TQ:
            sdot = tl.dot(tq, kt, sdot)
        if HAS_TK:
            tk = _load_tile(tk_ptrs, start_n, stride_tkn, cols, LK, MODE, USE_TMA)
            sdot = tl.dot(q, tl.trans(tk), sdot)
    qk = qk * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
    if MODE == 1:
        qk = tl.where(cols[None, :] < LK, qk, float("-inf"))
    if MODE == 2:
        qk = tl.where(_row_mask(cols, iv0, iv1, iv2, iv3), qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if LAZY:
        grow = tl.where(m_new == m_i, 0.0, m_new - m_i)  # rows still at -inf: 0; first finite max: +inf
        if tl.max(grow, 0) > 8.0:
            acc_o, acc_t, l_i, r_i = _rescale(acc_o, acc_t, l_i, r_i, m_i, m_new, MODE, HAS_T)
            m_i = m_new
    else:
        acc_o, acc_t, l_i, r_i = _rescale(acc_o, acc_t, l_i, r_i, m_i, m_new, MODE, HAS_T)
        m_i = m_new
    p = tl.math.exp2(qk - _finite_max(m_i, MODE)[:, None])
    l_i = l_i + tl.sum(p, 1)
    acc_o = tl.dot(p.to(v.dtype), v, acc_o)
    if HAS_TQ or HAS_TK:
        h = p * (sdot * scale)  # masked entries have p = 0
        r_i = r_i + tl.sum(h, 1)
        acc_t = tl.dot(h.to(v.dtype), v, acc_t)
    if HAS_TV:
        tv = _load_tile(tv_ptrs, start_n, stride_tvn, cols, LK, MODE, USE_TMA)
        acc_t = tl.dot(p.to(tv.dtype), tv, acc_t)
    return acc_o, acc_t, l_i, m_i, r_i


@triton.jit(do_not_specialize=["LQ", "LK"])
def _jvp_attn_fwd(Q, K, V, TQ, TK, TV, O, TO, LSE,
                  sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd,
                  stqb, stql, stqh, stqd, stkb, stkl, stkh, stkd, stvb, stvl, stvh, stvd,
                  sob, sol, soh, sod, stob, stol, stoh, stod,
                  ROW_IV, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, stride_idx,
                  H, LQ, LK, scale,
                  HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, HAS_MASK: tl.constexpr,
                  LAZY: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr):
    HAS_T: tl.constexpr = HAS_TQ or HAS_TK or HAS_TV
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m[:, None] < LQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd, mask=rmask, other=0.0)
    tq = q
    if HAS_TQ:
        tq = tl.load(TQ + b * stqb + h * stqh + offs_m[:, None] * stql + offs_d[None, :] * stqd, mask=rmask,
                     other=0.0)
    if USE_TMA:  # per-(b, h) 2-D views [LK, D]; strides checked on the host (16-byte aligned, unit last)
        k_ptrs = tl.make_tensor_descriptor(K + b * skb + h * skh, [LK, HEAD_DIM], [skl, 1], [BLOCK_N, HEAD_DIM])
        v_ptrs = tl.make_tensor_descriptor(V + b * svb + h * svh, [LK, HEAD_DIM], [svl, 1], [BLOCK_N, HEAD_DIM])
        tk_ptrs = k_ptrs
        tv_ptrs = v_ptrs
        if HAS_TK:
            tk_ptrs = tl.make_tensor_descriptor(TK + b * stkb + h * stkh, [LK, HEAD_DIM], [stkl, 1],
                                                [BLOCK_N, HEAD_DIM])
        if HAS_TV:
            tv_ptrs = tl.make_tensor_descriptor(TV + b * stvb + h * stvh, [LK, HEAD_DIM], [stvl, 1],
                                                [BLOCK_N, HEAD_DIM])
    else:
        k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :] * skd
        v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :] * svd
        tk_ptrs = TK + b * stkb + h * stkh + offs_n[:, None] * stkl + offs_d[None, :] * stkd
        tv_ptrs = TV + b * stvb + h * stvh + offs_n[:, None] * stvl + offs_d[None, :] * stvd
    qk_scale = scale * _LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    acc_o = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc_t = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_MASK:
        iv0, iv1, iv2, iv3 = _load_row_iv(ROW_IV, offs_m, LQ)
        for i in range(tl.load(FULL_NUM + pid_m)):
            start_n = tl.load(FULL_IDX + pid_m * stride_idx + i) * BLOCK_N
            acc_o, acc_t, l_i, m_i, r_i = _fwd_tile(
                acc_o, acc_t, l_i, m_i, r_i, q, tq, k_ptrs, v_ptrs, tk_ptrs, tv_ptrs, start_n, offs_n,
                iv0, iv1, iv2, iv3, LK, qk_scale, scale, skl, svl, stkl, stvl, 0, HAS_TQ, HAS_TK, HAS_TV, LAZY, USE_TMA)
        for i in range(tl.load(PART_NUM + pid_m)):
            start_n = tl.load(PART_IDX + pid_m * stride_idx + i) * BLOCK_N
            acc_o, acc_t, l_i, m_i, r_i = _fwd_tile(
                acc_o, acc_t, l_i, m_i, r_i, q, tq, k_ptrs, v_ptrs, tk_ptrs, tv_ptrs, start_n, offs_n,
                iv0, iv1, iv2, iv3, LK, qk_scale, scale, skl, svl, stkl, stvl, 2, HAS_TQ, HAS_TK, HAS_TV, LAZY, USE_TMA)
    else:
        iv0 = offs_m  # unused placeholders
        lk_full = (LK // BLOCK_N) * BLOCK_N
        for start_n in tl.range(0, lk_full, BLOCK_N, warp_specialize=WARP_SPEC):
            acc_o, acc_t, l_i, m_i, r_i = _fwd_tile(
                acc_o, acc_t, l_i, m_i, r_i, q, tq, k_ptrs, v_ptrs, tk_ptrs, tv_ptrs, start_n, offs_n,
                iv0, iv0, iv0, iv0, LK, qk_scale, scale, skl, svl, stkl, stvl, 0, HAS_TQ, HAS_TK, HAS_TV, LAZY, USE_TMA)
        if lk_full < LK:
            acc_o, acc_t, l_i, m_i, r_i = _fwd_tile(
                acc_o, acc_t, l_i, m_i, r_i, q, tq, k_ptrs, v_ptrs, tk_ptrs, tv_ptrs, lk_full, offs_n,
                iv0, iv0, iv0, iv0, LK, qk_scale, scale, skl, svl, stkl, stvl, 1, HAS_TQ, HAS_TK, HAS_TV, LAZY, USE_TMA)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows: zero output, -inf LSE
    o = acc_o / l_safe[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod, o.to(O.dtype.element_ty),
             mask=rmask)
    if HAS_T:
        t = acc_t / l_safe[:, None] - (r_i / l_safe)[:, None] * o
        tl.store(TO + b * stob + h * stoh + offs_m[:, None] * stol + offs_d[None, :] * stod,
                 t.to(TO.dtype.element_ty), mask=rmask)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=offs_m < LQ)


# ---------------------------------------------------------------------------------------------- backward


@triton.jit(do_not_specialize=["LQ"])
def _bwd_delta(O, DO, DELTA, sob, sol, soh, sod, sdob, sdol, sdoh, sdod, H, LQ,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m[:, None] < LQ
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod, mask=rmask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_d[None, :] * sdod, mask=rmask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=offs_m < LQ)


@triton.jit
def _bwd_dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, start_m, offs_m, offs_n,
                   ROW_IV, LQ, qk_scale, stride_qm, stride_dom, MODE: tl.constexpr):
    """One query tile against this program's key tile, all transposed: rows are keys, columns queries."""
    rows = start_m + offs_m
    if MODE == 0:
        q = tl.load(q_ptrs + start_m * stride_qm)
        do = tl.load(do_ptrs + start_m * stride_dom)
        lse = tl.load(lse_ptr + rows)
        delta = tl.load(delta_ptr + rows)
    else:
        qm = rows < LQ
        q = tl.load(q_ptrs + start_m * stride_qm, mask=qm[:, None], other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dom, mask=qm[:, None], other=0.0)
        lse = tl.load(lse_ptr + rows, mask=qm, other=float("inf"))
        delta = tl.load(delta_ptr + rows, mask=qm, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E  # fully masked rows: P = 0
    pt = tl.math.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [BLOCK_N, BLOCK_M]
    if MODE == 2:
        s0, e0, s1, e1 = _load_row_iv(ROW_IV, rows, LQ)
        c = offs_n[:, None]
        allowed = ((c >= s0[None, :]) & (c < e0[None, :])) | ((c >= s1[None, :]) & (c < e1[None, :]))
        pt = tl.where(allowed, pt, 0.0)
    dv = tl.dot(pt.to(do.dtype), do, dv)
    dpt = tl.dot(v, tl.trans(do))
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk)
    return dk, dv


@triton.jit(do_not_specialize=["LQ", "LK"])
def _bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,
              sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd, sdob, sdol, sdoh, sdod,
              sdkb, sdkl, sdkh, sdkd, sdvb, sdvl, sdvh, sdvd,
              ROW_IV, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, stride_idx,
              H, LQ, LK, scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    kmask = offs_n[:, None] < LK
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :] * skd, mask=kmask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :] * svd, mask=kmask, other=0.0)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd
    do_ptrs = DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_d[None, :] * sdod
    lse_ptr = LSE + pid_bh.to(tl.int64) * LQ
    delta_ptr = DELTA + pid_bh.to(tl.int64) * LQ
    qk_scale = scale * _LOG2E
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    if HAS_MASK:
        for i in range(tl.load(FULL_NUM + pid_n)):
            start_m = tl.load(FULL_IDX + pid_n * stride_idx + i) * BLOCK_M
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, start_m, offs_m, offs_n,
                                    ROW_IV, LQ, qk_scale, sql, sdol, 0)
        for i in range(tl.load(PART_NUM + pid_n)):
            start_m = tl.load(PART_IDX + pid_n * stride_idx + i) * BLOCK_M
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, start_m, offs_m, offs_n,
                                    ROW_IV, LQ, qk_scale, sql, sdol, 2)
    else:
        lq_full = (LQ // BLOCK_M) * BLOCK_M
        for start_m in range(0, lq_full, BLOCK_M):
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, start_m, offs_m, offs_n,
                                    ROW_IV, LQ, qk_scale, sql, sdol, 0)
        if lq_full < LQ:
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, lq_full, offs_m, offs_n,
                                    ROW_IV, LQ, qk_scale, sql, sdol, 1)
    dk = dk * scale
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkl + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvl + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, offs_n, iv0, iv1, iv2, iv3, LK, qk_scale,
                 stride_kn, stride_vn, MODE: tl.constexpr):
    cols = start_n + offs_n
    k = _load_tile(k_ptrs, start_n, stride_kn, cols, LK, MODE, False)
    v = _load_tile(v_ptrs, start_n, stride_vn, cols, LK, MODE, False)
    p = tl.math.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
    if MODE == 1:
        p = tl.where(cols[None, :] < LK, p, 0.0)
    if MODE == 2:
        p = tl.where(_row_mask(cols, iv0, iv1, iv2, iv3), p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq)


@triton.jit(do_not_specialize=["LQ", "LK"])
def _bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,
            sqb, sql, sqh, sqd, skb, skl, skh, skd, svb, svl, svh, svd, sdob, sdol, sdoh, sdod,
            sdqb, sdql, sdqh, sdqd,
            ROW_IV, FULL_NUM, FULL_IDX, PART_NUM, PART_IDX, stride_idx,
            H, LQ, LK, scale,
            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rmask = offs_m[:, None] < LQ
    vm = offs_m < LQ
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd, mask=rmask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdol + offs_d[None, :] * sdod, mask=rmask,
                 other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * LQ + offs_m, mask=vm, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, mask=vm, other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skl + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svl + offs_d[None, :] * svd
    qk_scale = scale * _LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_MASK:
        iv0, iv1, iv2, iv3 = _load_row_iv(ROW_IV, offs_m, LQ)
        for i in range(tl.load(FULL_NUM + pid_m)):
            start_n = tl.load(FULL_IDX + pid_m * stride_idx + i) * BLOCK_N
            dq = _bwd_dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, offs_n, iv0, iv1, iv2, iv3, LK,
                              qk_scale, skl, svl, 0)
        for i in range(tl.load(PART_NUM + pid_m)):
            start_n = tl.load(PART_IDX + pid_m * stride_idx + i) * BLOCK_N
            dq = _bwd_dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, offs_n, iv0, iv1, iv2, iv3, LK,
                              qk_scale, skl, svl, 2)
    else:
        lk_full = (LK // BLOCK_N) * BLOCK_N
        for start_n in range(0, lk_full, BLOCK_N):
            dq = _bwd_dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, start_n, offs_n, offs_m, offs_m, offs_m,
                              offs_m, LK, qk_scale, skl, svl, 0)
        if lk_full < LK:
            dq = _bwd_dq_tile(dq, q, do, lse, delta, k_ptrs, v_ptrs, lk_full, offs_n, offs_m, offs_m, offs_m,
                              offs_m, LK, qk_scale, skl, svl, 1)
    dq = dq * scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdql + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=rmask)


# ------------------------------------------------------------------------------------------------- host


class _Cfg(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _env_cfg(name: str) -> _Cfg | None:
    """Override from the environment, e.g. ``RCM_JVP_FWD_CFG=128,64,8,2`` (used by the tuning sweep)."""
    val = os.environ.get(name)
    return None if not val else _Cfg(*(int(x) for x in val.split(",")))


def _fwd_cfg(d: int, has_tangent: bool) -> _Cfg:
    if _INTERPRET:
        return _Cfg(16, 16, 4, 1)  # tiny tiles: the interpreter runs numpy per op
    env = _env_cfg("RCM_JVP_FWD_CFG" if has_tangent else "RCM_ATTN_FWD_CFG")
    if env:
        return env
    if has_tangent:
        return _Cfg(128, 64, 8, 2) if d <= 128 else _Cfg(64, 32, 8, 2)
    return _Cfg(128, 128, 8, 3) if d <= 128 else _Cfg(64, 32, 8, 2)


def _bwd_cfg(d: int) -> _Cfg:
    if _INTERPRET:
        return _Cfg(16, 16, 4, 1)
    env = _env_cfg("RCM_ATTN_BWD_CFG")
    if env:
        return env
    return _Cfg(64, 128, 8, 3) if d <= 128 else _Cfg(32, 64, 8, 2)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, tangents=(), mask=None) -> str | None:
    """Why the Triton kernels cannot run this call, or None when they can."""
    if not (q.is_cuda or _INTERPRET):
        return f"tensors are on {q.device}; the Triton kernels need CUDA (or TRITON_INTERPRET=1 for tests)"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"expected [B, L, H, D] tensors, got q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or k.shape[:3] != v.shape[:3]:
        return f"shape mismatch q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)}"
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        return f"head dims must match (q {d}, k {k.shape[-1]}, v {v.shape[-1]})"
    if d < 16 or d > 256 or d & (d - 1):
        return f"head dim {d} is not a power of two in 16..256"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: need one of fp16/bf16/fp32 for all three"
    for name, t, p in zip(("tq", "tk", "tv"), tangents, (q, k, v)):
        if t is not None and t.shape != p.shape:
            return f"tangent {name} has shape {tuple(t.shape)}, its primal {tuple(p.shape)}"
    if mask is not None and not hasattr(mask, "tiles"):
        return "dense tensor masks are not block-sparse; pass a rcm_kernels.blockmask mask"
    return None


def _strides(x: Tensor | None, like: Tensor) -> tuple[int, int, int, int]:
    return (x if x is not None else like).stride()


def _tables(mask, lq: int, lk: int, bm: int, bn: int, device, transposed: bool = False) -> list[Tensor]:
    """The tile lists a kernel reads: ``[row_iv, full_num, full_idx, part_num, part_idx]``, or [] unmasked."""
    if mask is None:
        return []
    t = mask.tiles(lq, lk, bm, bn, device)
    if transposed:
        return [t.row_iv, t.q_full_num, t.q_full_idx, t.q_part_num, t.q_part_idx]
    return [t.row_iv, t.kv_full_num, t.kv_full_idx, t.kv_part_num, t.kv_part_idx]


def _table_args(tables: list[Tensor], device) -> tuple:
    if not tables:
        z = torch.zeros(1, dtype=torch.int32, device=device)
        return (z, z, z, z, z, 0)
    return (*tables, tables[2].shape[1])


_FWD_KERNELS = ("auto", "triton", "hopper")


def _hopper_kernel(q: Tensor, k: Tensor, v: Tensor, tangents, tables: list[Tensor]):
    """The warp-specialized Hopper module when ``RCM_JVP_FWD_KERNEL`` (auto | triton | hopper) picks it.

    ``auto`` (default) takes it wherever it applies (sm_90, all three tangents, TMA-viewable inputs)
    on the Triton versions it was measured faster on (``hopper_jvp.auto_select``; benchmarks/RESULTS.md);
    ``hopper`` takes it wherever it applies and raises naming why where it does not.
    """
    want = os.environ.get("RCM_JVP_FWD_KERNEL", "auto")
    if want not in _FWD_KERNELS:
        raise ValueError(f"RCM_JVP_FWD_KERNEL={want!r}: choose one of {_FWD_KERNELS}")
    if want == "triton" or (want == "auto" and (_INTERPRET or not q.is_cuda)):
        return None
    try:
        from . import hopper_jvp
    except ImportError as err:  # a Triton without Gluon
        reason = f"triton.experimental.gluon is not importable ({err})"
    else:
        reason = hopper_jvp.unsupported_reason(q, k, v, tangents)
        if reason is None and tables and _fwd_cfg(q.shape[-1], True)[:2] != (2 * hopper_jvp.BLOCK_M,
                                                                            hopper_jvp.BLOCK_N):
            reason = "the mask's tile tables are built for another tile shape"
    if reason is None and want == "auto" and not hopper_jvp.auto_select():
        return None
    if reason is None:
        return hopper_jvp
    if want == "hopper":
        raise ValueError(f"RCM_JVP_FWD_KERNEL=hopper cannot run this call: {reason}")
    return None


# The launchers are torch custom ops so that torch.func transforms (whose forward-AD and backward rules hand
# the autograd.Function functorch-wrapped tensors) reach the kernels with plain tensors.
@torch.library.custom_op("rcm_kernels::jvp_attn_fwd", mutates_args=())
def _fwd_op(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None,
            scale: float, tables: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    hopper = _hopper_kernel(q, k, v, (tq, tk, tv), tables)
    if hopper is not None:
        return hopper.jvp_attention_fwd_hopper(q, k, v, tq, tk, tv, scale, tables)
    bsz, lq, nh, d = q.shape
    lk = k.shape[1]
    has_t = any(t is not None for t in (tq, tk, tv))
    cfg = _fwd_cfg(d, has_t)
    out = torch.empty(bsz, lq, nh, d, device=q.device, dtype=q.dtype)
    tangent = torch.empty_like(out) if has_t else out.new_empty(0)
    lse = torch.empty(bsz, nh, lq, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(lq, cfg.block_m), bsz * nh)
    _jvp_attn_fwd[grid](
        q, k, v, q if tq is None else tq, k if tk is None else tk, v if tv is None else tv,
        out, tangent if has_t else out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_strides(tq, q), *_strides(tk, k), *_strides(tv, v),
        *out.stride(), *(tangent if has_t else out).stride(), *_table_args(tables, q.device),
        nh, lq, lk, scale,
        HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_TQ=tq is not None, HAS_TK=tk is not None,
        HAS_TV=tv is not None, HAS_MASK=bool(tables), LAZY=_flag("RCM_JVP_LAZY_RESCALE"),
        USE_TMA=_use_tma(q, k, v, tk, tv), WARP_SPEC=_flag("RCM_JVP_WARP_SPEC") and not _INTERPRET,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, tangent, lse


@_fwd_op.register_fake
def _(q, k, v, tq, tk, tv, scale, tables):
    has_t = any(t is not None for t in (tq, tk, tv))
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    return out, (torch.empty_like(out) if has_t else out.new_empty(0)), q.new_empty(
        q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)


def jvp_attention_fwd(q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None = None, tk: Tensor | None = None,
                      tv: Tensor | None = None, *, scale: float | None = None, block_mask=None) -> FwdResult:
    """Attention (and its tangent when any of ``tq, tk, tv`` is given) in one pass: :class:`FwdResult`.

    Inputs ``[B, L, H, D]`` with any strides; tangents are cast to q's dtype when they differ.
    """
    reason = unsupported_reason(q, k, v, (tq, tk, tv), block_mask)
    if reason:
        raise ValueError(f"triton jvp attention: {reason}")
    tq, tk, tv = (None if t is None else t.to(q.dtype) for t in (tq, tk, tv))
    d = q.shape[-1]
    scale = softmax_scale(d, scale)
    cfg = _fwd_cfg(d, any(t is not None for t in (tq, tk, tv)))
    tables = _tables(block_mask, q.shape[1], k.shape[1], cfg.block_m, cfg.block_n, q.device)
    out, tangent, lse = _fwd_op(q, k, v, tq, tk, tv, scale, tables)
    return FwdResult(out, tangent if tangent.numel() or not out.numel() else None, lse)


def _sdpa_flash_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float):
    """dq, dk, dv through SDPA's FlashAttention-2 backward, fed our output and LSE (same math, same inputs)."""
    tr = [x.transpose(1, 2) for x in (do, q, k, v, out)]  # [B, H, L, D] views of the BLHD tensors
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        *tr, lse, None, None, q.shape[1], k.shape[1], 0.0, False, None, None, scale=scale)
    return tuple(g.transpose(1, 2) for g in grads[:3])


def _sdpa_cudnn_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float):
    """dq, dk, dv through SDPA's cuDNN backward, fed our output and LSE (cuDNN keeps it as ``[B, H, Lq, 1]``)."""
    tr = [x.transpose(1, 2) for x in (do, q, k, v, out)]
    grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        *tr, lse.unsqueeze(-1), None, None, None, None, None, q.shape[1], k.shape[1], 0.0, False, scale=scale)
    return tuple(g.transpose(1, 2) for g in grads[:3])


_LIBRARY_BWD = {"flash": _sdpa_flash_bwd, "cudnn": _sdpa_cudnn_bwd}


def _bwd_choice(q: Tensor, masked: bool) -> str:
    """``RCM_ATTN_BWD``: auto (cuDNN when it applies, else ours), triton, flash or cudnn (unmasked only)."""
    want = os.environ.get("RCM_ATTN_BWD", "auto")
    library_ok = not masked and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 128
    if want == "auto":
        return "cudnn" if library_ok else "triton"
    return want if (want in _LIBRARY_BWD and library_ok) else "triton"


@torch.library.custom_op("rcm_kernels::attn_bwd", mutates_args=())
def _bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float,
            dkdv_tables: list[Tensor], dq_tables: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    bsz, lq, nh, d = q.shape
    lk = k.shape[1]
    choice = _bwd_choice(q, bool(dq_tables))
    if choice in _LIBRARY_BWD:
        return tuple(g.contiguous() for g in _LIBRARY_BWD[choice](do, q, k, v, out, lse, scale))
    cfg = _bwd_cfg(d)
    delta = torch.empty_like(lse)
    bm0 = 16 if _INTERPRET else 64
    _bwd_delta[(triton.cdiv(lq, bm0), bsz * nh)](out, do, delta, *out.stride(), *do.stride(), nh, lq,
                                                HEAD_DIM=d, BLOCK_M=bm0)
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    # dK/dV: key tiles of BLOCK_N (= cfg.block_n) rows visit query tiles of BLOCK_M (= cfg.block_m)
    _bwd_dkdv[(triton.cdiv(lk, cfg.block_n), bsz * nh)](
        q, k, v, do, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(), *_table_args(dkdv_tables, q.device),
        nh, lq, lk, scale, HEAD_DIM=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_MASK=bool(dkdv_tables),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # dQ: query tiles of cfg.block_n rows visit key tiles of cfg.block_m (the tutorial's swapped shape)
    _bwd_dq[(triton.cdiv(lq, cfg.block_n), bsz * nh)](
        q, k, v, do, lse, delta, dq, *common, *dq.stride(), *_table_args(dq_tables, q.device),
        nh, lq, lk, scale, HEAD_DIM=d, BLOCK_M=cfg.block_n, BLOCK_N=cfg.block_m, HAS_MASK=bool(dq_tables),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq, dk, dv


@_bwd_op.register_fake
def _(do, q, k, v, out, lse, scale, dkdv_tables, dq_tables):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                  scale: float | None = None, block_mask=None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` (``[B, L, H, D]``, inputs' dtypes) from the saved output and LSE.

    ``RCM_ATTN_BWD`` picks the implementation: ``auto`` (default: SDPA's cuDNN backward fed our O and LSE
    where it applies — unmasked fp16/bf16 on CUDA, D <= 128 — else ours), ``triton`` (ours, any mask, any
    dtype), ``flash`` or ``cudnn`` (SDPA's kernels fed our O and LSE; masked calls still use ours). The
    library kernels compute the same FlashAttention-2 gradient from the same (O, LSE) and are the fastest
    unmasked backward on Hopper; ours is the one that skips masked tiles.
    """
    d = q.shape[-1]
    scale = softmax_scale(d, scale)
    cfg = _bwd_cfg(d)
    lq, lk = q.shape[1], k.shape[1]
    dkdv_tables = _tables(block_mask, lq, lk, cfg.block_m, cfg.block_n, q.device, transposed=True)
    dq_tables = _tables(block_mask, lq, lk, cfg.block_n, cfg.block_m, q.device)
    return _bwd_op(do, q, k, v, out, lse, scale, dkdv_tables, dq_tables)
