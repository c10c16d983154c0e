"""rcm_losses.causal: block times, teacher forcing vs block by block, self-forcing gradients, replay, ODE.

The networks are a tiny two-layer attention model (:class:`ToyCausalNet`, float64, written here) with the two
call forms of the causal DiT: a masked full-sequence pass (dense masks from ``rcm_kernels.blockmask``) and a
block pass that reads a k/v cache. Equalities between the two forms are float64 identities computed along
different paths (different summation orders), so they hold to ~1e-12; we allow 1e-10.
"""

import math

import pytest
import torch
from einops import rearrange
from torch import nn

from rcm_kernels.blockmask import teacher_forcing
from rcm_losses import TrigFlowAdapter, dmd_objective, scm_objective
from rcm_losses.causal import (
    FrameBlocks,
    causal_dcm_objective,
    cycled_exit_steps,
    flow_matching_objective,
    network_input,
    ode_regression_objective,
    replay_backward,
    replayed_video,
    sample_block_dcm_times,
    sample_block_times,
    sample_exit_steps,
    self_forcing_rollout,
    teacher_forcing_adapter,
    teacher_forcing_velocity,
    tf_dcm_objective,
    tf_scm_objective,
)
from rcm_losses.parameterization import add_noise, rf_to_trig
from rcm_losses.timesteps import LogNormal, UniformShift

