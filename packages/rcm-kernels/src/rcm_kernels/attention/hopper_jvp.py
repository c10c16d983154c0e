"""Warp-specialized JVP attention forward for Hopper (sm_90), written in Gluon (Triton's explicit dialect).

Same math and outputs as the portable Triton kernel in :mod:`.triton_jvp` (O, Ȯ, LSE in one online-softmax
pass; equations in docs/kernels.md), organised the FlashAttention-3 way (arXiv:2407.08608, §3.1–3.2):

* a **producer warp** streams the key-side tiles through TMA into two rings of shared memory slots, the
  (K, K̇) pair and the (V, V̇) pair, signalling "ready" on one mbarrier per slot and waiting for "free";
* two **consumer warpgroups**, each an independent partition that owns ``BLOCK_M = 64`` query rows (its own Q
  and Q̇ in shared memory), run six asynchronous ``wgmma`` per key tile. Being separate partitions they drift
  apart, so one warpgroup's exponentials overlap the other's matrix multiplies (in the single-program Triton
  kernel both warpgroups do the softmax at once and the tensor core idles).

Step j of a consumer (accumulators in registers, 64 rows × 128 dims × fp32: 64 registers each)::

    issue  S = Q Kⱼᵀ;  issue the previous tile's Õ += P̃ V, T̃ += H̃ V + P̃ V̇    (4 wgmma groups)
    wait S:  S *= s·log2e;  m' = max(m, rowmax S);  α = 2^(m − m');  P̃ = 2^(S − m');  l = α l + rowsum P̃
    wait P V (V slot free);  issue Ṡ = Q̇ Kⱼᵀ + Q K̇ⱼᵀ                             (2 wgmma groups)
    Õ, T̃ *= α;  P̃ → bf16
    wait Ṡ (K slot free):  H̃ = P̃ ⊙ (s Ṡ);  r = α r + rowsum H̃;  H̃ → bf16

so the P V products run under the exponentials and Ṡ under the rescaling. Ṡ is issued late on purpose: with
the previous P̃, H̃ still live as wgmma operands it would not fit the 240 registers a consumer gets (ptxas
spills ~500 bytes). Nothing stays in flight from one step to the next: a wgmma accumulator live across the
loop edge makes ptxas serialize every wgmma (its warning C7514). Strict turn-taking between the two
warpgroups (FlashAttention-3's ping-pong) was measured 1.5× slower here and is not used.

Epilogue: ``O = Õ/l``, ``Ȯ = T̃/l − (r/l) O``, ``LSE = (m + log2 l) ln 2``.

Scope (everything else goes to the Triton kernel; :func:`unsupported_reason` says why): CUDA sm_90, fp16/bf16,
head dim 64 or 128, all three tangents given, and each of the six inputs viewable as one 2-D ``[B·L, row]`` TMA
matrix (unit last stride, ``stride_b = L·stride_l``, 16-byte aligned). Rows of the last (ragged) key tile that
fall past ``Lk`` are masked to -inf; query rows past ``Lq`` are computed but not stored. Block masks come as the
portable kernel's tile table (tiles of 128 queries × 64 keys): a program visits only its listed key tiles, the
"full" ones without mask arithmetic, the "partial" ones masked from each row's two key intervals (read per
partial tile: held in registers they spill); rows that see no key give zero output and a -inf LSE.
Gluon has no interpreter, so this kernel is checked on the GPU against the reference twin (tests marked gpu).
"""

from __future__ import annotations

import os

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["auto_select", "jvp_attention_fwd_hopper", "unsupported_reason"]

