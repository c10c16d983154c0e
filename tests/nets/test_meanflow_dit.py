"""MeanFlowWanDiT: JVP in (x, t, r) against torch.func.jvp (float64), teacher loading, equality at init.

Independent reference as tests/nets/test_dit_jvp.py: ``torch.func.jvp`` of the plain forward (attention
routed to plain torch math) vs the hand-written forward mode; float64, tolerance 1e-10. Every weight is
randomized (the zero head and the zero last interval Linear would make tangents vacuous).
"""

import pytest
import torch
from _plain_attention import plain_torch_attention

from rcm_nets.wan import WanDiT
from rcm_nets.wan.meanflow import MeanFlowWanDiT, meanflow_student_state_dict

F64 = torch.float64


def _initialized(net):
    """``from_config`` leaves parameters uninitialized (``torch.empty``): give them the seeded init first."""
    net.init_weights()
    return net


def _randomize(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(2)
    n = MeanFlowWanDiT.from_config("tiny", dtype=F64, num_layers=2)
    n.init_weights()
    return _randomize(n)


def _inputs(net, b=2, frames=3, h=4, w=6, per_frame=False):
    cfg = net.config
    x = torch.randn(b, cfg.in_dim, frames, h, w, dtype=F64)
    shape = (b, frames) if per_frame else (b,)
    t = 200 + 800 * torch.rand(*shape, dtype=F64)
    r = t * torch.rand(*shape, dtype=F64)
    ctx = torch.randn(b, 5, cfg.text_dim, dtype=F64)
    return x, t, r, ctx


@pytest.mark.parametrize("per_frame", [False, True])
@pytest.mark.parametrize("which", ["all", "x", "t", "r"])
def test_forward_jvp_matches_torch_func(net, which, per_frame):
    x, t, r, ctx = _inputs(net, per_frame=per_frame)
    tx, tt, tr = torch.randn_like(x), torch.randn_like(t), torch.randn_like(t)
    keep = {"all": (tx, tt, tr), "x": (tx, None, None), "t": (None, tt, None), "r": (None, None, tr)}[which]
    with torch.no_grad():
        out, tout = net.forward_jvp(x, t, ctx, keep[0], keep[1], r=r, tr=keep[2])
        plain = net(x, t, ctx, r=r)
    zeros = (torch.zeros_like(x), torch.zeros_like(t), torch.zeros_like(r))
    tan = tuple(z if k is None else k for k, z in zip(keep, zeros))
    with plain_torch_attention(net):
        ref, rtan = torch.func.jvp(lambda x_, t_, r_: net(x_, t_, ctx, r=r_), (x, t, r), tan)
    assert torch.equal(out, plain), "the JVP pass's primal must equal the plain forward exactly"
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert rtan.abs().max() > 1e-3, "reference tangent is ~0: the test would be vacuous"
    torch.testing.assert_close(tout, rtan, atol=1e-10, rtol=1e-10)


def test_r_changes_the_output_and_default_is_r_eq_t(net):
    x, t, r, ctx = _inputs(net)
    with torch.no_grad():
        assert (net(x, t, ctx, r=r) - net(x, t, ctx, r=t)).abs().max() > 1e-3
        assert torch.equal(net(x, t, ctx), net(x, t, ctx, r=t))


def test_load_teacher_strict_and_equal_at_start():
    torch.manual_seed(3)
    teacher = _randomize(_initialized(WanDiT.from_config("tiny", dtype=F64, num_layers=2)))
    student = MeanFlowWanDiT.from_config("tiny", dtype=F64, num_layers=2)
    new = student.load_teacher(teacher.state_dict())
    assert new == sorted(MeanFlowWanDiT.new_keys())
    assert set(student.state_dict()) - set(teacher.state_dict()) == set(new)
    x, t, r, ctx = _inputs(student)
    with torch.no_grad():
        assert torch.equal(student(x, t, ctx, r=r), teacher(x, t, ctx))
        # the tangent in r is exactly 0 at the start, the others are the teacher's
        out, tout = student.forward_jvp(x, t, ctx, torch.ones_like(x), torch.ones_like(t), r=r, tr=torch.ones_like(r))
        ref, rtan = teacher.forward_jvp(x, t, ctx, torch.ones_like(x), torch.ones_like(t))
    assert torch.equal(out, ref) and torch.equal(tout, rtan)
    # the zero-initialised Linear still gets a gradient (training can move it)
    student(x, t, ctx, r=r).square().sum().backward()
    assert student.interval_embedding[2].weight.grad.abs().max() > 0
    sd = teacher.state_dict()
    with pytest.raises(RuntimeError, match="unexpected"):
        student.load_teacher({**sd, "extra.weight": torch.zeros(1)})
    sd.pop("head.head.bias")
    with pytest.raises(RuntimeError, match="head.head.bias"):
        student.load_teacher(sd)
    with pytest.raises(RuntimeError, match="already present"):
        student.load_teacher(student.state_dict())


def test_student_state_dict_loads_strictly():
    torch.manual_seed(5)
    teacher = _randomize(_initialized(WanDiT.from_config("tiny", dtype=F64, num_layers=1)))
    sd = meanflow_student_state_dict(teacher.state_dict(), generator=torch.Generator().manual_seed(0))
    assert set(sd) - set(teacher.state_dict()) == set(MeanFlowWanDiT.new_keys())
    student = MeanFlowWanDiT.from_config("tiny", dtype=F64, num_layers=1)
    student.load_state_dict(sd, strict=True)
    assert sd["interval_embedding.0.weight"].std() > 0.01 and sd["interval_embedding.2.weight"].abs().max() == 0
    x, t, r, ctx = _inputs(student)
    with torch.no_grad():
        assert torch.equal(student(x, t, ctx, r=r), teacher(x, t, ctx))
    with pytest.raises(ValueError, match="interval keys"):
        meanflow_student_state_dict(sd)
