"""WanDiT semantics beyond the goldens: per-frame times, RoPE offsets, the parallelism seams, precision, init."""

import pytest
import torch

from rcm_kernels.attention import Attention, SequenceShard
from rcm_nets.wan import WanConfig, WanDiT, get_config
from rcm_nets.wan._rope import apply_rope, rope_angles, rope_cos_sin, rope_split
from rcm_nets.wan.configs import CONFIG_NAMES

F64 = torch.float64


def _random_net(name="tiny", dtype=F64, seed=0, **overrides) -> WanDiT:
    torch.manual_seed(seed)
    net = WanDiT.from_config(name, dtype=dtype, **overrides)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def _inputs(net, b=2, f=3, h=4, w=4, dtype=F64):
    return (torch.randn(b, net.config.in_dim, f, h, w, dtype=dtype), torch.tensor([250.0, 875.5][:b], dtype=dtype),
            torch.randn(b, 5, net.config.text_dim, dtype=dtype))


def test_meta_build_to_empty_init_gives_zero_output():
    """Build on meta, materialize, init: Wan's zero head makes the output exactly 0 (and nothing is NaN)."""
    with torch.device("meta"):
        net = WanDiT.from_config("tiny")
    assert all(p.is_meta for p in net.parameters())
    net.to_empty(device="cpu")
    net.init_weights(generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    x, t, ctx = _inputs(net, dtype=torch.float32)
    assert torch.equal(net(x, t, ctx), torch.zeros_like(x))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_named_configs_build_on_meta(name):
    with torch.device("meta"):
        net = WanDiT.from_config(name)
    assert net.config == get_config(name) and len(net.blocks) == net.config.num_layers


def test_config_from_official_config_json():
    released = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06,
                "ffn_dim": 8960, "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12,
                "num_layers": 30, "out_dim": 16, "text_len": 512}
    assert WanConfig.from_official(released) == get_config("t2v-1.3B")


def test_per_frame_constant_times_equal_per_sample_times():
    net = _random_net()
    x, t, ctx = _inputs(net)
    with torch.no_grad():
        per_sample = net(x, t, ctx)
        per_frame = net(x, t[:, None].expand(-1, x.shape[2]).contiguous(), ctx)
    torch.testing.assert_close(per_frame, per_sample, atol=1e-12, rtol=1e-12)


def test_per_frame_times_reach_their_frames():
    """Without blocks each token depends on its own frame only: frame f must use t[:, f] (head modulation)."""
    net = _random_net(num_layers=0)
    x, _, ctx = _inputs(net)
    t = torch.tensor([[100.0, 500.0, 900.0], [30.0, 60.0, 990.0]], dtype=F64)
    with torch.no_grad():
        out = net(x, t, ctx)
        for f in range(3):
            torch.testing.assert_close(out[:, :, f], net(x, t[:, f], ctx)[:, :, f], atol=1e-12, rtol=1e-12)


def test_per_frame_times_modulate_blocks():
    """With blocks, changing the time of the last frame changes every frame (attention mixes frames)."""
    net = _random_net(num_layers=1)
    x, _, ctx = _inputs(net, b=1)
    t1, t2 = torch.tensor([[500.0, 500.0, 500.0]], dtype=F64), torch.tensor([[500.0, 500.0, 100.0]], dtype=F64)
    with torch.no_grad():
        d = (net(x, t1, ctx) - net(x, t2, ctx)).abs().amax(dim=(0, 1, 3, 4))
    assert (d > 1e-6).all()


