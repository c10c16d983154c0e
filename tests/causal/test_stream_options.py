"""Streaming options of ``stream_generate`` / ``StreamSpec``: per-block schedules, refresh modes, context noise,
CFG, the Euler solver, batches of prompts, causal I2V, and config validation.

Independent reference: every generated step is replayed by the ordinary full-sequence network (plain attention
with the block-causal mask of ``rcm_kernels.blockmask``) over ``[what the cache should hold ; the step's
input]`` with per-frame times: the context frames at the time they were written (0 for a clean refresh,
``context_noise``, or the last step's time for ``refresh=last_step``), the block at its step time. The cached
path and this pass share no attention code, so a cache written by the wrong pass, a missing uncond cache
write or a wrong schedule shows up as an O(1) difference. Float32, fp32 cache storage: they differ by
summation order only, so 2e-5 is the tolerance (as tests/causal/test_causal_dit.py).
"""

import pytest
import torch
from pydantic import ValidationError

from rcm_kernels.blockmask import BlockLayout
from rcm_losses.sampling import flow_sigmas
from rcm_nets.wan import WanDiT
from rcm_nets.wan.causal import make_kv_cache
from rcm_pipelines.stream_spec import StreamSpec
from rcm_pipelines.streaming import stream_generate, wan_timestep

ATOL = RTOL = 2e-5
C, H, W = 16, 4, 4
HW = (H // 2) * (W // 2)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: more threads only add contention


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(3)
    net = WanDiT.from_config("tiny", num_layers=2)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.15 * torch.randn_like(p))
    return net.eval()


def _cache(net, b, frames, layout):
    return make_kv_cache(net, batch=b, height=H, width=W, layout=layout, window_frames=frames, rolling=False,
                         kv_dtype="float32")


def _gen(net, ctx, layout, blocks=3, *, seeds=(7,), neg=None, **kw):
    b, frames = ctx.shape[0], layout.block_start(blocks)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    cfg = {} if neg is None else dict(negative=net.encode_prompt(neg), uncond_cache=_cache(net, b, frames, layout))
    kw.setdefault("times", (0.9, 0.5))
    return list(stream_generate(net, net.encode_prompt(ctx), _cache(net, b, frames, layout), num_frames=frames,
                                layout=layout, latent_shape=(b, C, H, W), generator=gens, record=True, **cfg, **kw))


def _frame_times(t_rf, b, n):
    return wan_timestep(t_rf, b, "cpu")[:, None].expand(b, n)


def _written(blk):
    """What the block left in the cache: (latents, RF time)."""
    if blk.context is not None:
        return blk.context
    x_in, t, _ = blk.steps[-1]  # refresh=last_step: the last denoising step wrote
    return x_in, t


def _replay(net, blocks, ctx, layout, *, parts=None):
    """Each step's velocity (or its CFG part ``parts`` = 0 cond / 1 uncond under context ``ctx``) == the
    block-causal full pass over [written earlier blocks ; step input]."""
    b = ctx.shape[0]
    for i, blk in enumerate(blocks):
        if blk.prefill:
            continue
        hist = [_written(p) for p in blocks[:i]]
        for k, (x_in, t_k, v) in enumerate(blk.steps):
            x = torch.cat([*(h[0] for h in hist), x_in], 2)
            t = torch.cat([*(_frame_times(h[1], b, h[0].shape[2]) for h in hist),
                           _frame_times(t_k, b, x_in.shape[2])], 1)
            with torch.no_grad():
                out = net(x, t, ctx, block_mask=layout.mask(i + 1, HW))[:, :, blk.first_frame:]
            want = v if parts is None else blk.guidance_parts[k][parts]
            torch.testing.assert_close(out.float(), want, atol=ATOL, rtol=RTOL)


