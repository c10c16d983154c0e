"""WanDiT.forward_jvp against torch.func.jvp of the plain forward, in float64.

Independent reference: ``torch.func.jvp`` differentiates the plain forward by forward-mode autograd (the
attention through its own forward-AD rule), while ``forward_jvp`` propagates tangents through hand-written
derivative formulas. In float64 both are exact up to rounding (~1e-15 relative), so 1e-10 (the issue's bound)
catches any wrong formula. Weights are random everywhere, the head included (Wan's zero-initialized head
would make every tangent 0 and the test vacuous, docs/nets.md).
"""

import pytest
import torch
from _plain_attention import plain_torch_attention

from rcm_nets.wan import WanDiT

F64 = torch.float64
ATOL = RTOL = 1e-10


def _net(name: str, **overrides) -> WanDiT:
    net = WanDiT.from_config(name, dtype=F64, **overrides)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))  # every parameter non-trivial, the zero head included
    assert net.head.head.weight.abs().min() > 0
    return net


def _inputs(net: WanDiT, b=2, frames=3, h=4, w=6, per_frame=False):
    cfg = net.config
    cx = cfg.out_dim if cfg.model_type == "i2v" else cfg.in_dim
    x = torch.randn(b, cx, frames, h, w, dtype=F64)
    t = torch.rand(*((b, frames) if per_frame else (b,)), dtype=F64) * 1000
    ctx = torch.randn(b, 5, cfg.text_dim, dtype=F64)
    kw = {}
    if cfg.model_type == "i2v":
        kw = dict(y=torch.randn(b, cfg.in_dim - cx, frames, h, w, dtype=F64),
                  clip_fea=torch.randn(b, 7, 1280, dtype=F64))
    return x, t, ctx, kw


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(1)
    return {"tiny": _net("tiny", num_layers=2), "tiny-i2v": _net("tiny-i2v", num_layers=1)}


def _check(net, x, t, ctx, kw, tx, tt):
    with torch.no_grad():
        out, tout = net.forward_jvp(x, t, ctx, tx, tt, **kw)
        plain = net(x, t, ctx, **kw)
    zx = torch.zeros_like(x) if tx is None else tx
    zt = torch.zeros_like(t) if tt is None else tt
    with plain_torch_attention(net):
        ref, rtan = torch.func.jvp(lambda x_, t_: net(x_, t_, ctx, **kw), (x, t), (zx, zt))
    assert torch.equal(out, plain), "the JVP pass's primal must equal the plain forward exactly"
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert rtan.abs().max() > 1e-3, "reference tangent is ~0: the test would be vacuous"
    torch.testing.assert_close(tout, rtan, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("name", "which"), [("tiny", "x_and_t"), ("tiny", "x_only"), ("tiny", "t_only"),
                                             ("tiny-i2v", "x_and_t")])
def test_forward_jvp_matches_func_jvp(nets, name, which):
    net = nets[name]
    x, t, ctx, kw = _inputs(net)
    tx = None if which == "t_only" else torch.randn_like(x)
    tt = None if which == "x_only" else torch.randn_like(t) * 100
    _check(net, x, t, ctx, kw, tx, tt)


def test_forward_jvp_per_frame_timesteps(nets):
    net = nets["tiny"]
    x, t, ctx, kw = _inputs(net, per_frame=True)
    assert t.shape == (2, 3)
    _check(net, x, t, ctx, kw, torch.randn_like(x), torch.randn_like(t) * 100)


def test_forward_jvp_student_precision_and_batch_one():
    """The 'student' numerics path (fp32 FFN + residual) has the same math and the same tangents."""
    torch.manual_seed(2)
    net = _net("tiny", num_layers=1, precision="student")
    x, t, ctx, kw = _inputs(net, b=1, frames=2, h=2, w=4)
    _check(net, x, t, ctx, kw, torch.randn_like(x), torch.randn_like(t) * 100)


def test_tangent_has_no_graph_and_primal_keeps_grad(nets):
    """Tangents are detached and built without autograd; the primal stays differentiable."""
    net = nets["tiny"]
    x, t, ctx, kw = _inputs(net, b=1)
    out, tout = net.forward_jvp(x, t, ctx, torch.randn_like(x), torch.ones_like(t))
    assert out.requires_grad and not tout.requires_grad and tout.grad_fn is None
    out2, tout2 = net.forward_jvp(x, t, ctx, None, None)
    assert torch.equal(tout2, torch.zeros_like(out2))


def test_context_tangent_is_never_passed_to_attention(nets, monkeypatch):
    """Self-attention receives q/k/v tangents; cross-attention only a q tangent (k, v tangents cost nothing)."""
    net = nets["tiny-i2v"]
    seen = []
    for block in net.blocks:
        for site in (block.self_attn.attn, block.cross_attn.attn):
            orig = site.forward

            def spy(q, k, v, tq=None, tk=None, tv=None, *, _o=orig, _s=site, **kw):
                seen.append((_s.context_parallel, tq is not None, tk is not None, tv is not None))
                return _o(q, k, v, tq, tk, tv, **kw)

            monkeypatch.setattr(site, "forward", spy)
    x, t, ctx, kw = _inputs(net, b=1)
    with torch.no_grad():
        net.forward_jvp(x, t, ctx, torch.randn_like(x), None, **kw)
    assert (True, True, True, True) in seen
    assert all(s == (False, True, False, False) for s in seen if not s[0])
    assert sum(not s[0] for s in seen) == 2 * len(net.blocks)  # i2v: text and image attention per block