F64 = torch.float64
B, C, H, W = 2, 2, 2, 2
HW = H * W
EXACT = dict(input_dtype=None, timestep_dtype=None)  # no bf16 casts: float64 identities
TOL = dict(atol=1e-10, rtol=1e-10)
# RF schedule [1, 15/16, 5/6, 5/8] (Causal-rCM / Self-Forcing) in TrigFlow time
SCHEDULE = [float(rf_to_trig(torch.tensor(s, dtype=F64))) for s in (1.0, 15 / 16, 5 / 6, 5 / 8)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (root conftest)


class ToyCausalNet(nn.Module):
    """RF velocity net over ``[B, C, T, H, W]``: one token per pixel, per-frame time modulation,
    sinusoidal frame positions, ``cond [B, dim]`` added to every token, two attention layers.

    ``forward(x, timestep, cond, positions=None, mask=None)``: full sequence with a dense ``[L, L]`` mask.
    ``block(x, timestep, cond, past, offset)``: a block at frame ``offset`` attending to the cached
    k/v ``past`` (per layer ``(k, v)`` of earlier blocks) and to itself; returns ``(v, new_kv)``.
    """

    def __init__(self, dim=8, layers=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        lin = lambda i, o: _linear(i, o, g)
        self.dim = dim
        self.inp, self.time, self.out = lin(C, dim), lin(4, 2 * dim), lin(dim, C)
        self.qkv = nn.ModuleList(lin(dim, 3 * dim) for _ in range(layers))
        self.o = nn.ModuleList(lin(dim, dim) for _ in range(layers))

    def _embed(self, x, timestep, positions, cond):
        t = x.shape[2]
        z = self.inp(rearrange(x.to(F64), "b c t h w -> b (t h w) c"))
        s = (timestep.to(F64)[:, None] if timestep.ndim == 1 else timestep.to(F64)).expand(
            x.shape[0], t
        ) / 1000
        scale, shift = self.time(torch.stack([torch.sin(3 * s), torch.cos(3 * s), s, s * s], -1)).chunk(2, -1)
        freqs = torch.arange(1, self.dim + 1, dtype=F64) / self.dim
        pos = torch.sin(positions.to(F64)[:, None] * freqs)  # [T, dim]
        rep = lambda a: a.repeat_interleave(HW, dim=-2)
        return z * (1 + rep(scale)) + rep(shift) + rep(pos) + cond.to(F64)[:, None, :]

    def _layers(self, z, mask=None, past=None):
        kvs = []
        for i, (qkv, o) in enumerate(zip(self.qkv, self.o)):
            q, k, v = qkv(z).chunk(3, -1)
            kvs.append((k, v))
            if past:
                k, v = torch.cat([past[i][0], k], 1), torch.cat([past[i][1], v], 1)
            s = q @ k.transpose(1, 2) / math.sqrt(self.dim)
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            z = z + o(torch.softmax(s, -1) @ v)
        return z, kvs

    def _out(self, z, t):
        return rearrange(self.out(z), "b (t h w) c -> b c t h w", t=t, h=H, w=W)

    def forward(self, x, timestep, cond, positions=None, mask=None):
        t = x.shape[2]
        positions = torch.arange(t) if positions is None else positions
        return self._out(self._layers(self._embed(x, timestep, positions, cond), mask)[0], t)

    def block(self, x, timestep, cond, past, offset):
        t = x.shape[2]
        z, kvs = self._layers(self._embed(x, timestep, offset + torch.arange(t), cond), past=past)
        return self._out(z, t), kvs


def _linear(i, o, g):
    m = nn.Linear(i, o).double()
    with torch.no_grad():
        m.weight.copy_(torch.randn(o, i, generator=g, dtype=F64) / math.sqrt(i))
        m.bias.copy_(0.1 * torch.randn(o, generator=g, dtype=F64))
    return m


class ToyCache:
    """Per layer ``(k, v)`` of the committed blocks; ``append`` detaches (as ``KVCache.write``) unless
    ``detach=False`` (the reference for teacher forcing, whose packed pass keeps the context in the graph)."""

    def __init__(self, detach=True):
        self.blocks, self.detach = [], detach

    def reset(self):
        self.blocks = []

    def past(self):
        if not self.blocks:
            return None
        return [
            (torch.cat([b[i][0] for b in self.blocks], 1), torch.cat([b[i][1] for b in self.blocks], 1))
            for i in range(len(self.blocks[0]))
        ]

    def append(self, kvs):
        self.blocks.append([(k.detach(), v.detach()) if self.detach else (k, v) for k, v in kvs])


def block_fns(net, cache, cond, blocks, record=None):
    """``denoise_block`` / ``commit_block`` of the toy student over ``cache`` (as the recipe binds WanDiT)."""

    def velocity_at(i):
        return lambda xs, ts, c: net.block(xs, ts, c, cache.past(), blocks.frames_before(i))[0]

    def denoise(x, t, i):
        pred = TrigFlowAdapter(velocity_at(i), **EXACT)(x, t, cond)
        if record is not None:
            record(i, pred.x0)
        return pred

    def commit(x, t, i):
        x_in, ts = network_input(x, t, **EXACT)
        cache.append(net.block(x_in, ts, cond, cache.past(), blocks.frames_before(i))[1])

    return denoise, commit


def tf_packed(net, blocks):
    """The packed teacher-forcing pass of the toy net: TF mask, positions repeated for both halves."""
    mask = teacher_forcing(blocks.num_blocks, blocks.frames_per_block, HW, first_block_frames=blocks.first)
    t = blocks.num_frames
    pos = torch.cat([torch.arange(t), torch.arange(t)])
    return lambda x, ts, c: net(x, ts, c, positions=pos, mask=mask.dense(2 * t * HW, 2 * t * HW, "cpu"))


def per_block_velocity(net, blocks, ctx_s, ctx_ts, given=0):
    """Reference for teacher forcing, block by block: commit the context blocks < i to a cache (clean-half
    block-causal pass), run noisy block i against it. Same contract as ``TeacherForcingVelocity``. The cache
    keeps the graph: in the packed pass the context half is computed by the student with grad too."""

    def v(x_s, ts, cond):
        ts = ts[:, None].expand(B, x_s.shape[2]) if ts.ndim == 1 else ts
        cache, outs = ToyCache(detach=False), []
        for sl in blocks.slices:
            if sl.start >= given:
                o = sl.start - given
                xi, ti = x_s[:, :, o : o + sl.stop - sl.start], ts[:, o : o + sl.stop - sl.start]
                outs.append(net.block(xi, ti, cond, cache.past(), sl.start)[0])
            cache.append(net.block(ctx_s[:, :, sl], ctx_ts[:, sl], cond, cache.past(), sl.start)[1])
        return torch.cat(outs, 2)

    return v


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def conds():
    return randn(B, 8, seed=11), randn(B, 8, seed=12)


# ------------------------------------------------------------------------------------------ blocks and times
def test_frame_blocks_patterns_and_errors():
    c14 = FrameBlocks(9, 4, 1)
    assert c14.sizes == (1, 4, 4) and c14.num_blocks == 3 and c14.frames_before(2) == 5
    assert [(s.start, s.stop) for s in c14.slices] == [(0, 1), (1, 5), (5, 9)]
    assert FrameBlocks(21, 3).num_blocks == 7 and FrameBlocks(21, 1).num_blocks == 21
    assert torch.equal(c14.expand(torch.tensor([[1, 2, 3]])), torch.tensor([[1, 2, 2, 2, 2, 3, 3, 3, 3]]))
    with pytest.raises(ValueError, match="do not split"):
        FrameBlocks(8, 3)
    with pytest.raises(ValueError, match="per-block values"):
        c14.expand(torch.zeros(1, 2))


def test_block_times_constant_in_blocks_and_reproducible():
    blocks = FrameBlocks(7, 2, 1)
    t = sample_block_times(LogNormal(0.7, 1.6), 3, blocks, generator=torch.Generator().manual_seed(0))
    assert t.shape == (3, 7) and t.dtype == F64
    for sl in blocks.slices:
        assert torch.equal(t[:, sl], t[:, sl.start : sl.start + 1].expand(-1, sl.stop - sl.start))
    per_block = t[:, [0, 1, 3, 5]]
    assert (per_block[:, 1:] != per_block[:, :1]).all()  # independent draws per block (diffusion forcing)
    again = sample_block_times(LogNormal(0.7, 1.6), 3, blocks, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)
    same = sample_block_times(
        UniformShift(5.0), 3, blocks, generator=torch.Generator().manual_seed(0), strategy="same"
    )
    assert torch.equal(same, same[:, :1].expand(-1, 7))


def test_block_dcm_times_decrease_and_are_blockwise():
    blocks = FrameBlocks(6, 2)
    t = sample_block_dcm_times(B, blocks, generator=torch.Generator().manual_seed(1), skip_steps=2)
    assert t.shape == (3, B, 6)
    assert (t[1:] < t[:-1]).all() and (t > 0).all()
    assert torch.equal(t[:, :, 0], t[:, :, 1]) and not torch.equal(t[:, :, 1], t[:, :, 2])


def test_network_input_is_what_the_adapter_feeds_the_network():
    """A cache write must see bit-identical inputs to a denoising call at the same ``(x_t, t)``."""
    seen = {}

    def net(xs, ts, c):
        seen.update(x=xs, ts=ts)
        return torch.zeros_like(xs)

    x_t = randn(B, C, 3, H, W, seed=1).float()
    for t in (torch.tensor([1.3, 0.4], dtype=F64), torch.tensor([[1.5, 0.9, 0.2], [1.1, 0.7, 0.05]], dtype=F64)):
        for dtypes in (EXACT, {}):
            TrigFlowAdapter(net, **dtypes)(x_t, t, None)
            x_in, ts = network_input(x_t, t, **dtypes)
            assert torch.equal(x_in, seen["x"]) and x_in.dtype == seen["x"].dtype and torch.equal(ts, seen["ts"])


# ------------------------------------------------------------------------------------------ teacher forcing
@pytest.mark.parametrize("given", [0, 1])
@pytest.mark.parametrize("noisy_context", [False, True])
def test_teacher_forcing_pass_equals_block_by_block(given, noisy_context):
    """One masked pass over [context ; noisy] gives each noisy block what a block pass against a cache of the
    earlier context blocks gives (the causal I2V case: the first 1-frame block is given)."""
    blocks = FrameBlocks(5, 2, 1)
    net, (cond, _) = ToyCausalNet(), conds()
    x0, eps = randn(B, C, 5, H, W, seed=1), randn(B, C, 5, H, W, seed=2)
    t_c = 0.3 if noisy_context else 0.0
    tfv = teacher_forcing_velocity(
        tf_packed(net, blocks), x0, context_time=t_c, context_eps=eps, given_frames=given, **EXACT
    )
    if noisy_context:  # the context is the RF sample of x0 re-noised to t_c (TrigFlow), at timestep 1000 s_c
        s_c = math.sin(t_c) / (math.sin(t_c) + math.cos(t_c))
        assert torch.allclose(tfv.context, (1 - s_c) * x0 + s_c * eps, atol=1e-14)
        assert torch.allclose(tfv.context_timestep, torch.full((B, 5), 1000 * s_c, dtype=F64))
    x_s = randn(B, C, 5 - given, H, W, seed=3)
    ts = blocks.expand(torch.tensor([[100.0, 700.0, 300.0], [900.0, 50.0, 500.0]], dtype=F64))[:, given:]
    ref = per_block_velocity(net, blocks, tfv.context, tfv.context_timestep, given)(x_s, ts, cond)
    assert torch.allclose(tfv(x_s, ts, cond), ref, **TOL)


def test_teacher_forcing_jvp_has_zero_context_tangent():
    """``TeacherForcingVelocity.jvp`` with the packed network's JVP equals ``torch.func.jvp`` of the noisy
    frames alone (the context is a constant)."""
    blocks = FrameBlocks(4, 2)
    net, (cond, _) = ToyCausalNet(), conds()
    packed = tf_packed(net, blocks)
    packed_jvp = lambda x, ts, c, tx, tt: torch.func.jvp(lambda a, b: packed(a, b, c), (x, ts), (tx, tt))
    tfv = teacher_forcing_velocity(packed, randn(B, C, 4, H, W, seed=1), packed_jvp=packed_jvp, **EXACT)
    x_s, tx = randn(B, C, 4, H, W, seed=2), randn(B, C, 4, H, W, seed=3)
    ts, tt = torch.full((B, 4), 400.0, dtype=F64), randn(B, 4, seed=4)
    v, dv = tfv.jvp(x_s, ts, cond, tx, tt)
    v_ref, dv_ref = torch.func.jvp(lambda a, b: tfv(a, b, cond), (x_s, ts), (tx, tt))
    assert torch.allclose(v, v_ref, **TOL) and torch.allclose(dv, dv_ref, **TOL)


def _param_grads(net):
    return torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("given", [0, 1])
def test_tf_scm_loss_equals_per_block_computation(given):
    """tf_scm_objective (packed pass, JVP through it) == rCM's scm_objective on a velocity computed block by
    block with a cache of the clean context: same loss and same student gradients. With per-block times the
    joint JVP splits into per-block JVPs because a noisy block sees no other noisy block."""
    blocks = FrameBlocks(5, 2, 1)
    student, teacher = ToyCausalNet(seed=0), ToyCausalNet(seed=1)
    cond, uncond = conds()
    x0, eps = randn(B, C, 5, H, W, seed=1), randn(B, C, 5, H, W, seed=2)
    t = sample_block_times(LogNormal(0.7, 1.6), B, blocks, generator=torch.Generator().manual_seed(3))
    loss, diag = tf_scm_objective(
        tf_packed(student, blocks),
        tf_packed(teacher, blocks),
        x0,
        eps,
        t,
        cond,
        uncond,
        given_frames=given,
        guidance=3.0,
        r=0.7,
        **EXACT,
    )
    loss.sum().backward()
    g_tf = _param_grads(student)
    student.zero_grad()
    ctx_ts = torch.zeros(B, 5, dtype=F64)
    s_ref = TrigFlowAdapter(per_block_velocity(student, blocks, x0, ctx_ts, given), **EXACT)
    t_ref = TrigFlowAdapter(per_block_velocity(teacher, blocks, x0, ctx_ts, given), **EXACT)
    loss_ref, _ = scm_objective(
        s_ref,
        None,
        t_ref,
        x0[:, :, given:],
        eps[:, :, given:],
        t[:, given:],
        cond,
        uncond,
        guidance=3.0,
        r=0.7,
    )
    loss_ref.sum().backward()
    assert torch.allclose(loss, loss_ref, **TOL) and (loss > 0).all() and not diag["nan"].any()
    assert torch.allclose(g_tf, _param_grads(student), **TOL)


def test_tf_dcm_loss_equals_per_block_computation():
    blocks = FrameBlocks(4, 2)
    student, teacher = ToyCausalNet(seed=0), ToyCausalNet(seed=1)
    cond, uncond = conds()
    x0, eps = randn(B, C, 4, H, W, seed=1), randn(B, C, 4, H, W, seed=2)
    times = sample_block_dcm_times(B, blocks, generator=torch.Generator().manual_seed(4))
    loss, _ = tf_dcm_objective(
        tf_packed(student, blocks),
        tf_packed(teacher, blocks),
        x0,
        eps,
        times,
        cond,
        uncond,
        student_context_time=0.2,
        context_eps=eps,
        **EXACT,
    )
    loss.sum().backward()
    g_tf = _param_grads(student)
    student.zero_grad()
    s_c = math.sin(0.2) / (math.sin(0.2) + math.cos(0.2))
    s_ref = TrigFlowAdapter(
        per_block_velocity(
            student, blocks, (1 - s_c) * x0 + s_c * eps, torch.full((B, 4), 1000 * s_c, dtype=F64)
        ),
        **EXACT,
    )
    t_ref = TrigFlowAdapter(per_block_velocity(teacher, blocks, x0, torch.zeros(B, 4, dtype=F64)), **EXACT)
    loss_ref, _ = causal_dcm_objective(s_ref, t_ref, x0, eps, times, cond, uncond)
    loss_ref.sum().backward()
    assert torch.allclose(loss, loss_ref, **TOL) and (loss > 0).all()
    assert torch.allclose(g_tf, _param_grads(student), **TOL)


def test_causal_dcm_is_zero_for_the_exact_point_mass_student():
    """For a point mass ``x_data`` the exact RF velocity is ``(x_s - x_data) / s``: every x0 prediction is
    ``x_data``, so dCM with per-frame (and per-sample) times has loss 0 up to rounding."""
    x_data = randn(1, C, 2, H, W, seed=5).expand(B, -1, -1, -1, -1)

    def velocity(xs, ts, c):
        s = (ts[:, None] if ts.ndim == 1 else ts)[:, None, :, None, None] / 1000
        return (xs - x_data) / s

    exact = TrigFlowAdapter(velocity, **EXACT)
    eps = randn(B, C, 2, H, W, seed=6)
    for times in (
        torch.tensor([[1.2, 1.0], [0.9, 0.7]], dtype=F64),
        torch.tensor([[[1.2, 1.0]] * B, [[0.9, 0.3]] * B], dtype=F64),
    ):
        loss, _ = causal_dcm_objective(exact, exact, x_data, eps, times, None, uncond=None)
        assert loss.abs().max() < 1e-20


def test_flow_matching_weights_and_value():
    """Per sample ``scale * sum_f w(s_f) mean_{C,H,W} (v - (eps - x0))^2`` with the Gaussian-bell weight."""
    x0, eps = randn(B, C, 3, H, W, seed=1), randn(B, C, 3, H, W, seed=2)
    s = torch.tensor([[0.5, 0.1, 0.9], [0.0, 1.0, 0.3]], dtype=F64)
    t = rf_to_trig(s)
    vel = lambda xs, ts, c: 0.5 * xs  # any velocity
    loss, _ = flow_matching_objective(vel, x0, eps, t, None, weighting="bell", loss_scale=100.0, **EXACT)
    x_s = (1 - s[:, None, :, None, None]) * x0 + s[:, None, :, None, None] * eps
    err = ((0.5 * x_s - (eps - x0)) ** 2).mean(dim=(1, 3, 4))
    w = torch.exp(-2 * (s - 0.5) ** 2) - math.exp(-0.5)
    assert torch.allclose(loss, 100 * (w * err).sum(1), atol=1e-12)
    assert abs(w[0, 0] - (1 - math.exp(-0.5))) < 1e-15 and w[1, 0].abs() < 1e-15 and w[1, 1].abs() < 1e-15
    exact, _ = flow_matching_objective(lambda xs, ts, c: eps - x0, x0, eps, t, None, **EXACT)
    assert torch.equal(exact, torch.zeros(B, dtype=F64))


def test_ode_regression_blockwise_indices_and_clean_frames_excluded():
    blocks = FrameBlocks(6, 2)
    k1 = 4
    times = torch.tensor([math.pi / 2, 1.3, 0.8, 0.0], dtype=F64)[:, None].expand(k1, B)
    traj = randn(k1, B, C, 6, H, W, seed=7)
    seen = {}

    def student(x, t, c):
        seen["x"], seen["t"] = x, t
        return TrigFlowAdapter(lambda xs, ts, _c: xs * 0 + 0.0, **EXACT)(x, t, c)  # x0_hat = c_skip x_t

    loss, _ = ode_regression_objective(
        student, traj, times, None, blocks, generator=torch.Generator().manual_seed(2)
    )
    t = seen["t"]
    assert t.shape == (B, 6) and torch.equal(t[:, 0], t[:, 1]) and torch.equal(t[:, 4], t[:, 5])
    for bi in range(B):
        for f in range(6):
            k = int((times[:, 0] == t[bi, f]).nonzero())
            assert torch.equal(seen["x"][bi, :, f], traj[k, bi, :, f])
    x0_hat = seen["x"] / (torch.cos(t) + torch.sin(t))[:, None, :, None, None]
    ref = ((x0_hat - traj[-1]) ** 2 * (t > 0)[:, None, :, None, None]).flatten(1).sum(1)
    assert torch.allclose(loss, ref, atol=1e-12)


# ------------------------------------------------------------------------------------------ self forcing
def _rollout(net, blocks, cond, *, seed=0, exits=None, record=None, **kw):
    cache = ToyCache()
    den, com = block_fns(net, cache, cond, blocks, record)
    exits = exits if exits is not None else (3,) * blocks.num_blocks
    out = self_forcing_rollout(
        den,
        com,
        (B, C, blocks.num_frames, H, W),
        blocks,
        SCHEDULE,
        generator=torch.Generator().manual_seed(seed),
        exit_steps=exits,
        **kw,
    )
    return out, cache, den, com


def test_self_forcing_gradient_reaches_only_the_exit_step_of_each_block():
    """Hooks on every student call: only the exit-step call of each block receives gradient from the DMD loss;
    every other call ran without grad; the cache holds no graph."""
    blocks = FrameBlocks(5, 2, 1)
    net, fake, teacher = ToyCausalNet(seed=0), ToyCausalNet(seed=1), ToyCausalNet(seed=2)
    cond, uncond = conds()
    calls, got_grad, grad_mode = {}, [], []

    def record(i, x0):
        k = calls[i] = calls.get(i, -1) + 1
        grad_mode.append(((i, k), torch.is_grad_enabled()))
        if x0.requires_grad:
            x0.register_hook(lambda g, key=(i, k): got_grad.append(key))

    exits = sample_exit_steps([4, 4, 4], generator=torch.Generator().manual_seed(5), same_across_blocks=False)
    assert len(set(exits)) > 1  # distinct exits per block make the check sharper
    out, cache, _, _ = _rollout(net, blocks, cond, exits=exits, record=record)
    assert calls == {i: e for i, e in enumerate(exits)}  # steps after the exit are skipped
    assert all(on == (k == exits[i]) for (i, k), on in grad_mode)
    assert all(not k.requires_grad and not v.requires_grad for blk in cache.blocks for k, v in blk)
    bidir = lambda m: TrigFlowAdapter(lambda xs, ts, c: m(xs, ts, c), **EXACT)
    t_d = UniformShift(5.0)(B, generator=torch.Generator().manual_seed(6))
    loss, _ = dmd_objective(
        out.x0, t_d, randn(B, C, 5, H, W, seed=8), bidir(fake), bidir(teacher), cond, uncond, guidance=5.0
    )
    loss.sum().backward()
    assert sorted(got_grad) == [(i, e) for i, e in enumerate(exits)]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def _reference_rollout(net, blocks, cond, exits, seed):
    """Hand-written self-forcing loop (independent of rcm_losses.causal): same draws, same semantics."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, blocks.num_frames, H, W)
    x_start = torch.randn(shape, generator=g)
    noises = [torch.randn(shape, generator=g) for _ in range(len(SCHEDULE) - 1)]
    cache, outs = ToyCache(), []
    for i, sl in enumerate(blocks.slices):
        vel = lambda xs, ts, c, i=i: net.block(xs, ts, c, cache.past(), blocks.frames_before(i))[0]
        x = x_start[:, :, sl]
        for k in range(exits[i] + 1):
            with torch.set_grad_enabled(k == exits[i]):
                x0 = TrigFlowAdapter(vel, **EXACT)(
                    x, torch.full((B,), SCHEDULE[k], dtype=F64), cond
                ).x0.float()
            if k < exits[i]:
                tn = SCHEDULE[k + 1]
                x = math.cos(tn) * x0.double() + math.sin(tn) * noises[k][:, :, sl].double()
        with torch.no_grad():
            cache.append(net.block(x0.double(), torch.zeros(B, dtype=F64), cond, cache.past(), sl.start)[1])
        outs.append(x0)
    return torch.cat(outs, 2)


def test_self_forcing_rollout_matches_a_hand_written_loop_values_and_gradients():
    blocks = FrameBlocks(6, 2)
    net, (cond, _) = ToyCausalNet(), conds()
    exits = (1, 3, 0)
    weight = randn(B, C, 6, H, W, seed=9).float()
    out, *_ = _rollout(net, blocks, cond, exits=exits, seed=4)
    (out.x0 * weight).sum().backward()
    g = _param_grads(net)
    net.zero_grad()
    ref = _reference_rollout(net, blocks, cond, exits, seed=4)
    (ref * weight).sum().backward()
    assert torch.allclose(out.x0, ref, atol=1e-6) and out.exit_steps == exits
    assert torch.allclose(g, _param_grads(net), atol=1e-6)  # float32 outputs (out_dtype): 1e-6


def test_rollout_reproducible_with_a_fixed_generator():
    blocks = FrameBlocks(4, 2)
    net, (cond, _) = ToyCausalNet(), conds()
    ex = lambda s: sample_exit_steps([4, 4], generator=torch.Generator().manual_seed(s))
    a, *_ = _rollout(net, blocks, cond, seed=1, exits=ex(1), with_grad=False)
    b, *_ = _rollout(net, blocks, cond, seed=1, exits=ex(1), with_grad=False)
    c, *_ = _rollout(net, blocks, cond, seed=2, exits=ex(1), with_grad=False)
    assert torch.equal(a.x0, b.x0) and a.exit_steps == b.exit_steps
    assert all(torch.equal(x, y) for x, y in zip(a.exit_inputs, b.exit_inputs))
    assert not torch.allclose(a.x0, c.x0)
    assert not a.x0.requires_grad


def test_rollout_equals_one_teacher_forcing_pass_on_its_own_blocks():
    """The exit predictions of a rollout (same exit step for all blocks) equal one packed teacher-forcing pass
    with the committed blocks as context and the exit inputs as noisy half: cache and mask agree."""
    blocks = FrameBlocks(5, 2, 1)
    net, (cond, _) = ToyCausalNet(), conds()
    out, *_ = _rollout(net, blocks, cond, exits=(2, 2, 2), with_grad=False, out_dtype=F64)
    context = torch.cat(out.contexts, 2)
    noisy = torch.cat(out.exit_inputs, 2)
    t = torch.full((B, 5), SCHEDULE[2], dtype=F64)
    pred = teacher_forcing_adapter(tf_packed(net, blocks), context, **EXACT)(noisy, t, cond).x0
    assert torch.allclose(pred, out.x0, **TOL)


@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("mode", ["video", "eager"])
def test_replay_gives_the_same_gradients_as_the_plain_rollout(given, mode):
    """Replayed backprop, both forms: ``replayed_video`` (replay inside the outer backward) and
    ``replay_backward`` (explicit per-block backward with dL/dG), with I2V given block and noisy context."""
    blocks = FrameBlocks(5, 2, 1)
    net, fake, teacher = ToyCausalNet(seed=0), ToyCausalNet(seed=1), ToyCausalNet(seed=2)
    cond, uncond = conds()
    kw = dict(exits=(0, 2, 1), given=randn(B, C, 1, H, W, seed=3) if given else None, context_time=0.2)
    bidir = lambda m: TrigFlowAdapter(lambda xs, ts, c: m(xs, ts, c), **EXACT)
    t_d, eps = UniformShift(5.0)(B, generator=torch.Generator().manual_seed(6)), randn(B, C, 5, H, W, seed=8)

    def loss_of(video):
        return dmd_objective(video, t_d, eps, bidir(fake), bidir(teacher), cond, uncond, guidance=5.0)[
            0
        ].sum()

    out, *_ = _rollout(net, blocks, cond, **kw)
    loss_plain = loss_of(out.x0)
    loss_plain.backward()
    g_plain = _param_grads(net)
    net.zero_grad()
    out2, cache, den, com = _rollout(net, blocks, cond, with_grad=False, **kw)
    if mode == "video":
        video = replayed_video(out2, den, com, blocks, reset=cache.reset, check_atol=1e-6)
        loss_replay = loss_of(video)
        loss_replay.backward()
    else:
        video = out2.x0.detach().requires_grad_()
        loss_replay = loss_of(video)
        (grad_video,) = torch.autograd.grad(loss_replay, video)
        replay_backward(out2, den, com, blocks, grad_video, reset=cache.reset, check_atol=1e-6)
    assert torch.equal(loss_plain, loss_replay.detach())
    assert torch.allclose(g_plain, _param_grads(net), rtol=1e-6, atol=1e-9)  # float32 block outputs
    if given:
        assert torch.equal(out.x0[:, :, :1], kw["given"].float()) and out.exit_steps[0] == -1


def test_replay_detects_a_cache_that_was_not_reset():
    blocks = FrameBlocks(4, 2)
    net, (cond, _) = ToyCausalNet(), conds()
    out, cache, den, com = _rollout(net, blocks, cond, exits=(1, 1), with_grad=False)
    video = replayed_video(out, den, com, blocks, reset=lambda: None, check_atol=1e-6)
    with pytest.raises(RuntimeError, match="replayed block 0 differs"):
        video.sum().backward()


def test_given_block_and_noisy_context_are_committed_as_specified():
    blocks = FrameBlocks(5, 2, 1)
    net, (cond, _) = ToyCausalNet(), conds()
    commits = []
    cache = ToyCache()
    den, com = block_fns(net, cache, cond, blocks)
    image = randn(B, C, 1, H, W, seed=3)

    def commit(x, t, i):
        commits.append((i, x.clone(), t.clone(), torch.is_grad_enabled()))
        com(x, t, i)

    out = self_forcing_rollout(
        den,
        commit,
        (B, C, 5, H, W),
        blocks,
        SCHEDULE,
        generator=torch.Generator().manual_seed(0),
        exit_steps=(0, 1, 1),
        given=image,
        context_time=0.4,
    )
    assert [c[0] for c in commits] == [0, 1, 2] and not any(c[3] for c in commits)
    assert torch.equal(commits[0][1], image) and torch.equal(commits[0][2], torch.zeros(B, dtype=F64))
    assert torch.equal(commits[1][2], torch.full((B,), 0.4, dtype=F64))
    g = torch.Generator().manual_seed(0)
    shape = (B, C, 5, H, W)
    draws = [torch.randn(shape, generator=g) for _ in range(len(SCHEDULE) + 1)]  # start, 3 steps, context
    sl = blocks.slices[1]
    ctx_ref = add_noise(out.x0[:, :, sl].double(), draws[-1][:, :, sl], torch.full((B,), 0.4, dtype=F64))
    assert torch.allclose(commits[1][1], ctx_ref, atol=1e-12)
    other, *_ = _rollout(net, blocks, cond, exits=(0, 1, 1), given=-image, context_time=0.4, with_grad=False)
    assert not torch.allclose(other.x0[:, :, 1:], out.x0[:, :, 1:])  # later blocks see the given block


def test_exit_steps():
    g = torch.Generator().manual_seed(0)
    draws = {sample_exit_steps([4, 2, 2], generator=g) for _ in range(40)}
    assert {d[0] for d in draws} == {0, 1, 2, 3} and all(d[1] == d[2] == min(d[0], 1) for d in draws)
    assert cycled_exit_steps(0, [4, 2]) == (0, 0) and cycled_exit_steps(2, [4, 2]) == (2, 1)
    assert cycled_exit_steps(4, [4, 2]) == (0, 0)
    with pytest.raises(ValueError, match="at least one step"):
        sample_exit_steps([4, 0], generator=g)


def test_bad_inputs_name_the_problem():
    blocks = FrameBlocks(4, 2)
    net, (cond, _) = ToyCausalNet(), conds()
    den, com = block_fns(net, ToyCache(), cond, blocks)
    run = lambda **kw: self_forcing_rollout(
        den, com, (B, C, 4, H, W), blocks, kw.pop("schedule", SCHEDULE), generator=torch.Generator(), **kw
    )
    with pytest.raises(ValueError, match="outside its 4-step schedule"):
        run(exit_steps=(0, 4))
    with pytest.raises(ValueError, match="strictly decreasing"):
        run(exit_steps=(0, 0), schedule=[1.0, 1.2])
    with pytest.raises(ValueError, match="block boundary"):
        run(exit_steps=(0, 0), given=torch.zeros(B, C, 1, H, W))
    with pytest.raises(ValueError, match="one exit step per block"):
        run(exit_steps=(0,))
    with pytest.raises(ValueError, match="needs context_eps"):
        teacher_forcing_velocity(tf_packed(net, blocks), torch.zeros(B, C, 4, H, W), context_time=0.3)
    with pytest.raises(ValueError, match="dCM times"):
        causal_dcm_objective(
            None, None, torch.zeros(B, C, 4, H, W), torch.zeros(B, C, 4, H, W), torch.zeros(1, B), None
        )
    tfv = teacher_forcing_velocity(tf_packed(net, blocks), torch.zeros(B, C, 4, H, W, dtype=F64), **EXACT)
    with pytest.raises(ValueError, match="do not match the context"):
        tfv(torch.zeros(B, C, 3, H, W, dtype=F64), torch.zeros(B, dtype=F64), cond)