# Triton 3.6 names the TMA load async_copy_global_to_shared; later versions call it async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_LOG2E = 1.4426950408889634
# Triton versions on which the kernel was measured faster than the portable one (and compiles without spills:
# tests/kernels/test_attention_hopper.py). Triton 3.9's code generation spills ~400 bytes per thread, so there
# the kernel runs only when asked for (RCM_JVP_FWD_KERNEL=hopper).
_MEASURED_TRITON = ("3.6.",)
_LN2 = gl.constexpr(0.6931471805599453)
BLOCK_M = 64  # query rows per consumer warpgroup (two per program)
BLOCK_N = 64  # keys per tile: S and Ṡ take 32 registers each, the accumulators 2 × 64 (head dim 128)


def _stages(d: int) -> tuple[int, int]:
    """Ring depths (K pairs, V pairs); ``RCM_JVP_HOPPER_STAGES=k,v`` overrides (tuning). At head dim 128 a slot
    holds a 32 KiB pair: Q, Q̇ (64 KiB) + 2 + 2 slots = 192 KiB; 3 + 2 (224 KiB) is the most that fits."""
    env = os.environ.get("RCM_JVP_HOPPER_STAGES")
    if env:
        ks, vs = (int(x) for x in env.split(","))
        return ks, vs
    return 2, 2  # 3,2 and 2,3 measured no faster (benchmarks/RESULTS.md)


_CONSUMER_REGS = gl.constexpr(240)  # per thread, each consumer warpgroup (setmaxnreg); the producer warp gets 24


