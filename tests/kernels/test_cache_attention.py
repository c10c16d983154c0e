"""cache_attention: torch path vs float64 reference, Triton kernel (interpreter on CPU) vs torch path,
quantized-cache attention error bounds, gradients, and GPU checks at Wan sizes in bf16."""

import math

import pytest
import torch

from rcm_kernels.attention.cache_attention import (
    apply_rope_interleaved,
    cache_attention,
    cache_attention_torch,
    cache_attention_triton,
    gather_cache,
)
from rcm_kernels.attention.reference import attention_reference
from rcm_kernels.kv_cache import KVCache
from rcm_kernels.quant import dequantize, quantize


def _rope(num_tokens, d, offset=0.0):
    ang = (torch.arange(num_tokens, dtype=torch.float64)[:, None] + offset) * 10000.0 ** (
        -torch.arange(d // 2, dtype=torch.float64) / (d // 2))
    return ang.cos().float(), ang.sin().float()


def _fmt(kv_dtype):
    """``"int8+smooth"`` -> ("int8", key_smoothing), ``"int4/8"`` -> ("int4", group_size 8), else as is."""
    if kv_dtype.endswith("+smooth"):
        return kv_dtype.removesuffix("+smooth"), {"key_smoothing": "first_block"}
    if kv_dtype.startswith("int4/"):
        return "int4", {"group_size": int(kv_dtype.split("/")[1])}
    return kv_dtype, {}


def _filled(kv_dtype, *, b=2, h=2, d=16, t=5, pattern=(1, 3, 3, 3), sink=1, window=4, pre_rope=False,
            device="cpu", dtype=torch.float32, skew=False):
    """A rolling cache (by default 1 sink + 4 window frames, ring of 7 slots) filled with random blocks; the
    last block wraps around the ring, so the visible frames are out of slot order. ``skew``: key channels get
    magnitudes 0.3..3 (so per-channel scales and smoothing factors differ)."""
    fmt, kw = _fmt(kv_dtype)
    c = KVCache(1, batch=b, heads=h, head_dim=d, tokens_per_frame=t, window_frames=window, sink_frames=sink,
                max_block_frames=3, kv_dtype=fmt, keys_pre_rope=pre_rope, device=device, **kw)
    mag = torch.linspace(0.3, 3.0, d, device=device, dtype=dtype) if skew else 1.0
    for n in pattern:
        c.append([torch.randn(b, n * t, h, d, device=device, dtype=dtype) * mag],
                 [torch.randn(b, n * t, h, d, device=device, dtype=dtype)])
    return c


def _reference(q, layer, ek, ev, rope=None, scale=None, dtype=torch.float64):
    """Attention in ``dtype`` over the dequantized visible frames + extra (independent math)."""
    k, v = gather_cache(layer, dtype)
    if rope is not None:
        k = apply_rope_interleaved(k, *(x.to(dtype) for x in rope))
    if ek is not None:
        k, v = torch.cat([k, ek.to(dtype)], 1), torch.cat([v, ev.to(dtype)], 1)
    return attention_reference(q.to(dtype), k, v, scale=scale).out


@pytest.mark.parametrize("extra", [True, False])
@pytest.mark.parametrize("rope", [False, True])
def test_torch_path_matches_float64_reference(extra, rope):
    c = _filled("float32", pre_rope=rope)
    lay = c.layer(0)
    assert lay.frame_slots.tolist() == [0, 6, 7, 1, 2]  # slot 1 + (a - 1) % 7: wrapped ring
    q = torch.randn(2, 7, 2, 16)
    ek, ev = (torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)) if extra else (None, None)
    r = _rope(lay.num_tokens, 16) if rope else None
    got = cache_attention_torch(q, lay, extra_k=ek, extra_v=ev, k_rope=r, scale=0.3)
    want = _reference(q, lay, ek, ev, r, scale=0.3)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2e-6)  # fp32 vs fp64 accumulation


def test_empty_cache_attends_to_extra_only():
    c = KVCache(1, batch=1, heads=2, head_dim=16, tokens_per_frame=4, window_frames=2, max_block_frames=1,
                kv_dtype="int8")
    q, ek, ev = torch.randn(1, 6, 2, 16), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    want = attention_reference(q, ek, ev).out
    for impl in ("torch", "triton"):
        torch.testing.assert_close(cache_attention(q, c.layer(0), extra_k=ek, extra_v=ev, impl=impl), want,
                                   rtol=0, atol=1e-6)


