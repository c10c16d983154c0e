"""Length-extrapolation policies of the KV cache (``KVCache(extrapolation=...)``): constant memory over 10x the
trained length, the position invariant (no query-key RoPE offset beyond the trained maximum), the published
bookkeeping rules written out by hand, and, through the causal WanDiT, equivalences that RoPE's relativity
implies (independent reference: the existing ``sink_window`` + ``reindexed`` policy).

Tiny sizes: a model "trained" on L = 6 latent frames, blocks of 2 frames, runs of 60 frames (30 blocks).
"""

import pytest
import torch

from rcm_kernels.attention.cache_attention import gather_cache
from rcm_kernels.blockmask import BlockLayout
from rcm_kernels.kv_cache import KVCache
from rcm_nets.wan import WanDiT
from rcm_nets.wan.causal import make_kv_cache
from rcm_pipelines.streaming import wan_timestep

L_TRAIN, N_BLK, RUN = 6, 2, 60  # trained frames, frames per block, frames generated (10x)
B, C, H, W = 1, 16, 4, 4  # latent frame: 2x2 = 4 tokens after the (1, 2, 2) patch
HW, HEADS, HEAD_DIM = 4, 2, 16

# Each policy at settings whose attention span fits the trained length: sink + window + block <= L_TRAIN,
# except infinity_rope, which is given a longer span (1 + 4 + 2 = 7 frames) so that its clamp at 0 is exercised.
POLICIES = {
    "sink_window/reindexed": dict(sink_frames=2, window_frames=2, position_policy="reindexed"),
    "infinity_rope": dict(sink_frames=1, window_frames=4, extrapolation="infinity_rope", trained_frames=L_TRAIN),
    "rolling_sink": dict(sink_frames=2, window_frames=2, extrapolation="rolling_sink", sink_bank_frames=4),
}


def _cache(num_layers=1, **kw) -> KVCache:
    return KVCache(num_layers, batch=B, heads=HEADS, head_dim=HEAD_DIM, tokens_per_frame=HW,
                   max_block_frames=N_BLK, keys_pre_rope=True, kv_dtype="float32", **kw)


def _max_offset(cache: KVCache, block) -> int:
    """Largest RoPE frame offset (query position - key position) that attention of ``block`` sees."""
    keys = cache.frame_positions().tolist() + list(block.positions)
    return max(block.positions) - min(keys)