@gluon.constexpr_function
def _mma_layout(n):
    """The wgmma accumulator layout of one warpgroup (4 warps along M) for an N-wide tile."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _producer(q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, q_bufs, tq_bufs, k_bufs, tk_bufs, v_bufs,
              tv_bufs, q_ready, k_ready, k_free, v_ready, v_free, row_q, row_k, col, tiles, HAS_MASK: gl.constexpr):
    """One warp: both consumers' Q and Q̇ once, then per key tile the (K, K̇) pair and the (V, V̇) pair into
    their rings (a slot is refilled once both consumers have released it)."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    KS: gl.constexpr = k_bufs.type.shape[0]
    VS: gl.constexpr = v_bufs.type.shape[0]
    for w in gl.static_range(2):
        bar = q_ready.index(w)
        mbarrier.expect(bar, 2 * q_desc.block_type.nbytes)
        _tma_load(q_desc, [row_q + w * BM, col], bar, q_bufs.index(w))
        _tma_load(tq_desc, [row_q + w * BM, col], bar, tq_bufs.index(w))
    nf, n_tiles, full_row, part_row = tiles
    for j in range(n_tiles):
        row = row_k + _tile_start(j, nf, full_row, part_row, BN, HAS_MASK)
        ks = j % KS
        mbarrier.wait(k_free.index(ks), ((j // KS) & 1) ^ 1)  # a fresh barrier passes parity 1
        kb = k_ready.index(ks)
        mbarrier.expect(kb, 2 * k_desc.block_type.nbytes)
        _tma_load(k_desc, [row, col], kb, k_bufs.index(ks))
        _tma_load(tk_desc, [row, col], kb, tk_bufs.index(ks))
        vs = j % VS
        mbarrier.wait(v_free.index(vs), ((j // VS) & 1) ^ 1)
        vb = v_ready.index(vs)
        mbarrier.expect(vb, 2 * v_desc.block_type.nbytes)
        _tma_load(v_desc, [row, col], vb, v_bufs.index(vs))
        _tma_load(tv_desc, [row, col], vb, tv_bufs.index(vs))


@gluon.jit
def _tile_start(j, nf, full_row, part_row, BN: gl.constexpr, HAS_MASK: gl.constexpr):
    """First key of the j-th visited tile: the mask's full tiles, then its partial ones (or every tile)."""
    if HAS_MASK:  # both reads stay in bounds (index 0 when not the one wanted)
        full = gl.load(full_row + gl.where(j < nf, j, 0))
        part = gl.load(part_row + gl.where(j < nf, 0, j - nf))
        return gl.where(j < nf, full, part) * BN
    else:
        return j * BN


@gluon.jit
def _masked_start(j, nf, part_row, BN: gl.constexpr):
    """First key of the j-th visited tile of a block mask when it is a partial one (j >= nf)."""
    return gl.load(part_row + (j - nf)) * BN


@gluon.jit
def _pv_products(j, v_bufs, tv_bufs, v_ready, acc_o, acc_t, p16, h16):
    """Issue tile j's ``Õ += P̃ V``, ``T̃ += H̃ V + P̃ V̇`` (three asynchronous wgmma groups)."""
    VS: gl.constexpr = v_bufs.type.shape[0]
    vs = j % VS
    mbarrier.wait(v_ready.index(vs), (j // VS) & 1)
    acc_o = warpgroup_mma(p16, v_bufs.index(vs), acc_o, is_async=True)
    acc_t = warpgroup_mma(h16, v_bufs.index(vs), acc_t, is_async=True)
    acc_t = warpgroup_mma(p16, tv_bufs.index(vs), acc_t, is_async=True)
    return acc_o, acc_t


@gluon.jit
def _step(j, col0, iv, bufs, bars, acc_o, acc_t, p16, h16, m_i, l_i, r_i, lk, qk_scale, scale,
          HAS_PREV: gl.constexpr, MODE: gl.constexpr):
    """Key tile j of one consumer, in the order of the module docstring; returns the state with this tile's
    P̃, H̃ (bf16 wgmma operands) for the next step's P V products. HAS_PREV: a previous tile's P V products are
    still to issue. MODE 0: no masking; 1: keys >= lk get -inf (the ragged last tile); 2: keys outside each
    row's two intervals ``iv`` get -inf (a partial tile of a block mask; a row may have seen no key yet)."""
    q_s, tq_s, k_bufs, tk_bufs, v_bufs, tv_bufs = bufs
    k_ready, k_free, v_ready, v_free = bars
    BM: gl.constexpr = q_s.type.shape[0]
    BN: gl.constexpr = k_bufs.type.shape[1]
    KS: gl.constexpr = k_bufs.type.shape[0]
    VS: gl.constexpr = v_bufs.type.shape[0]
    s_layout: gl.constexpr = _mma_layout(BN)
    o_layout: gl.constexpr = _mma_layout(k_bufs.type.shape[2])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    ks = j % KS
    mbarrier.wait(k_ready.index(ks), (j // KS) & 1)
    k_t = k_bufs.index(ks).permute((1, 0))  # [D, BN] view: wgmma reads K transposed from shared memory
    tk_t = tk_bufs.index(ks).permute((1, 0))
    zero_s = gl.zeros([BM, BN], gl.float32, layout=s_layout)
    qk = warpgroup_mma(q_s, k_t, zero_s, use_acc=False, is_async=True)
    if HAS_PREV:  # the previous tile's P V products run during this tile's exponentials
        acc_o, acc_t = _pv_products(j - 1, v_bufs, tv_bufs, v_ready, acc_o, acc_t, p16, h16)
        qk = warpgroup_mma_wait(num_outstanding=3, deps=(qk,))
    else:
        qk = warpgroup_mma_wait(num_outstanding=0, deps=(qk,))
    qk = qk * qk_scale
    if MODE != 0:
        cols = gl.expand_dims(col0 + gl.arange(0, BN, layout=gl.SliceLayout(0, s_layout)), 0)
        if MODE == 1:
            keep = cols < lk
        else:
            iv_rows, n_rows = iv  # the rows' key intervals, read here: held across steps they would spill
            rows = gl.arange(0, BM, layout=gl.SliceLayout(1, s_layout))
            ivp = iv_rows + rows * 4
            valid = rows < n_rows
            iv0 = gl.load(ivp, mask=valid, other=0)
            iv1 = gl.load(ivp + 1, mask=valid, other=0)
            iv2 = gl.load(ivp + 2, mask=valid, other=0)
            iv3 = gl.load(ivp + 3, mask=valid, other=0)
            keep = ((cols >= gl.expand_dims(iv0, 1)) & (cols < gl.expand_dims(iv1, 1))) | \
                ((cols >= gl.expand_dims(iv2, 1)) & (cols < gl.expand_dims(iv3, 1)))
        qk = gl.where(keep, qk, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(qk, axis=1))
    m_sub = m_new
    if MODE == 2:  # keep exp2 away from (-inf) - (-inf) in rows without a key yet
        m_sub = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_sub)
    p = gl.exp2(qk - gl.expand_dims(m_sub, 1))
    l_i = l_i * alpha + gl.sum(p, axis=1)
    if HAS_PREV:
        acc_o, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc_o, acc_t))
        mbarrier.arrive(v_free.index((j - 1) % VS), count=1)
    # Ṡ runs during the rescaling of the accumulators (issued only now: P̃, H̃ of the previous tile, live until
    # its P V products finish, would not fit in the 240 registers beside it).
    sd = warpgroup_mma(tq_s, k_t, zero_s, use_acc=False, is_async=True)
    sd = warpgroup_mma(q_s, tk_t, sd, is_async=True)
    alpha_o = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    acc_o = acc_o * alpha_o
    acc_t = acc_t * alpha_o
    p16 = gl.convert_layout(p.to(q_s.dtype), p_layout)
    sd = warpgroup_mma_wait(num_outstanding=0, deps=(sd,))
    mbarrier.arrive(k_free.index(ks), count=1)
    hp = p * (sd * scale)
    r_i = r_i * alpha + gl.sum(hp, axis=1)
    h16 = gl.convert_layout(hp.to(q_s.dtype), p_layout)
    return acc_o, acc_t, p16, h16, m_new, l_i, r_i


@gluon.jit
def _consumer(q_bufs, tq_bufs, k_bufs, tk_bufs, v_bufs, tv_bufs, q_ready, k_ready, k_free, v_ready, v_free,
              o_ptr, to_ptr, lse_ptr, out_row, out_col, out_stride, lse_row, m_start, lq, lk, tiles, row_iv,
              qk_scale, scale, WG: gl.constexpr, HAS_MASK: gl.constexpr):
    """One warpgroup: 64 query rows against every key tile, then O, Ȯ and the LSE to global memory."""
    BM: gl.constexpr = q_bufs.type.shape[1]
    D: gl.constexpr = q_bufs.type.shape[2]
    BN: gl.constexpr = k_bufs.type.shape[1]
    VS: gl.constexpr = v_bufs.type.shape[0]
    s_layout: gl.constexpr = _mma_layout(BN)
    o_layout: gl.constexpr = _mma_layout(D)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    bufs = (q_bufs.index(WG), tq_bufs.index(WG), k_bufs, tk_bufs, v_bufs, tv_bufs)
    bars = (k_ready, k_free, v_ready, v_free)
    m_i = gl.full([BM], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.zeros([BM], gl.float32, layout=row_layout)
    r_i = gl.zeros([BM], gl.float32, layout=row_layout)
    acc_o = gl.zeros([BM, D], gl.float32, layout=o_layout)
    acc_t = gl.zeros([BM, D], gl.float32, layout=o_layout)
    p16 = gl.zeros([BM, BN], q_bufs.dtype, layout=p_layout)
    h16 = gl.zeros([BM, BN], q_bufs.dtype, layout=p_layout)
    nf, n_tiles, _, part_row = tiles
    iv = (lq, lq)  # unused without a mask
    if HAS_MASK:
        iv = (row_iv + (m_start + WG * BM) * 4, lq - (m_start + WG * BM))  # this warpgroup's rows of [lq, 4]
    mbarrier.wait(q_ready.index(WG), 0)
    first = nf * 0  # tile 0 as a runtime value, like the loop's
    # Two control flows, one per build: the masked one needs guards for programs without any tile, and
    # merged into the unmasked build those guards made ptxas copy the accumulators about (4x the movs).
    if HAS_MASK:  # the mask's full tiles, then its partial ones; a program may have no tile at all
        if nf > 0:
            acc_o, acc_t, p16, h16, m_i, l_i, r_i = _step(
                first, 0, iv, bufs, bars, acc_o, acc_t, p16, h16, m_i, l_i, r_i, lk, qk_scale, scale, False, 0)
        elif n_tiles > 0:
            acc_o, acc_t, p16, h16, m_i, l_i, r_i = _step(
                first, _masked_start(first, nf, part_row, BN), iv, bufs, bars, acc_o, acc_t, p16, h16, m_i, l_i,
                r_i, lk, qk_scale, scale, False, 2)
        for j in range(1, nf):
            acc_o, acc_t, p16, h16, m_i, l_i, r_i = _step(
                j, 0, iv, bufs, bars, acc_o, acc_t, p16, h16, m_i, l_i, r_i, lk, qk_scale, scale, True, 0)
        for j in range(gl.maximum(nf, 1), n_tiles):
            acc_o, acc_t, p16, h16, m_i, l_i, r_i = _step(
                j, _masked_start(j, nf, part_row, BN), iv, bufs, bars, acc_o, acc_t, p16, h16, m_i, l_i, r_i, lk,
                qk_scale, scale, True, 2)
        if n_tiles > 0:
            acc_o, acc_t = _pv_products(n_tiles - 1, v_bufs, tv_bufs, v_ready, acc_o, acc_t, p16, h16)
            acc_o, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc_o, acc_t))
        mbarrier.arrive(v_free.index((n_tiles + VS - 1) % VS), count=1, pred=n_tiles > 0)
    else:  # every tile, the ragged last one masked by the key length
        if nf > 0:
            acc_o, acc_t, p16, h16, m_i, l_i, r_i = _step(
                first, 0, iv, bufs, bars, acc_o, acc_t, p16, h16, m_i, l_i, r_i, lk, qk_scale, scale, False, 0)
        else:
            acc_o, acc_t, p16, h16, m_i, l_i, r_i = _step(
                first, 0, iv, bufs, bars, acc_o, acc_t, p16, h16, m_i, l_i, r_i, lk, qk_scale, scale, False, 1)
        for j in range(1, nf):
            acc_o, acc_t, p16, h16, m_i, l_i, r_i = _step(
                j, 0, iv, bufs, bars, acc_o, acc_t, p16, h16, m_i, l_i, r_i, lk, qk_scale, scale, True, 0)
        if nf > 0 and n_tiles > nf:
            acc_o, acc_t, p16, h16, m_i, l_i, r_i = _step(
                nf, nf * BN, iv, bufs, bars, acc_o, acc_t, p16, h16, m_i, l_i, r_i, lk, qk_scale, scale, True, 1)
        acc_o, acc_t = _pv_products(n_tiles - 1, v_bufs, tv_bufs, v_ready, acc_o, acc_t, p16, h16)
        acc_o, acc_t = warpgroup_mma_wait(num_outstanding=0, deps=(acc_o, acc_t))
        mbarrier.arrive(v_free.index((n_tiles - 1) % VS), count=1)

    if HAS_MASK:
        l_i = gl.where(l_i == 0.0, 1.0, l_i)  # rows that saw no key: zero output, -inf LSE (m stays -inf)
    l_o = gl.expand_dims(gl.convert_layout(l_i, gl.SliceLayout(1, o_layout)), 1)
    r_o = gl.expand_dims(gl.convert_layout(r_i, gl.SliceLayout(1, o_layout)), 1)
    o = acc_o / l_o
    t = acc_t / l_o - (r_o / l_o) * o
    rows = m_start + WG * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, o_layout))
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    offs = gl.expand_dims((out_row + rows).to(gl.int64) * out_stride, 1) + gl.expand_dims(out_col + dims, 0)
    keep = gl.expand_dims(rows < lq, 1)
    gl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=keep)
    gl.store(to_ptr + offs, t.to(to_ptr.dtype.element_ty), mask=keep)
    lse = (m_i + gl.log2(l_i)) * _LN2
    lse_rows = m_start + WG * BM + gl.arange(0, BM, layout=row_layout)
    gl.store(lse_ptr + lse_row + lse_rows, lse, mask=lse_rows < lq)


@gluon.jit(do_not_specialize=["lq", "lk"])
def _jvp_attn_fwd_ws(q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, o_ptr, to_ptr, lse_ptr,
                     row_iv, full_num, full_idx, part_num, part_idx, stride_idx,
                     n_heads, lq, lk, col_stride, out_stride, qk_scale, scale,
                     K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, HAS_MASK: gl.constexpr,
                     num_warps: gl.constexpr):
    BM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    m_start = pid_m * (2 * BM)
    if HAS_MASK:  # this program's key tiles: the mask's full ones, then its partial ones
        nf = gl.load(full_num + pid_m)
        n_tiles = nf + gl.load(part_num + pid_m)
        full_row = full_idx + pid_m * stride_idx
        part_row = part_idx + pid_m * stride_idx
    else:  # every tile; only a ragged last one is masked
        nf = lk // BN
        n_tiles = gl.cdiv(lk, BN)
        full_row = nf  # unused placeholders (the table arguments are None)
        part_row = nf
    tiles = (nf, n_tiles, full_row, part_row)

    q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2, BM, D], q_desc.layout)
    tq_bufs = gl.allocate_shared_memory(tq_desc.dtype, [2, BM, D], tq_desc.layout)
    k_bufs = gl.allocate_shared_memory(k_desc.dtype, [K_STAGES, BN, D], k_desc.layout)
    tk_bufs = gl.allocate_shared_memory(tk_desc.dtype, [K_STAGES, BN, D], tk_desc.layout)
    v_bufs = gl.allocate_shared_memory(v_desc.dtype, [V_STAGES, BN, D], v_desc.layout)
    tv_bufs = gl.allocate_shared_memory(tv_desc.dtype, [V_STAGES, BN, D], tv_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    v_free = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_free.index(i), count=2)  # both consumers release a slot
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_free.index(i), count=2)

    col = h * col_stride
    first: gl.constexpr = 0
    second: gl.constexpr = 1
    gl.warp_specialize([
        (_consumer, (q_bufs, tq_bufs, k_bufs, tk_bufs, v_bufs, tv_bufs, q_ready, k_ready, k_free, v_ready, v_free,
                     o_ptr, to_ptr, lse_ptr, b * lq, h * D, out_stride, pid_bh.to(gl.int64) * lq, m_start, lq, lk,
                     tiles, row_iv, qk_scale, scale, first, HAS_MASK)),
        (_consumer, (q_bufs, tq_bufs, k_bufs, tk_bufs, v_bufs, tv_bufs, q_ready, k_ready, k_free, v_ready, v_free,
                     o_ptr, to_ptr, lse_ptr, b * lq, h * D, out_stride, pid_bh.to(gl.int64) * lq, m_start, lq, lk,
                     tiles, row_iv, qk_scale, scale, second, HAS_MASK)),
        (_producer, (q_desc, tq_desc, k_desc, tk_desc, v_desc, tv_desc, q_bufs, tq_bufs, k_bufs, tk_bufs, v_bufs,
                     tv_bufs, q_ready, k_ready, k_free, v_ready, v_free, b * lq + m_start, b * lk, col, tiles,
                     HAS_MASK)),
    ], [4, 1], [_CONSUMER_REGS, 24])