# (q dtype, storage, atol vs the float64 reference of the same dequantized data). fp32: accumulation order
# only. fp16: q, k and p·s_v are rounded to fp16 (2^-11 relative) before the dots, outputs are O(1): 2e-3.
# int4 ("int4/8": group of 8 tokens for keys, 8 channels for values; 20 tokens per frame -> groups of 8, 8
# and 4, not aligned with the 16-token tiles) and smoothed int8/fp8 keys: same tolerances, the decoding in
# registers is exact (codes) and the scales are applied in float32.
KERNEL_CASES = [
    (torch.float32, "float32", 1e-5), (torch.float32, "int8", 1e-5), (torch.float32, "fp8", 1e-5),
    (torch.float16, "float16", 2e-3), (torch.float16, "int8", 2e-3),
    (torch.float32, "int4/8", 1e-5), (torch.float32, "int8+smooth", 1e-5), (torch.float32, "fp8+smooth", 1e-5),
    (torch.float16, "int4/8", 2e-3), (torch.float16, "int8+smooth", 2e-3),
]


@pytest.mark.parametrize("dtype,kv_dtype,atol", KERNEL_CASES)
@pytest.mark.parametrize("rope", [False, True])
def test_triton_kernel_matches_reference_in_interpreter(dtype, kv_dtype, atol, rope):
    # Tiny tiles (16x16); head dim 24 (padded to 32), 20 tokens per frame (2 tiles, the second partial),
    # 7 queries and 11 extra keys (partial tiles), wrapped ring.
    d, t = 24, 20
    c = _filled(kv_dtype, b=1, d=d, t=t, pre_rope=rope, dtype=dtype, skew=True)
    lay = c.layer(0)
    q = torch.randn(1, 7, 2, d, dtype=dtype)
    ek, ev = torch.randn(1, 11, 2, d, dtype=dtype), torch.randn(1, 11, 2, d, dtype=dtype)
    r = _rope(lay.num_tokens, d, offset=3.0) if rope else None
    got = cache_attention_triton(q, lay, extra_k=ek, extra_v=ev, k_rope=r)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), _reference(q, lay, ek, ev, r), rtol=0, atol=atol)


def test_triton_kernel_cache_only_batch_and_larger_tiles():
    c = _filled("int8", b=2, h=1, d=32, t=40, pattern=(1, 3))
    q = torch.randn(2, 40, 1, 32)  # 2 query tiles of 32, the second partial
    got = cache_attention_triton(q, c.layer(0), blocks=(32, 32, 1, 1))
    torch.testing.assert_close(got.double(), _reference(q, c.layer(0), None, None), rtol=0, atol=1e-5)


def test_triton_kernel_reads_strided_views_without_copies():
    # q/k/v as views of a fused projection [B, L, 3, H, D] (unit channel stride, not contiguous); the extra
    # k/v in fp16 views (cast to q's float32 in registers, exactly).
    c = _filled("int8", b=1, d=16, t=8, pattern=(1, 2))
    qkv = torch.randn(1, 9, 3, 2, 16)
    q, (ek, ev) = qkv[:, :, 0], qkv.half()[:, :, 1:].unbind(2)
    assert not q.is_contiguous() and not ek.is_contiguous() and q.stride(-1) == 1
    got = cache_attention_triton(q, c.layer(0), extra_k=ek, extra_v=ev)
    want = _reference(q, c.layer(0), ek, ev)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)  # fp32 dots vs float64
    assert got.is_contiguous()


def _quant_error_bound(q, k, kd, v, vd, scale):
    """Rigorous bound on |attn(q, kd, vd) - attn(q, k, v)| per (b, i, h, d) from the actual dequantization
    errors: with Δ_i = max_j |s'_ij - s_ij|, the probabilities move by ‖p' - p‖₁ ≤ e^{2Δ_i} - 1, so
    |o' - o| ≤ max_j |v'_j - v_j| + (e^{2Δ_i} - 1)·(max_j v_j - min_j v_j)/2 (per channel)."""
    ds = scale * torch.einsum("bihd,bjhd->bhij", q, kd - k)
    delta = ds.abs().amax(-1).transpose(1, 2)[..., None]  # [B, Lq, H, 1]
    dv = (vd - v).abs().amax(1, keepdim=True)  # [B, 1, H, D]
    half_range = (v.amax(1, keepdim=True) - v.amin(1, keepdim=True)) / 2
    return dv + torch.expm1(2 * delta) * half_range


