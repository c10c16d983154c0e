"""KVCache: bookkeeping, rolling window with sinks == recomputation over the kept frames, constant memory."""

import pytest
import torch

from rcm_kernels.attention.cache_attention import apply_rope_interleaved, cache_attention_torch, gather_cache
from rcm_kernels.attention.reference import attention_reference
from rcm_kernels.kv_cache import CrossAttentionCache, KVCache
from rcm_kernels.quant import (
    dequantize_int4_keys,
    dequantize_int4_values,
    dequantize_keys,
    dequantize_values,
    quantize_int4_keys,
    quantize_int4_values,
    quantize_keys,
    quantize_keys_smoothed,
    quantize_values,
    smoothing_factors,
)

B, H, D, T = 2, 2, 16, 3  # tiny geometry: 3 tokens per frame


def _cache(num_layers=2, **kw):
    args = dict(batch=B, heads=H, head_dim=D, tokens_per_frame=T, window_frames=4, sink_frames=1,
                max_block_frames=3, kv_dtype="float32")
    return KVCache(num_layers, **{**args, **kw})


def _rope(frame_pos, d=D):
    """A 2-D RoPE table ``[F·T, D/2]``: half the pairs rotate with the frame position, half with the token."""
    f = frame_pos.double()[:, None].expand(-1, T).reshape(-1)
    tok = torch.arange(T, dtype=torch.float64).repeat(len(frame_pos))
    freq = 10000.0 ** (-torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    ang = torch.cat([f[:, None] * freq, tok[:, None] * freq], 1)
    return ang.cos(), ang.sin()


def _stream(pattern, layers=2):
    """Random per-frame k/v for a sequence of blocks: list of (ks[layer], vs[layer]), each [B, n·T, H, D]."""
    return [([torch.randn(B, n * T, H, D) for _ in range(layers)], [torch.randn(B, n * T, H, D) for _ in range(layers)])
            for n in pattern]


def _frames(stream, layer, which):
    """Per-frame k (which=0) or v (which=1) ``[B, T, H, D]`` of one layer across the stream."""
    return [x for blk in stream for x in blk[which][layer].split(T, dim=1)]


# c1-3 blocks; window 4 and max_block 3 give a ring of 7 slots, so blocks wrap around the ring
PATTERN = [1, 3, 3, 3, 3, 3]


def test_bookkeeping_sink_window_and_positions():
    c = _cache()
    assert c.num_cached_frames == 0 and c.frame_positions().numel() == 0
    blocks = [c.append(*blk) for blk in _stream(PATTERN)]
    assert [b.first_frame for b in blocks] == [0, 1, 4, 7, 10, 13]
    assert c.frames_written == 16
    assert c.cached_frames() == [0, 12, 13, 14, 15]  # 1 sink frame + the 4 most recent
    assert c.frame_positions().tolist() == [0, 12, 13, 14, 15]  # absolute policy
    assert c.layer(0).frame_slots.tolist() == [0, 5, 6, 7, 1]  # slot = 1 + (a - 1) % 7, chronological
    assert blocks[3].slots == (7, 1, 2)  # wrapped around the ring
    nxt = c.begin_block(3)
    assert nxt.positions == (16, 17, 18) and nxt.first_frame == 16


def test_reindexed_positions_follow_the_kept_window():
    c = _cache(position_policy="reindexed", keys_pre_rope=True)
    for blk in _stream(PATTERN):
        nxt = c.begin_block(len(blk[0][0][0]) // T)
        assert nxt.positions == tuple(range(c.num_cached_frames, c.num_cached_frames + nxt.num_frames))
        for i in range(2):
            c.write(i, nxt, blk[0][i], blk[1][i])
        c.commit(nxt)
    assert c.frame_positions().tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kv_dtype", ["float32", "int8", "fp8"])
@pytest.mark.parametrize("policy", ["absolute", "reindexed"])
def test_rolling_cache_equals_fresh_cache_of_kept_frames(kv_dtype, policy):
    # Attention over the rolling cache must equal attention over a cache built from scratch with exactly the
    # frames it keeps, and (in float64) plain attention over those frames. Quantization is per frame (keys)
    # and per token (values), so the fresh cache holds the very same codes: the equality is exact up to
    # float32 summation (1e-6), for quantized storage too.
    pre = policy == "reindexed"
    stream = _stream(PATTERN)
    roll = _cache(kv_dtype=kv_dtype, position_policy=policy, keys_pre_rope=pre)
    for ks, vs in stream:
        roll.append(ks, vs)
    kept = roll.cached_frames()
    fresh = _cache(kv_dtype=kv_dtype, rolling=False, window_frames=len(kept), sink_frames=0,
                   max_block_frames=None, position_policy=policy, keys_pre_rope=pre)
    blk = fresh.begin_block(len(kept))
    for layer in range(2):
        kf, vf = _frames(stream, layer, 0), _frames(stream, layer, 1)
        fresh.write(layer, blk, torch.cat([kf[a] for a in kept], 1), torch.cat([vf[a] for a in kept], 1))
    fresh.commit(blk)
    if pre:
        assert torch.equal(roll.frame_positions(), fresh.frame_positions())  # 0..F-1 in both
    q, ek, ev = torch.randn(B, 5, H, D), torch.randn(B, 2 * T, H, D), torch.randn(B, 2 * T, H, D)
    rope = _rope(roll.frame_positions()) if pre else None
    for layer in range(2):
        got = cache_attention_torch(q, roll.layer(layer), extra_k=ek, extra_v=ev, k_rope=rope)
        want = cache_attention_torch(q, fresh.layer(layer), extra_k=ek, extra_v=ev, k_rope=rope)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # Independent float64 reference over the kept frames (dequantized through rcm_kernels.quant).
        k = torch.stack([_frames(stream, layer, 0)[a] for a in kept], 1).double()  # [B, F, T, H, D]
        v = torch.cat([_frames(stream, layer, 1)[a] for a in kept], 1).double()
        if kv_dtype != "float32":
            k = dequantize_keys(*quantize_keys(k, kv_dtype), torch.float64)
            v = dequantize_values(*quantize_values(v, kv_dtype), torch.float64)
        k = k.flatten(1, 2)
        if pre:
            k = apply_rope_interleaved(k, *rope)
        ref = attention_reference(q.double(), torch.cat([k, ek.double()], 1), torch.cat([v, ev.double()], 1)).out
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6)  # fp32 vs fp64 accumulation


def test_absolute_positions_keep_true_frame_indices_with_pre_rope_keys():
    # Pre-RoPE keys rotated at read time with absolute positions == post-RoPE keys rotated at write time.
    stream = _stream(PATTERN, layers=1)
    pre = _cache(num_layers=1, keys_pre_rope=True)
    post = _cache(num_layers=1)
    for ks, vs in stream:
        blk = pre.begin_block(ks[0].shape[1] // T)
        pre.write(0, blk, ks[0], vs[0])
        pre.commit(blk)
        pos = torch.tensor(blk.positions)
        post.append([apply_rope_interleaved(ks[0], *_rope(pos))], vs)
    q = torch.randn(B, 4, H, D)
    got = cache_attention_torch(q, pre.layer(0), k_rope=_rope(pre.frame_positions()))
    torch.testing.assert_close(got, cache_attention_torch(q, post.layer(0)), rtol=0, atol=1e-6)


def test_pending_block_is_invisible_until_commit_and_last_block_can_be_overwritten():
    c = _cache(num_layers=1)
    stream = _stream([1, 3, 3], layers=1)
    for ks, vs in stream[:2]:
        c.append(ks, vs)
    before = gather_cache(c.layer(0), torch.float32)
    blk = c.begin_block(3)
    for _ in range(2):  # denoising steps write the pending block repeatedly
        c.write(0, blk, torch.randn(B, 3 * T, H, D), torch.randn(B, 3 * T, H, D))
    for x, y in zip(before, gather_cache(c.layer(0), torch.float32)):
        assert torch.equal(x, y)  # committed frames untouched, pending frames not visible
    c.write(0, blk, *(x[0] for x in stream[2]))
    c.commit(blk)
    assert c.cached_frames() == [0, 3, 4, 5, 6] and c.last_block == blk
    # Overwrite the most recent block (its k/v re-computed from the denoised latents).
    k2, v2 = torch.randn(B, 3 * T, H, D), torch.randn(B, 3 * T, H, D)
    c.write(0, c.last_block, k2, v2)
    k, v = gather_cache(c.layer(0), torch.float32)
    assert torch.equal(k[:, -3 * T:], k2) and torch.equal(v[:, -3 * T:], v2)
    assert torch.equal(k[:, T:2 * T], stream[1][0][0][:, 2 * T:])  # frame 3 (from block 1) unchanged


def test_memory_is_constant_once_the_window_is_full():
    c = _cache(kv_dtype="int8", num_layers=3)
    ptrs = [(x.data_ptr(), x.numel()) for x in c.storage()]
    nbytes = c.nbytes()
    for n, (ks, vs) in enumerate(_stream([1] + [3] * 40, layers=3)):
        c.append(ks, vs)
        assert [(x.data_ptr(), x.numel()) for x in c.storage()] == ptrs  # preallocated: never grows or moves
        assert c.nbytes() == nbytes
        assert c.num_cached_frames == min(1 + 3 * n, 5)  # bounded by sink + window
    # exact accounting: codes 1 B each for k and v, float32 scales per (frame, channel) and per token
    slots = 1 + 4 + 3
    assert nbytes == 3 * B * H * (2 * slots * T * D + 4 * slots * D + 4 * slots * T)


@pytest.mark.parametrize("fmt,limit", [("int8", 0.55), ("fp8", 0.55)])
def test_quantized_bytes_vs_bf16_at_wan_geometry(fmt, limit):
    # Wan2.1 1.3B: 1560 tokens per latent frame, head dim 128 (heads and layers cancel in the ratio).
    # int8 per (k, v) element pair: 2 B of codes + fp32 scales 4/128 B (values) + 4/1560 B (keys), vs 4 B
    # for bf16 -> 0.5 + 1/128 + 1/1560 = 0.508x.
    geo = dict(batch=1, heads=1, head_dim=128, tokens_per_frame=1560, window_frames=9, sink_frames=3,
               max_block_frames=3, device="meta")
    bf16 = KVCache(2, kv_dtype="bfloat16", **geo).nbytes()
    ratio = KVCache(2, kv_dtype=fmt, **geo).nbytes() / bf16
    assert ratio <= limit, ratio
    assert abs(ratio - (0.5 + 1 / 128 + 1 / 1560)) < 1e-9


FORMATS = [("bfloat16", {}), ("float32", {}), ("int8", {}), ("fp8", {}), ("int8", {"key_smoothing": "first_block"}),
           ("fp8", {"key_smoothing": "first_block"}), ("int4", {"group_size": 2}), ("int4", {"group_size": 64})]


@pytest.mark.parametrize("fmt,kw", FORMATS)
def test_bytes_equal_the_formula_per_format(fmt, kw):
    # N layers x B x slots frames x T tokens x H heads: codes of k and v, plus float32 scales, per format.
    n, slots, g = 3, 1 + 4 + 3, kw.get("group_size")
    c = _cache(num_layers=n, kv_dtype=fmt, **kw)
    tok = n * B * slots * T * H  # stored (token, head) pairs per k or v
    if fmt in ("bfloat16", "float32"):
        want = 2 * tok * D * (2 if fmt == "bfloat16" else 4)
    elif fmt == "int4":  # 2 codes per byte; keys: a scale per (frame, token group, channel); values per (token, group)
        want = 2 * tok * D // 2 + n * B * slots * -(-T // g) * H * D * 4 + tok * (D // min(g, D)) * 4
    elif kw:  # smoothed keys: a scale per token for k and for v, plus the factors c per (layer, batch, head, channel)
        want = 2 * tok * D + 2 * tok * 4 + n * B * H * D * 4
    else:
        want = 2 * tok * D + n * B * slots * H * D * 4 + tok * 4
    assert c.nbytes() == want
    for ks, vs in _stream([1] + [3] * 5, layers=n):
        c.append(ks, vs)
    assert c.nbytes() == want


@pytest.mark.parametrize("fmt,kw", [("int4", {"group_size": 2}), ("int8", {"key_smoothing": "first_block"})])
def test_rolling_cache_of_new_formats_holds_the_codes_of_its_frames(fmt, kw):
    # int4 groups stay inside a frame (keys) or a token (values), so after wrap-around the visible frames decode
    # to exactly quantize->dequantize of those frames alone (reference: rcm_kernels.quant on the frames). With
    # smoothing, every frame is divided by the first block's factors, then quantized per token.
    stream = _stream(PATTERN, layers=1)
    c = _cache(num_layers=1, kv_dtype=fmt, **kw)
    for ks, vs in stream:
        c.append(ks, vs)
    kept = c.cached_frames()
    kf, vf = _frames(stream, 0, 0), _frames(stream, 0, 1)
    k = torch.stack([kf[a] for a in kept], 1)  # [B, F, T, H, D]
    v = torch.cat([vf[a] for a in kept], 1)
    if fmt == "int4":
        want_k = dequantize_int4_keys(*quantize_int4_keys(k, 2), 2)
        want_v = dequantize_int4_values(*quantize_int4_values(v, 2))
    else:
        sm = smoothing_factors(torch.stack([kf[0]], 1))  # the first block is frame 0 (PATTERN starts with 1)
        q = quantize_keys_smoothed(k, sm, fmt)
        want_k = q.data.float() * q.scale[..., None] * sm[:, None, None]
        want_v = dequantize_values(*quantize_values(v, fmt))
    got_k, got_v = gather_cache(c.layer(0), torch.float32)
    torch.testing.assert_close(got_k, want_k.flatten(1, 2), rtol=1e-6, atol=0)
    torch.testing.assert_close(got_v, want_v, rtol=1e-6, atol=0)


def test_reset_forgets_frames_but_keeps_storage():
    c = _cache()
    ptrs = [x.data_ptr() for x in c.storage()]
    for ks, vs in _stream([1, 3]):
        c.append(ks, vs)
    c.reset()
    assert c.num_cached_frames == 0 and c.frames_written == 0 and c.last_block is None
    assert [x.data_ptr() for x in c.storage()] == ptrs
    assert c.begin_block(1).positions == (0,)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="max_block_frames"):
        KVCache(1, batch=1, heads=1, head_dim=8, tokens_per_frame=2, window_frames=4)
    with pytest.raises(ValueError, match="keys_pre_rope"):
        _cache(position_policy="reindexed")
    with pytest.raises(ValueError, match="kv_dtype"):
        _cache(kv_dtype="int2")
    with pytest.raises(ValueError, match="does not divide head_dim"):
        _cache(kv_dtype="int4", group_size=6)
    with pytest.raises(ValueError, match="key_smoothing applies to int8/fp8"):
        _cache(kv_dtype="int4", key_smoothing="first_block")
    with pytest.raises(ValueError, match="trained_frames"):
        _cache(extrapolation="infinity_rope", keys_pre_rope=True)
    with pytest.raises(ValueError, match="keys_pre_rope=True"):
        _cache(extrapolation="rolling_sink")
    with pytest.raises(ValueError, match="sink_bank_frames"):
        _cache(extrapolation="rolling_sink", keys_pre_rope=True, sink_bank_frames=0)
    c = _cache()
    with pytest.raises(ValueError, match="max_block_frames"):
        c.begin_block(4)
    blk = c.begin_block(1)
    with pytest.raises(RuntimeError, match="pending"):
        c.begin_block(1)
    with pytest.raises(ValueError, match="expected k and v of shape"):
        c.write(0, blk, torch.randn(B, 2 * T, H, D), torch.randn(B, 2 * T, H, D))
    c.write(0, blk, torch.randn(B, T, H, D), torch.randn(B, T, H, D))
    with pytest.raises(RuntimeError, match=r"not written for layers \[1\]"):
        c.commit(blk)
    full = _cache(rolling=False, max_block_frames=None)
    full.append(*_stream([3])[0])
    with pytest.raises(RuntimeError, match="KVCache full"):
        full.begin_block(3)


def test_cross_attention_cache_computes_once_per_prompt():
    calls = []
    cc = CrossAttentionCache()
    kv = (torch.ones(1), torch.zeros(1))
    for _ in range(3):
        assert cc.get(4, lambda: calls.append(1) or kv) is kv
    cc.reset()
    cc.get(4, lambda: calls.append(1) or kv)
    assert len(calls) == 2