@pytest.mark.parametrize("name", list(POLICIES))
def test_constant_memory_and_offsets_within_trained_range_over_10x_length(name):
    c = _cache(**POLICIES[name])
    storage = [(x.data_ptr(), x.numel()) for x in c.storage()]
    nbytes = c.nbytes()
    offsets, visible = [], []
    for _ in range(RUN // N_BLK):
        blk = c.begin_block(N_BLK)
        offsets.append(_max_offset(c, blk))
        if name == "infinity_rope":  # every position inside the trained horizon [0, L)
            assert min(c.frame_positions().tolist(), default=0) >= 0 and max(blk.positions) == L_TRAIN - 1
        c.write(0, blk, torch.randn(B, N_BLK * HW, HEADS, HEAD_DIM), torch.randn(B, N_BLK * HW, HEADS, HEAD_DIM))
        c.commit(blk)
        visible.append(c.num_cached_frames)
        assert [(x.data_ptr(), x.numel()) for x in c.storage()] == storage and c.nbytes() == nbytes
    assert c.frames_written == RUN
    assert max(offsets) <= L_TRAIN - 1, offsets
    assert max(offsets) == L_TRAIN - 1  # the span is used up to the trained maximum
    assert max(visible) <= L_TRAIN  # bounded attention span


@pytest.mark.parametrize("name", list(POLICIES))
def test_visible_frames_hold_the_data_written_for_them(name):
    # Slot bookkeeping under each policy (bank slots never overwritten by the ring, ring wrap-around, a first
    # block of 1 frame so later blocks straddle the bank / sink boundary): what attention reads for the
    # visible frames is exactly what was written for those frames (float32 storage: bit-equal), and writing
    # the pending block leaves it unchanged.
    c = _cache(**POLICIES[name])
    frames_k, frames_v = [], []
    for i in range(25):
        n = 1 if i == 0 else N_BLK
        k, v = torch.randn(B, n * HW, HEADS, HEAD_DIM), torch.randn(B, n * HW, HEADS, HEAD_DIM)
        before = gather_cache(c.layer(0), torch.float32)
        blk = c.begin_block(n)
        c.write(0, blk, k, v)  # the pending block's slots must not hold any visible frame
        for x, y in zip(before, gather_cache(c.layer(0), torch.float32)):
            assert torch.equal(x, y)
        c.commit(blk)
        frames_k += list(k.split(HW, 1))
        frames_v += list(v.split(HW, 1))
        got_k, got_v = gather_cache(c.layer(0), torch.float32)
        kept = c.cached_frames()
        assert len(set(kept)) == len(kept)
        assert torch.equal(got_k, torch.cat([frames_k[a] for a in kept], 1))
        assert torch.equal(got_v, torch.cat([frames_v[a] for a in kept], 1))


def test_absolute_positions_violate_the_invariant():
    # The check above can fail: sink + window with absolute positions lets offsets grow with the run.
    c = _cache(sink_frames=2, window_frames=2)
    for _ in range(RUN // N_BLK):
        blk = c.begin_block(N_BLK)
        off = _max_offset(c, blk)
        c.write(0, blk, torch.randn(B, N_BLK * HW, HEADS, HEAD_DIM), torch.randn(B, N_BLK * HW, HEADS, HEAD_DIM))
        c.commit(blk)
    assert off == RUN - 1 > L_TRAIN - 1


def test_rolling_sink_bank_cycles_forward_then_backward():
    # Rolling Sink (arXiv 2602.07775), bank K = 4 frames, sink S = 2, window 2, one frame per block: the sink
    # slides through the bank by the frames committed since it filled (o), forward while o // K is even,
    # backward (frames in reverse order) while it is odd. Expected lists written out by hand.
    c_one = KVCache(1, batch=B, heads=HEADS, head_dim=HEAD_DIM, tokens_per_frame=HW, max_block_frames=1,
                    keys_pre_rope=True, kv_dtype="float32", sink_frames=2, window_frames=2,
                    extrapolation="rolling_sink", sink_bank_frames=4)
    want = {1: [0], 4: [0, 1, 2, 3], 5: [1, 2, 3, 4], 6: [2, 3, 4, 5], 7: [3, 0, 5, 6], 8: [3, 2, 6, 7],
            9: [2, 1, 7, 8], 11: [0, 3, 9, 10], 12: [0, 1, 10, 11]}
    for w in range(1, 13):
        c_one.append([torch.randn(B, HW, HEADS, HEAD_DIM)], [torch.randn(B, HW, HEADS, HEAD_DIM)])
        if w in want:
            assert c_one.cached_frames() == want[w], w
            assert c_one.frame_positions().tolist() == list(range(len(want[w])))  # re-indexed 0..F-1


def test_infinity_rope_places_the_block_at_the_horizon_and_clamps_older_frames():
    # Block-Relativistic RoPE (arXiv 2511.20649): the block being computed at [L - n, L), the visible frames
    # right before it, clamped at 0. L = 6, sink 1 + window 4, blocks of 2 -> after 10 frames the visible
    # frames are [0, 6, 7, 8, 9] at positions [0, 0, 1, 2, 3] (the sink and frame 6 share 0), the block at (4, 5).
    c = _cache(**POLICIES["infinity_rope"])
    for _ in range(5):
        c.append([torch.randn(B, N_BLK * HW, HEADS, HEAD_DIM)], [torch.randn(B, N_BLK * HW, HEADS, HEAD_DIM)])
    blk = c.begin_block(2)
    assert c.cached_frames() == [0, 6, 7, 8, 9] and blk.positions == (4, 5)
    assert c.frame_positions().tolist() == [0, 0, 1, 2, 3]
    c.write(0, blk, torch.randn(B, 2 * HW, HEADS, HEAD_DIM), torch.randn(B, 2 * HW, HEADS, HEAD_DIM))
    c.commit(blk)
    blk = c.begin_block(1)  # a 1-frame block: the horizon end stays at L, the cached frames shift by one less
    assert blk.positions == (5,) and c.frame_positions().tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------- causal DiT

@pytest.fixture(scope="module")
def net():
    torch.manual_seed(3)
    net = WanDiT.from_config("tiny", num_layers=2, dtype=torch.float32)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return net.eval()


def _run(net, cache, blocks, seed=0):
    """Write-and-commit ``blocks`` 2-frame blocks of fixed random latents; returns the velocities."""
    g = torch.Generator().manual_seed(seed)
    prompt = net.encode_prompt(torch.randn(B, 5, 32, generator=g))
    t = wan_timestep(0.5, B, "cpu")
    outs = []
    with torch.no_grad():
        for _ in range(blocks):
            blk = cache.begin_block(N_BLK)
            outs.append(net.forward_block(torch.randn(B, C, N_BLK, H, W, generator=g), t, prompt, cache=cache,
                                          block=blk, write=True))
            cache.commit(blk)
    return outs


def _dit_cache(net, **kw):
    return make_kv_cache(net, batch=B, height=H, width=W, layout=BlockLayout(N_BLK), kv_dtype="float32", **kw)


def test_infinity_rope_equals_reindexed_when_nothing_is_clamped(net):
    # RoPE scores depend on position differences only. With sink 2 + window 2 + block 2 <= L = 8 nothing is
    # clamped, and infinity_rope's positions are reindexed's shifted by a constant per block: the same
    # attention. float32: the rotations at other absolute angles round differently, ~1e-6; tolerance 2e-5.
    ref = _run(net, _dit_cache(net, sink_frames=2, window_frames=2, position_policy="reindexed"), 4)
    got = _run(net, _dit_cache(net, sink_frames=2, window_frames=2, extrapolation="infinity_rope",
                               trained_frames=8), 4)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    # ... and the shift is not the identity: infinity_rope's block positions are (6, 7) from the first block.
    assert _dit_cache(net, sink_frames=2, window_frames=2, extrapolation="infinity_rope",
                      trained_frames=8).begin_block(2).positions == (6, 7)


def test_rolling_sink_with_a_one_sink_bank_equals_a_fixed_sink(net):
    # K = S = 1: the bank is the sink frame itself, so the sink never changes and rolling_sink reduces to
    # sink_window with re-indexed positions: exactly the same codes, frames and positions, bit-identical output.
    ref = _run(net, _dit_cache(net, sink_frames=1, window_frames=3, position_policy="reindexed"), 4)
    got = _run(net, _dit_cache(net, sink_frames=1, window_frames=3, extrapolation="rolling_sink",
                               sink_bank_frames=1), 4)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow  # 30 DiT block passes: ~10 s on a shared CPU
@pytest.mark.parametrize("name", ["infinity_rope", "rolling_sink"])
def test_dit_runs_10x_trained_length_in_constant_memory(net, name):
    cache = _dit_cache(net, **POLICIES[name])
    storage = [(x.data_ptr(), x.numel()) for x in cache.storage()]
    outs = _run(net, cache, RUN // N_BLK)
    assert cache.frames_written == RUN
    assert [(x.data_ptr(), x.numel()) for x in cache.storage()] == storage
    assert all(torch.isfinite(o).all() for o in outs)
