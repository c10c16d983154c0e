"""Bad inputs to WanDiT raise errors that name the problem."""

import pytest
import torch

from rcm_nets.wan import WanDiT


@pytest.fixture(scope="module")
def t2v():
    net = WanDiT.from_config("tiny", num_layers=1)
    net.init_weights()
    return net


@pytest.fixture(scope="module")
def i2v():
    net = WanDiT.from_config("tiny-i2v", num_layers=1)
    net.init_weights()
    return net


def _args(net, b=1, c=None, f=2, h=4, w=4, lc=3):
    cfg = net.config
    c = (cfg.out_dim if cfg.model_type == "i2v" else cfg.in_dim) if c is None else c
    return torch.randn(b, c, f, h, w), torch.full((b,), 500.0), torch.randn(b, lc, cfg.text_dim)


def test_good_call_runs(t2v, i2v):
    x, t, ctx = _args(t2v)
    assert t2v(x, t, ctx).shape == x.shape
    x, t, ctx = _args(i2v)
    out = i2v(x, t, ctx, y=torch.randn(1, 20, *x.shape[2:]), clip_fea=torch.randn(1, 5, 1280))
    assert out.shape == x.shape


def test_wrong_latent_channel_count(t2v, i2v):
    x, t, ctx = _args(t2v, c=15)
    with pytest.raises(ValueError, match=r"latent channel count: x has 15 channels.*in_dim=16"):
        t2v(x, t, ctx)
    x, t, ctx = _args(i2v)
    with pytest.raises(ValueError, match=r"latent channel count: x has 16 and y has 19 .*in_dim=36"):
        i2v(x, t, ctx, y=torch.randn(1, 19, *x.shape[2:]), clip_fea=torch.randn(1, 5, 1280))


@pytest.mark.parametrize("hw", [(5, 4), (4, 7)])
def test_height_width_not_divisible_by_patch(t2v, hw):
    x, t, ctx = _args(t2v, h=hw[0], w=hw[1])
    with pytest.raises(ValueError, match=r"divisible by patch_size \(1, 2, 2\)"):
        t2v(x, t, ctx)


def test_context_longer_than_text_len(t2v):
    x, t, ctx = _args(t2v, lc=t2v.config.text_len + 1)
    with pytest.raises(ValueError, match=rf"context has {t2v.config.text_len + 1} rows, longer than text_len=16"):
        t2v(x, t, ctx)


def test_context_width_and_timestep_shape(t2v):
    x, t, _ = _args(t2v)
    with pytest.raises(ValueError, match="text_dim=32"):
        t2v(x, t, torch.randn(1, 3, 31))
    _, _, ctx = _args(t2v)
    with pytest.raises(ValueError, match=r"t has shape \(1, 3\), expected \[1\] or \[1, 2\]"):
        t2v(x, torch.zeros(1, 3), ctx)


def test_i2v_needs_y_and_clip_and_t2v_refuses_them(t2v, i2v):
    x, t, ctx = _args(i2v)
    with pytest.raises(ValueError, match="needs y"):
        i2v(x, t, ctx)
    x, t, ctx = _args(t2v)
    with pytest.raises(ValueError, match="t2v model takes no y"):
        t2v(x, t, ctx, clip_fea=torch.randn(1, 5, 1280))


def test_tangent_shape(t2v):
    x, t, ctx = _args(t2v)
    with pytest.raises(ValueError, match="tangent tx"):
        t2v.forward_jvp(x, t, ctx, torch.randn(1, 16, 2, 4, 2), None)


def test_bad_configs():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        WanDiT.from_config("tiny", num_heads=3)
    with pytest.raises(ValueError, match="window_size"):
        WanDiT.from_config("tiny", window_size=(4, 4))
    with pytest.raises(KeyError, match="unknown Wan config"):
        WanDiT.from_config("t2v-2B")