# Relative error ‖o' - o‖ / ‖o‖ of attention over the stored cache vs exact float64 attention on this Gaussian
# data (D=64), measured over 3 seeds: bf16 storage 0.24-0.25%, int8 0.74-0.80%, fp8 (e4m3) 3.4-3.8%, int8
# with smoothed keys (per-token scales) 0.85-0.87%, fp8 smoothed 3.5-3.8%, int4 with groups of 64 14.7-15.1%,
# of 16 11.7-11.9% (int4: 15 levels, |x - x̂| <= amax/14). Limits leave ~1.5x margin.
REL_LIMIT = {"bfloat16": 0.004, "int8": 0.012, "fp8": 0.055, "int8+smooth": 0.013, "fp8+smooth": 0.057,
             "int4/64": 0.23, "int4/16": 0.18}


@pytest.mark.parametrize("kv_dtype", list(REL_LIMIT))
def test_quantized_cache_attention_error_bound(kv_dtype):
    b, h, d, t = 1, 2, 64, 32
    fmt, kw = _fmt(kv_dtype)
    c = KVCache(1, batch=b, heads=h, head_dim=d, tokens_per_frame=t, window_frames=6, max_block_frames=3,
                kv_dtype=fmt, **kw)
    k, v = torch.randn(b, 6 * t, h, d, dtype=torch.float64), torch.randn(b, 6 * t, h, d, dtype=torch.float64)
    for i in range(2):
        c.append([k[:, i * 3 * t:(i + 1) * 3 * t].float()], [v[:, i * 3 * t:(i + 1) * 3 * t].float()])
    q = torch.randn(b, 16, h, d, dtype=torch.float64)
    exact = attention_reference(q, k, v).out
    kd, vd = gather_cache(c.layer(0), torch.float64)
    bound = _quant_error_bound(q, k, kd, v, vd, 1 / math.sqrt(d))
    for impl in ("torch", "triton"):
        got = cache_attention(q.float(), c.layer(0), impl=impl).double()
        assert ((got - exact).abs() <= bound + 1e-5).all()  # + fp32 arithmetic
        rel = ((got - exact).norm() / exact.norm()).item()
        assert rel < REL_LIMIT[kv_dtype], rel