@pytest.mark.slow
def test_per_block_schedules(net):
    """[[0.9, 0.5], [0.7]]: block 0 takes 2 steps at 0.9, 0.5, later blocks one step at 0.7 (the last list
    repeats); every step matches the full-sequence replay; x0 = x − t·v of the last step."""
    layout = BlockLayout(2)
    ctx = torch.randn(1, 5, 32)
    blocks = _gen(net, ctx, layout, times=[[0.9, 0.5], [0.7]])
    assert [[s[1] for s in b.steps] for b in blocks] == [[0.9, 0.5], [0.7], [0.7]]
    _replay(net, blocks, ctx, layout)
    for b in blocks:
        x_in, t, v = b.steps[-1]
        torch.testing.assert_close(b.x0, x_in - t * v, atol=1e-6, rtol=0)
    flat = _gen(net, ctx, layout, times=(0.9, 0.5))
    assert torch.equal(flat[0].x0, blocks[0].x0)  # same block-0 schedule and noise
    assert (flat[1].x0 - blocks[1].x0).abs().max() > 1e-2  # the second schedule is really used


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clean", "noisy_context", "last_step", "last_step_after_clean_block0"])
def test_refresh_modes_write_the_right_context(net, mode):
    """What each mode writes (clean x0 at t=0; x0 noised to context_noise=0.3; the last step's input at its
    time; the last step except block 0) is what later blocks read: replay == cached steps."""
    kw = dict(clean=dict(), noisy_context=dict(context_noise=0.3), last_step=dict(refresh="last_step"),
              last_step_after_clean_block0=dict(refresh="last_step", clean_refresh_blocks=1))[mode]
    layout = BlockLayout(2, 1)
    ctx = torch.randn(1, 5, 32)
    blocks = _gen(net, ctx, layout, **kw)
    _replay(net, blocks, ctx, layout)
    ctx_written = [b.context is not None for b in blocks]
    assert ctx_written == {"last_step": [False] * 3, "last_step_after_clean_block0": [True, False, False]}.get(
        mode, [True] * 3)
    if mode == "noisy_context":
        assert blocks[0].context[1] == 0.3 and (blocks[0].context[0] - blocks[0].x0).abs().max() > 1e-2


def test_refresh_modes_agree_on_block0_and_differ_after(net):
    """The refresh only changes what later blocks read: block 0 is identical under every mode, block 1 differs."""
    layout = BlockLayout(2)
    ctx = torch.randn(1, 5, 32)
    runs = [_gen(net, ctx, layout, blocks=2, **kw) for kw in
            (dict(), dict(context_noise=0.3), dict(refresh="last_step"))]
    for other in runs[1:]:
        assert torch.equal(other[0].x0, runs[0][0].x0)
        assert (other[1].x0 - runs[0][1].x0).abs().max() > 1e-3


def test_cfg_guidance_one_equals_no_cfg(net):
    """guidance=1 with a negative prompt and its own cache == no CFG (v_u + 1·(v_c − v_u) = v_c up to
    float32 rounding): the uncond pass and cache leave the conditional stream untouched. 1e-5."""
    layout = BlockLayout(2, 1)
    ctx, neg = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    plain = _gen(net, ctx, layout)
    guided = _gen(net, ctx, layout, neg=neg, guidance=1.0)
    for a, b in zip(plain, guided):
        torch.testing.assert_close(b.x0, a.x0, atol=1e-5, rtol=1e-5)
    assert (guided[1].guidance_parts[0][0] - guided[1].guidance_parts[0][1]).abs().max() > 1e-2  # neg matters


@pytest.mark.slow
@pytest.mark.parametrize("refresh", ["clean", "last_step"])
def test_cfg_both_caches_replayed(net, refresh):
    """guidance=3: v = v_u + 3(v_c − v_u) at every step; v_c replays with the prompt and v_u with the negative
    prompt over the same written context (both caches are written by the writing pass)."""
    layout = BlockLayout(2)
    ctx, neg = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    blocks = _gen(net, ctx, layout, neg=neg, guidance=3.0, refresh=refresh)
    for b in blocks:
        for (_, _, v), (vc, vu) in zip(b.steps, b.guidance_parts):
            torch.testing.assert_close(v, vu + 3.0 * (vc - vu), atol=1e-6, rtol=0)
    _replay(net, blocks, ctx, layout, parts=0)
    _replay(net, blocks, neg, layout, parts=1)


@pytest.mark.slow
def test_batch_of_two_prompts_equals_two_batch1_runs(net):
    """Prompts [a, b] with generators (seed 7, seed 8) == the batch-1 runs of a with 7 and b with 8 (float32:
    batched matmuls may sum in another order, 1e-5); CFG on, so both caches carry the batch."""
    layout = BlockLayout(2, 1)
    ctx, neg = torch.randn(2, 5, 32), torch.randn(1, 5, 32)
    both = _gen(net, ctx, layout, seeds=(7, 8), neg=neg.expand(2, -1, -1), guidance=2.0)
    one = [_gen(net, ctx[i : i + 1], layout, seeds=(s,), neg=neg, guidance=2.0) for i, s in enumerate((7, 8))]
    for k, blk in enumerate(both):
        for i in range(2):
            torch.testing.assert_close(blk.x0[i : i + 1], one[i][k].x0, atol=1e-5, rtol=1e-5)
    assert (both[1].x0[0] - both[1].x0[1]).abs().max() > 1e-2


