"""Causal WanDiT: block-by-block generation with a KV cache against masked full-sequence passes.

Independent reference: the full-sequence pass runs the ordinary network (``WanBlock.forward`` and plain
attention with a dense/Flex mask from ``rcm_kernels.blockmask``), the cached pass runs the block-by-block path
(``cache_attention`` over the cache plus the block's own k/v). They share no attention code, so a wrong
mask, a wrong RoPE position, a stale or leaking cache entry or a wrong per-frame time shows up as an O(1)
difference. Weights are random (the zero-initialized head perturbed), float32, fp32 cache storage: the
two paths differ only by summation order, ~1e-6 on O(1) outputs, so 2e-5 is the float32 tolerance.
"""

import pytest
import torch

from rcm_kernels.blockmask import BlockLayout, teacher_forcing_positions
from rcm_nets.wan import WanDiT
from rcm_nets.wan.causal import make_kv_cache
from rcm_pipelines.streaming import stream_generate, wan_timestep

ATOL = RTOL = 2e-5
B, C, H, W = 1, 16, 4, 4  # latent frame: 2x2 = 4 tokens after the (1, 2, 2) patch
HW = (H // 2) * (W // 2)


def _net(num_layers=2, dtype=torch.float32) -> WanDiT:
    net = WanDiT.from_config("tiny", num_layers=num_layers, dtype=dtype)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(3)
    return _net()


def _ctx():
    return torch.randn(B, 5, 32)


def _generate(net, layout, num_frames, *, times=(0.9, 0.5), window=None, sink=0, rolling=False,
              initial_latent=None, kv_dtype="float32", policy="absolute", ctx=None):
    dev = next(net.parameters()).device
    ctx = _ctx().to(dev) if ctx is None else ctx
    cache = make_kv_cache(net, batch=B, height=H, width=W, layout=layout, window_frames=window or num_frames,
                          sink_frames=sink, rolling=rolling, kv_dtype=kv_dtype, position_policy=policy, device=dev)
    gen = torch.Generator(device=dev).manual_seed(7)
    blocks = list(stream_generate(net, net.encode_prompt(ctx), cache, num_frames=num_frames, layout=layout,
                                  latent_shape=(B, C, H, W), generator=gen, times=times,
                                  initial_latent=initial_latent, record=True))
    return blocks, ctx, cache


def _per_frame_time(t_rf: float, frames: int, device="cpu") -> torch.Tensor:
    return wan_timestep(t_rf, B, device)[:, None].expand(B, frames)


def _teacher_forcing_check(net, blocks, ctx, layout, atol=ATOL, rtol=RTOL):
    """One teacher-forcing pass per step index reproduces every block's step velocity."""
    dev = ctx.device
    clean = torch.cat([b.context[0] for b in blocks], dim=2)
    mask = layout.mask(len(blocks), HW, teacher_forcing=True)
    n_steps = len(blocks[-1].steps)
    for k in range(n_steps):
        noisy, times = [], []
        for b in blocks:
            n = b.x0.shape[2]
            if b.prefill:  # the given I2V block has no denoising steps: any noisy input, output ignored
                noisy.append(b.x0), times.append(_per_frame_time(0.0, n, dev))
            else:
                noisy.append(b.steps[k][0]), times.append(_per_frame_time(b.steps[k][1], n, dev))
        t_noisy = torch.cat(times, 1)
        packed_t = torch.cat([torch.zeros_like(t_noisy), t_noisy], dim=1)  # clean context at time 0
        pos = teacher_forcing_positions(clean.shape[2], dev)
        with torch.no_grad():
            out = net(torch.cat([clean, torch.cat(noisy, 2)], 2), packed_t, ctx, block_mask=mask, frame_pos=pos)
        out = out[:, :, clean.shape[2]:]
        for b in blocks:
            if b.prefill:
                continue
            s = slice(b.first_frame, b.first_frame + b.x0.shape[2])
            torch.testing.assert_close(out[:, :, s].float(), b.steps[k][2], atol=atol, rtol=rtol)


@pytest.mark.parametrize("first", [None, 1])
def test_stream_equals_teacher_forcing_pass_t2v(net, first):
    """c2-2 and c1-2 layouts, 3 blocks, 2 steps: cached steps == one masked [clean ; noisy] pass per step."""
    layout = BlockLayout(2, first)
    frames = layout.block_start(3)
    blocks, ctx, _ = _generate(net, layout, frames)
    assert len(blocks) == 3 and all(len(b.steps) == 2 for b in blocks)
    _teacher_forcing_check(net, blocks, ctx, layout)
    # the generated frames really depend on the context (the check is not vacuous)
    assert (blocks[1].steps[0][2] - blocks[1].steps[1][2]).abs().max() > 1e-2


def test_stream_equals_block_causal_pass_per_block(net):
    """Each block's step == a block-causal pass over [clean earlier blocks, this noisy block] with
    per-frame times (0 for the context, t_k for the block), absolute RoPE positions."""
    layout = BlockLayout(2, 1)
    blocks, ctx, _ = _generate(net, layout, layout.block_start(3), times=(0.8,))
    for i, b in enumerate(blocks):
        x_in, t_rf, v = b.steps[0]
        x = torch.cat([*(p.x0 for p in blocks[:i]), x_in], 2)
        t = torch.cat([_per_frame_time(0.0, b.first_frame), _per_frame_time(t_rf, x_in.shape[2])], 1)
        with torch.no_grad():
            out = net(x, t, ctx, block_mask=layout.mask(i + 1, HW))
        torch.testing.assert_close(out[:, :, b.first_frame:], v, atol=ATOL, rtol=RTOL)


def test_stream_equals_teacher_forcing_pass_i2v(net):
    """Causal I2V: the first frame is given (written to the cache at t=0), later blocks are generated."""
    layout = BlockLayout(2, first_block_frames=1)
    image_latent = torch.randn(B, C, 1, H, W)
    blocks, ctx, _ = _generate(net, layout, layout.block_start(3), initial_latent=image_latent)
    assert blocks[0].prefill and torch.equal(blocks[0].x0, image_latent)
    _teacher_forcing_check(net, blocks, ctx, layout)
    # a different first frame changes the continuation
    other, _, _ = _generate(net, layout, layout.block_start(2), initial_latent=-image_latent, ctx=ctx,
                            times=(0.9, 0.5))
    assert (other[1].x0 - blocks[1].x0).abs().max() > 1e-2


def test_rolling_cache_equals_sliding_window_recompute(net):
    """Rolling cache (sink 1 block + window 2 blocks of 2 frames), 6 blocks: every step equals a full pass
    over the whole history with the sliding-window+sink mask, which recomputes each block's k/v from exactly
    the frames its cache kept."""
    layout, n = BlockLayout(2), 2
    blocks, ctx, cache = _generate(net, layout, 12, times=(0.6,), window=2 * n, sink=n, rolling=True)
    assert cache.cached_frames() == [0, 1, 8, 9, 10, 11]  # sink + the 4 most recent frames
    for i, b in enumerate(blocks):
        mask = layout.mask(i + 1, HW, window_blocks=3, sink_blocks=1)
        for x_in, t_rf, v in b.steps:
            x = torch.cat([*(p.x0 for p in blocks[:i]), x_in], 2)
            t = torch.cat([_per_frame_time(0.0, b.first_frame), _per_frame_time(t_rf, n)], 1)
            with torch.no_grad():
                out = net(x, t, ctx, block_mask=mask)
            torch.testing.assert_close(out[:, :, b.first_frame:], v, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("policy", ["absolute", "reindexed"])
def test_rolling_cache_equals_recompute_over_kept_frames(policy):
    """One-layer net (a frame's k/v depend on that frame only): with a rolling cache, block i equals a fresh
    pass over exactly the kept frames plus the block, at the RoPE positions of the policy (absolute frame
    indices, or 0..F-1 re-indexed within the window, keys then stored pre-RoPE)."""
    torch.manual_seed(5)
    net1 = _net(num_layers=1)
    layout, n = BlockLayout(2), 2
    blocks, ctx, _ = _generate(net1, layout, 10, times=(0.7,), window=n, sink=n, rolling=True, policy=policy)
    for b in blocks:
        kept = [f for f in range(b.first_frame) if f < n or f >= b.first_frame - n]  # sink + window
        x_in, t_rf, v = b.steps[0]
        video = torch.cat([p.x0 for p in blocks], 2)
        x = torch.cat([video[:, :, kept], x_in], 2)
        t = torch.cat([_per_frame_time(0.0, len(kept)), _per_frame_time(t_rf, n)], 1)
        own = list(range(b.first_frame, b.first_frame + n))
        pos = torch.tensor(kept + own if policy == "absolute" else list(range(len(kept) + n)))
        with torch.no_grad():
            out = net1(x, t, ctx, frame_pos=pos)  # bidirectional: the last block's rows see everything
        torch.testing.assert_close(out[:, :, len(kept):], v, atol=ATOL, rtol=RTOL)
    assert len(blocks) == 5


def test_reindexed_equals_absolute_without_eviction(net):
    """Without eviction the two RoPE policies give the same positions: the pre-RoPE cache path (rotation in
    the seam and in cache_attention) must equal the post-RoPE one."""
    layout = BlockLayout(2)
    a, ctx, _ = _generate(net, layout, 6, times=(0.8,), policy="absolute")
    r, _, _ = _generate(net, layout, 6, times=(0.8,), policy="reindexed", ctx=ctx)
    for x, y in zip(a, r):
        torch.testing.assert_close(x.x0, y.x0, atol=ATOL, rtol=RTOL)


def test_quantized_cache_close_to_fp32(net):
    """int8/fp8 storage perturbs attention over the cache only: the generated latents stay close to the fp32
    cache's (relative error bounds of docs/kv_cache.md: int8 ~1 %, fp8 ~5 % per attention; looser here
    because errors compound over blocks and layers)."""
    layout = BlockLayout(2)
    ref, ctx, _ = _generate(net, layout, 6, times=(0.8,))
    for kv, bound in (("bfloat16", 0.02), ("int8", 0.05), ("fp8", 0.2)):
        q, _, _ = _generate(net, layout, 6, times=(0.8,), kv_dtype=kv, ctx=ctx)
        x, y = torch.cat([b.x0 for b in q], 2), torch.cat([b.x0 for b in ref], 2)
        rel = float((x - y).norm() / y.norm())
        assert 0 < rel < bound, (kv, rel)


def test_prompt_kv_computed_once(net, monkeypatch):
    """With a PromptKV the blocks never project the text again, and the result equals the raw-context path."""
    ctx = _ctx()
    prompt = net.encode_prompt(ctx)
    calls = []
    for blk in net.blocks:
        orig = blk.cross_attn.context_kv
        monkeypatch.setattr(blk.cross_attn, "context_kv", lambda *a, _o=orig: (calls.append(1), _o(*a))[1])
    layout = BlockLayout(2)
    x = torch.randn(B, C, 2, H, W)
    t = wan_timestep(0.5, B, "cpu")
    outs = []
    for context in (prompt, ctx):
        cache = make_kv_cache(net, batch=B, height=H, width=W, layout=layout, window_frames=4, rolling=False,
                              kv_dtype="float32")
        with torch.no_grad():
            outs.append(net.forward_block(x, t, context, cache=cache, block=cache.begin_block(2)))
        assert len(calls) == (0 if context is prompt else len(net.blocks))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_cached_pass_has_grad_and_bad_calls_raise(net):
    """The self-forcing exit step: gradient reaches parameters and x through a cached pass; misuse raises."""
    layout = BlockLayout(2)
    cache = make_kv_cache(net, batch=B, height=H, width=W, layout=layout, window_frames=6, rolling=False,
                          kv_dtype="float32")
    ctx = _ctx()
    blk = cache.begin_block(2)
    with torch.no_grad():
        net.forward_block(torch.randn(B, C, 2, H, W), wan_timestep(0.0, B, "cpu"), ctx, cache=cache, block=blk,
                          write=True)
    cache.commit(blk)
    blk = cache.begin_block(2)
    x = torch.randn(B, C, 2, H, W, requires_grad=True)
    out = net.forward_block(x, wan_timestep(0.5, B, "cpu"), ctx, cache=cache, block=blk)
    out.square().sum().backward()
    assert x.grad.abs().max() > 0 and net.blocks[0].self_attn.q.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="pending block"):
        net.forward_block(x, wan_timestep(0.5, B, "cpu"), ctx, cache=cache, block=cache.last_block)
    with pytest.raises(ValueError, match="block 1 has 2 frames"):
        net.forward_block(torch.randn(B, C, 3, H, W), wan_timestep(0.5, B, "cpu"), ctx, cache=cache, block=blk)
    with pytest.raises(ValueError, match="cache geometry"):
        net.forward_block(torch.randn(B, C, 2, 8, 8), wan_timestep(0.5, B, "cpu"), ctx, cache=cache, block=blk)
    with pytest.raises(ValueError, match="frame_pos has shape"):
        net(x, wan_timestep(0.5, B, "cpu"), ctx, frame_pos=torch.arange(3))


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "int8", "fp8"])
def test_stream_equals_teacher_forcing_pass_cuda_bf16(kv_dtype):
    """On CUDA in bf16: the Triton cache-attention kernel (reading bf16 / int8 / fp8 codes) against the masked
    full pass (fused JVP-attention kernel with the teacher-forcing mask). bf16 activations and quantized
    storage: 5e-2 absolute on O(1) velocities (int8/fp8 attention errors ~1 % / 5 %, docs/kv_cache.md)."""
    torch.manual_seed(3)
    net = _net().to(device="cuda", dtype=torch.bfloat16)
    layout = BlockLayout(2, 1)
    blocks, ctx, _ = _generate(net, layout, layout.block_start(3), kv_dtype=kv_dtype)
    tol = {"bfloat16": 3e-2, "int8": 5e-2, "fp8": 1.5e-1}[kv_dtype]
    _teacher_forcing_check(net, blocks, ctx.to(torch.bfloat16), layout, atol=tol, rtol=tol)