def test_frame_offset_shifts_rope_only(monkeypatch):
    """RoPE attention depends on position differences only: a global frame offset rotates q and k (they
    change) but leaves the output unchanged."""
    net = _random_net(num_layers=1)
    x, t, ctx = _inputs(net)
    site, qs = net.blocks[0].self_attn.attn, []
    orig = site.forward
    monkeypatch.setattr(site, "forward", lambda q, *a, **kw: (qs.append(q), orig(q, *a, **kw))[1])
    with torch.no_grad():
        ref = net(x, t, ctx)
        out = net(x, t, ctx, frame_offset=7)
    assert (qs[0] - qs[1]).abs().max() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_rope_matches_complex_reference():
    """Interleaved complex rotation with per-axis frequency sets, split 44/42/42 for head dim 128."""
    assert rope_split(128) == (44, 42, 42) and rope_split(16) == (8, 4, 4) and rope_split(24) == (8, 8, 8)
    d, (f, h, w), offset = 128, (3, 2, 5), 4
    parts = []
    for width, n, off in zip(rope_split(d), (f, h, w), (offset, 0, 0)):
        freqs = 1.0 / 10000 ** (torch.arange(0, width, 2, dtype=F64) / width)
        parts.append(torch.polar(torch.ones(n, width // 2, dtype=F64), torch.outer(torch.arange(n) + off, freqs)))
    table = torch.cat([parts[0][:, None, None].expand(f, h, w, -1), parts[1][None, :, None].expand(f, h, w, -1),
                       parts[2][None, None, :].expand(f, h, w, -1)], dim=-1).reshape(f * h * w, 1, d // 2)
    q = torch.randn(2, f * h * w, 3, d, dtype=F64)
    ref = torch.view_as_real(torch.view_as_complex(q.unflatten(-1, (-1, 2))) * table).flatten(-2)
    cos, sin = rope_cos_sin(rope_angles(offset + torch.arange(f), h, w, d), F64)
    torch.testing.assert_close(apply_rope(q, None, cos, sin)[0], ref, atol=1e-12, rtol=1e-12)


class _ReverseShard(SequenceShard):
    """A stand-in for a context-parallel shard: 'shards' by reversing the token order, gathers by undoing it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def shard(self, x, dim=1):
        self.calls.append(tuple(x.shape))
        return x.flip(dim)

    def gather(self, x, dim=1):
        return x.flip(dim)


@pytest.mark.parametrize("per_frame", [False, True])
def test_sequence_shard_seam_is_applied_consistently(per_frame):
    """Every per-token tensor (tokens, tangents, RoPE, per-frame modulation index) goes through ``shard``:
    a consistent token permutation leaves outputs and tangents unchanged."""
    net = _random_net()
    x, t, ctx = _inputs(net)
    if per_frame:
        t = torch.tensor([[100.0, 500.0, 900.0], [30.0, 60.0, 990.0]], dtype=F64)
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    with torch.no_grad():
        ref = net.forward_jvp(x, t, ctx, tx, tt)
        net.seq_shard = _ReverseShard()
        out = net.forward_jvp(x, t, ctx, tx, tt)
    assert len(net.seq_shard.calls) == (5 if per_frame else 4)  # tokens, tangents, cos, sin (+ index)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_block_mask_reaches_self_attention_only(monkeypatch):
    net = _random_net(num_layers=2)
    x, t, ctx = _inputs(net, b=1)
    lq = x.shape[2] * x.shape[3] * x.shape[4] // 4
    mask = torch.ones(lq, lq, dtype=torch.bool).tril()  # a causal dense mask
    got = []
    for m in net.modules():
        if isinstance(m, Attention):
            orig = m.forward

            def spy(*a, _o=orig, _m=m, block_mask=None, **kw):
                got.append((_m.context_parallel, block_mask is mask))
                return _o(*a, block_mask=block_mask, **kw)

            monkeypatch.setattr(m, "forward", spy)
    with torch.no_grad():
        masked, full = net(x, t, ctx, block_mask=mask), net(x, t, ctx)
    assert set(got) == {(True, True), (False, False), (True, False)}
    assert not torch.allclose(masked, full)


def test_precision_modes():
    """float32 params: 'student' and 'teacher' numerics coincide exactly; bf16: they differ slightly and both
    stay close to the float32 result."""
    net32 = _random_net(dtype=torch.float32, num_layers=2)
    x, t, ctx = _inputs(net32, dtype=torch.float32)
    with torch.no_grad():
        ref = net32(x, t, ctx)
        net32.precision = "student"
        assert torch.equal(net32(x, t, ctx), ref)
        net16 = WanDiT(get_config("tiny", num_layers=2), dtype=torch.bfloat16)
        net16.load_state_dict(net32.state_dict())
        teacher = net16(x, t, ctx)
        net16.precision = "student"
        student = net16(x, t, ctx)
    assert teacher.dtype == student.dtype == torch.float32  # the head is an fp32 island
    assert not torch.equal(teacher, student)
    scale = ref.abs().max()
    assert (teacher - ref).abs().max() < 0.1 * scale and (student - ref).abs().max() < 0.1 * scale