def test_gradients_flow_to_queries_and_current_block_through_the_torch_path():
    # Self-forcing's exit step: grad w.r.t. q and the block's own k/v; the cache is a constant.
    c = _filled("int8", d=16, t=4)
    q, ek, ev = (torch.randn(2, 5, 2, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = cache_attention(q, c.layer(0), extra_k=ek, extra_v=ev)  # auto: torch path (grad needed)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, ek, ev), g)
    kc, vc = gather_cache(c.layer(0), torch.float64)
    q2, ek2, ev2 = (x.detach().requires_grad_() for x in (q, ek, ev))
    ref = attention_reference(q2, torch.cat([kc, ek2], 1), torch.cat([vc, ev2], 1)).out
    for a, b_ in zip(grads, torch.autograd.grad(ref, (q2, ek2, ev2), g)):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


def test_errors_name_the_problem():
    c = _filled("float32", d=16, t=4)
    q = torch.randn(2, 3, 2, 16)
    with pytest.raises(ValueError, match="does not match q"):
        cache_attention(torch.randn(2, 3, 3, 16), c.layer(0))
    with pytest.raises(ValueError, match="both extra_k and extra_v"):
        cache_attention(q, c.layer(0), extra_k=q)
    with pytest.raises(ValueError, match="post-RoPE"):
        cache_attention(q, c.layer(0), k_rope=_rope(c.layer(0).num_tokens, 16))
    pre = _filled("float32", d=16, t=4, pre_rope=True)
    with pytest.raises(ValueError, match="pass k_rope"):
        cache_attention(q, pre.layer(0))
    with pytest.raises(ValueError, match=r"\[F·T, D/2\]"):
        cache_attention(q, pre.layer(0), k_rope=_rope(3, 16))
    empty = KVCache(1, batch=2, heads=2, head_dim=16, tokens_per_frame=4, window_frames=2, max_block_frames=1)
    with pytest.raises(ValueError, match="nothing to attend to"):
        cache_attention(q, empty.layer(0))


# ---------------------------------------------------------------------------------------------- GPU
# Wan2.1-1.3B geometry: 12 heads x 128, 1560 tokens per latent frame, 3-frame blocks, 3 sink + 9 window frames.

def _wan_cache(kv_dtype, *, pre_rope=False, blocks=6):
    return _filled(kv_dtype, b=1, h=12, d=128, t=1560, pattern=(3,) * blocks, sink=3, window=9,
                   pre_rope=pre_rope, device="cuda", dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8", "fp8", "int4/64", "int8+smooth", "fp8+smooth"])
@pytest.mark.parametrize("rope", [False, True])
def test_gpu_kernel_matches_reference_bf16(kv_dtype, rope):
    c = _wan_cache(kv_dtype, pre_rope=rope)
    lay = c.layer(0)
    q = torch.randn(1, 4680, 12, 128, device="cuda", dtype=torch.bfloat16)
    ek, ev = torch.randn_like(q), torch.randn_like(q)
    r = tuple(x.cuda() for x in _rope(lay.num_tokens, 128)) if rope else None
    got = cache_attention(q, lay, extra_k=ek, extra_v=ev, k_rope=r)[:, :1560].float()
    want = _reference(q[:, :1560], lay, ek, ev, r, dtype=torch.float32)  # fp32 math on the dequantized data
    # bf16 q/k/p (2^-9 relative rounding) over ~23k keys with O(0.01) outputs: abs 5e-3, relative 2e-2.
    torch.testing.assert_close(got, want, rtol=0, atol=5e-3)
    assert ((got - want).norm() / want.norm()).item() < 2e-2


def _requested_bytes(which: str) -> int:
    """Bytes the code asked the CUDA caching allocator for (``which``: ``current`` or ``peak``).

    Not ``memory_allocated``: that counts whole allocator blocks, and a request over 1 MiB may be served by a
    cached free block up to 1 MiB larger, which is then not split. Which block serves it depends on the
    allocator's history: on an H100 the same call's 14,376,960-byte output counted 14,376,960 allocated bytes
    in one process and 14,983,168 in another. Requested bytes are exact and do not depend on history.
    """
    return torch.cuda.memory_stats()[f"requested_bytes.all.{which}"]


def _temporaries(fn):
    """Peak requested bytes during ``fn()`` above those before it, less its result (after a warm-up call)."""
    fn()  # warm-up (compile)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # peak := current, for requested bytes too
    base = _requested_bytes("current")
    out = fn()
    torch.cuda.synchronize()
    return _requested_bytes("peak") - base - out.numel() * out.element_size()


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8", "int4/64", "int8+smooth"])
def test_gpu_kernel_does_not_materialize_the_cache(kv_dtype):
    # The output [1, 4680, 12, 128] bf16 (14.4 MB) is the result, not a temporary: it is larger than a tenth
    # of the 12 visible frames' dense k/v (11.5 MB), so it is subtracted. The smallest copy of anything the
    # cache holds would be its visible key scales (12 frames x 12 heads x 128 x 4 B = 72 KiB); a scaled q or a
    # dequantized tile per program is MBs. The kernel path allocates nothing but the output: 0, limit 64 KiB.
    c = _wan_cache(kv_dtype)
    lay = c.layer(0)
    q = torch.randn(1, 4680, 12, 128, device="cuda", dtype=torch.bfloat16)
    ek, ev = torch.randn_like(q), torch.randn_like(q)
    tmp = _temporaries(lambda: cache_attention(q, lay, extra_k=ek, extra_v=ev))  # auto: the Triton kernel
    assert tmp <= 64 << 10, tmp
    # The measurement does see a materialized cache: the torch path's dequantized copy of the window.
    dense = lay.num_tokens * 12 * 128 * 2 * 2  # a bf16 copy of the visible k and v (int4: also unpacked codes)
    assert _temporaries(lambda: cache_attention(q, lay, extra_k=ek, extra_v=ev, impl="torch")) >= dense


@pytest.mark.gpu
def test_gpu_memory_constant_over_many_blocks():
    # Requested bytes (see _requested_bytes): every full block asks for exactly the same tensors, but
    # allocated-bytes peaks depend on the allocator's history (an H100 run saw two values over the 9 blocks).
    c = _wan_cache("int8", blocks=1)
    q = torch.randn(1, 4680, 12, 128, device="cuda", dtype=torch.bfloat16)
    peaks, nbytes = [], c.nbytes()
    for _ in range(12):
        full = c.num_cached_frames == 12  # 3 sink + 9 window frames: full from the 4th block on
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        k, v = torch.randn_like(q), torch.randn_like(q)
        cache_attention(q, c.layer(0), extra_k=k, extra_v=v)
        c.append([k], [v])
        del k, v
        torch.cuda.synchronize()
        if full:
            peaks.append((_requested_bytes("peak"), _requested_bytes("current")))
    assert len(peaks) == 9 and len(set(peaks)) == 1, peaks
    assert c.nbytes() == nbytes


def test_smoothing_recovers_small_channels_that_per_token_key_scales_lose():
    # Key channels spanning 1000x: one int8 scale per token (over D) rounds the small channels to 0, so their
    # contribution to q·k is lost; dividing by the per-channel factors first (key_smoothing) keeps them.
    # Reference: exact float64 logits; per-token without smoothing is quant.quantize over D directly.
    b, h, d, t = 1, 2, 32, 16
    mag = torch.logspace(-3, 0, d, dtype=torch.float64)
    k = torch.randn(b, 2 * t, h, d, dtype=torch.float64) * mag
    q = torch.randn(b, 4, h, d, dtype=torch.float64) / mag  # queries weigh the small channels up
    exact = torch.einsum("bihd,bjhd->bhij", q, k)
    c = KVCache(1, batch=b, heads=h, head_dim=d, tokens_per_frame=t, window_frames=2, max_block_frames=2,
                kv_dtype="int8", key_smoothing="first_block")
    c.append([k.float()], [k.float()])
    ks, _ = gather_cache(c.layer(0), torch.float64)
    qt = quantize(k.float(), "int8", dim=3)
    kt = dequantize(qt, torch.float64)
    err_smooth = (torch.einsum("bihd,bjhd->bhij", q, ks) - exact).norm() / exact.norm()
    err_token = (torch.einsum("bihd,bjhd->bhij", q, kt) - exact).norm() / exact.norm()
    assert err_smooth < 0.02 and err_token > 0.2, (err_smooth, err_token)  # measured 0.0056 vs 0.45 (seed 0)


def test_smoothing_factors_are_set_by_the_first_block_only():
    b, h, d, t = 1, 1, 8, 4
    c = KVCache(1, batch=b, heads=h, head_dim=d, tokens_per_frame=t, window_frames=4, max_block_frames=1,
                kv_dtype="fp8", key_smoothing="first_block")
    k0 = torch.randn(b, t, h, d)
    blk = c.begin_block(1)
    c.write(0, blk, 5 * k0, k0)  # a denoising step's write, then the final one: the last write defines c
    c.write(0, blk, k0, k0)
    c.commit(blk)
    c0 = c.layer(0).k_smooth.clone()
    pair_max = k0.abs().amax(1).unflatten(-1, (-1, 2)).amax(-1).repeat_interleave(2, -1)  # [B, H, D]
    torch.testing.assert_close(c0, pair_max, rtol=0, atol=0)
    c.append([100 * torch.randn(b, t, h, d)], [k0])
    assert torch.equal(c.layer(0).k_smooth, c0)
    c.reset()
    c.append([k0 * 2], [k0])
    torch.testing.assert_close(c.layer(0).k_smooth, 2 * pair_max, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype,policy", [("int4/64", {"extrapolation": "rolling_sink", "sink_bank_frames": 12}),
                                             ("int8+smooth", {"extrapolation": "infinity_rope",
                                                              "trained_frames": 21})])
def test_gpu_memory_constant_over_a_long_run_with_extrapolation(kv_dtype, policy):
    # Wan 1.3B geometry, pre-RoPE keys rotated in the kernel at the policy's positions, 20 blocks of 3 frames
    # (60 frames, ~3x a 21-frame training length). Once 12 frames are visible (rolling_sink: the 12-frame bank
    # fills, then sink 9 + window 3; infinity_rope: sink 3 + window 9) every block asks the allocator for
    # exactly the same bytes (requested bytes, see _requested_bytes).
    fmt, kw = _fmt(kv_dtype)
    sink = 9 if policy["extrapolation"] == "rolling_sink" else 3
    c = KVCache(1, batch=1, heads=12, head_dim=128, tokens_per_frame=1560, window_frames=12 - sink,
                sink_frames=sink, max_block_frames=3, kv_dtype=fmt, keys_pre_rope=True, device="cuda",
                **kw, **policy)
    q = torch.randn(1, 4680, 12, 128, device="cuda", dtype=torch.bfloat16)
    freq = 10000.0 ** (-torch.arange(64, device="cuda", dtype=torch.float64) / 64)
    peaks, nbytes = [], c.nbytes()
    for _ in range(20):
        full = c.num_cached_frames == 12
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        k, v = torch.randn_like(q), torch.randn_like(q)
        ang = c.frame_positions().double().repeat_interleave(1560)[:, None] * freq
        cache_attention(q, c.layer(0), extra_k=k, extra_v=v, k_rope=(ang.cos().float(), ang.sin().float()))
        c.append([k], [v])
        del k, v, ang
        torch.cuda.synchronize()
        if full:
            peaks.append((_requested_bytes("peak"), _requested_bytes("current")))
    assert len(peaks) >= 15 and len(set(peaks)) == 1, peaks
    assert c.nbytes() == nbytes and c.frames_written == 60