@pytest.mark.slow
def test_i2v_first_block_conditions_the_stream(net):
    """Causal I2V: block 0 is the given latent (prefill, no steps), written at t=0 to both caches (CFG), and
    later steps replay over [image latent at t=0 ; ...]; another image changes the continuation."""
    layout = BlockLayout(2, 1)
    ctx, neg, img = torch.randn(1, 5, 32), torch.randn(1, 5, 32), torch.randn(1, C, 1, H, W)
    blocks = _gen(net, ctx, layout, neg=neg, guidance=2.0, initial_latent=img)
    assert blocks[0].prefill and blocks[0].steps is None and torch.equal(blocks[0].x0, img)
    _replay(net, blocks, ctx, layout, parts=0)
    _replay(net, blocks, neg, layout, parts=1)
    other = _gen(net, ctx, layout, neg=neg, guidance=2.0, initial_latent=img + 1)
    assert (other[1].x0 - blocks[1].x0).abs().max() > 1e-2


def test_euler_solver_is_the_ode_step(net):
    """solver=euler: x_{k+1} = x_k − (t_k − t_{k+1})·v_k (no fresh noise), x0 = x_N − t_N·v_N; the replay
    matches (the cache protocol is unchanged)."""
    layout = BlockLayout(2)
    ctx = torch.randn(1, 5, 32)
    blocks = _gen(net, ctx, layout, times=(0.9, 0.6, 0.3), solver="euler")
    for b in blocks:
        for (x, t, v), (x_next, t_next, _) in zip(b.steps, b.steps[1:]):
            torch.testing.assert_close(x_next, x - (t - t_next) * v, atol=1e-6, rtol=0)
    _replay(net, blocks, ctx, layout)


# ------------------------------------------------------------------------------------------ StreamSpec
def test_streamspec_euler_schedule_closed_form():
    """euler_steps=4, shift=3: s_i = 3u/(1 + 2u) on u = linspace(u_max, 0, 5)[:-1], u_max = unshift(5000/5001)."""
    spec = StreamSpec(solver="euler", euler_steps=4, shift=3.0)
    s_max = 5000 / 5001
    u_max = s_max / (3 - 2 * s_max)
    want = [3 * u / (1 + 2 * u) for u in (u_max * (1 - i / 4) for i in range(4))]
    assert spec.block_times() == pytest.approx(want, rel=1e-12)
    assert spec.block_times() == flow_sigmas(4, shift=3.0).tolist()[:-1]
    assert StreamSpec(guidance=3.0).forwards_per_block(0) == 10  # (4 steps + refresh) x 2


@pytest.mark.parametrize("bad, field", [
    (dict(times=[0.5, 0.9]), "times"), (dict(times=[[0.9], []]), "times"), (dict(times=[1.2]), "times"),
    (dict(context_noise=1.0), "context_noise"), (dict(guidance=0.5), "guidance"),
    (dict(refresh="sometimes"), "refresh"), (dict(euler_steps=10), "euler_steps"),
    (dict(clean_refresh_blocks=1), "clean_refresh_blocks"),
    (dict(refresh="last_step", context_noise=0.2), "context_noise"),
    (dict(frames_per_block=0), "frames_per_block"), (dict(kv_dtype="int2"), "kv_dtype"),
    (dict(key_smoothing="first_block"), "key_smoothing"), (dict(sink_bank_frames=4), "sink_bank_frames"),
    (dict(step=[0.5]), "step"),
])
def test_streamspec_rejects_bad_values(bad, field):
    with pytest.raises(ValidationError, match=field):
        StreamSpec(**bad)


def test_streamspec_per_block_times_and_i2v_layout():
    spec = StreamSpec(times=[[0.9, 0.5], [0.7]], frames_per_block=2, first_block_frames=1)
    assert spec.forwards_per_block(0) == 3 and spec.forwards_per_block(5) == 2
    assert spec.layout(i2v=True).first == 1
    with pytest.raises(ValueError, match="first_block_frames=1"):
        StreamSpec(frames_per_block=2).layout(i2v=True)