# ------------------------------------------------------------------------------------------------- host


def _matrix_view(x: Tensor) -> tuple[int, int] | None:
    """``(row stride, head stride)`` when ``x [B, L, H, D]`` reads as one 2-D TMA matrix ``[B·L, row]``."""
    bsz, length, nh, d = x.shape
    sb, sl, sh, sd = x.stride()
    if sd != 1 or x.data_ptr() % 16 or (sl * x.element_size()) % 16 or (sh * x.element_size()) % 16:
        return None
    if (bsz > 1 and sb != length * sl) or (nh - 1) * sh + d > sl:  # rows must hold all heads, in order
        return None
    return sl, sh


def auto_select() -> bool:
    """Whether ``RCM_JVP_FWD_KERNEL=auto`` may pick this kernel: only on the Triton versions it was measured on."""
    return triton.__version__.startswith(_MEASURED_TRITON)


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, tangents=(), mask=None) -> str | None:
    """Why this kernel cannot run the call (None when it can); shapes were validated by the Triton path."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "Gluon kernels have no interpreter"
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        return "needs a Hopper (sm_90) GPU"
    if mask is not None and not hasattr(mask, "tiles"):
        return "dense tensor masks are not block-sparse"
    if len(tangents) != 3 or any(t is None for t in tangents):
        return "needs all three tangents"
    if not q.shape[1] or not k.shape[1]:
        return "empty sequence"
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in (64, 128):
        return f"needs fp16/bf16 with head dim 64 or 128 (got {q.dtype}, {q.shape[-1]})"
    views = [_matrix_view(x) for x in (q, k, v, *tangents)]
    if any(vw is None for vw in views) or len({vw[1] for vw in views}) != 1:
        return "inputs are not 2-D TMA views with one head stride"
    if any(t.dtype != q.dtype for t in (k, v, *tangents)):
        return "all six inputs must share one dtype"
    return None


def _descriptor(x: Tensor, rows: int) -> TensorDescriptor:
    bsz, length, nh, d = x.shape
    sl, sh = _matrix_view(x)
    dtype = gl.float16 if x.dtype == torch.float16 else gl.bfloat16
    layout = gl.NVMMASharedLayout.get_default_for([rows, d], dtype)
    # Columns cover heads 0..H-1 of this tensor only (a packed qkv's other parts stay outside the box).
    return TensorDescriptor(x, [bsz * length, (nh - 1) * sh + d], [sl, 1], [rows, d], layout)


def jvp_attention_fwd_hopper(q: Tensor, k: Tensor, v: Tensor, tq: Tensor, tk: Tensor, tv: Tensor,
                             scale: float, tables: list[Tensor] = ()) -> tuple[Tensor, Tensor, Tensor]:
    """``(O, Ȯ, LSE)`` as :func:`.triton_jvp.jvp_attention_fwd` returns them; call only when
    :func:`unsupported_reason` is None. ``tables``: a block mask's ``[row_iv, full_num, full_idx, part_num,
    part_idx]`` for tiles of ``2·BLOCK_M`` queries × ``BLOCK_N`` keys (empty: unmasked)."""
    bsz, lq, nh, d = q.shape
    lk = k.shape[1]
    out = torch.empty(bsz, lq, nh, d, device=q.device, dtype=q.dtype)
    tangent = torch.empty_like(out)
    lse = torch.empty(bsz, nh, lq, device=q.device, dtype=torch.float32)
    descs = [_descriptor(x, BLOCK_M) for x in (q, tq)] + [_descriptor(x, BLOCK_N) for x in (k, tk, v, tv)]
    grid = (triton.cdiv(lq, 2 * BLOCK_M), bsz * nh)
    ks, vs = _stages(d)
    if tables:
        assert tables[1].shape[0] == grid[0], "mask tables must be built for 128-query tiles"
        table_args = (*tables, tables[2].shape[1])
    else:  # None: the unmasked kernel is compiled without these arguments
        table_args = (None,) * 6
    _jvp_attn_fwd_ws[grid](*descs, out, tangent, lse, *table_args, nh, lq, lk, _matrix_view(q)[1], nh * d,
                           scale * _LOG2E, scale, K_STAGES=ks, V_STAGES=vs, HAS_MASK=bool(tables), num_warps=4,
                           maxnreg=168)
    return out, tangent, lse
