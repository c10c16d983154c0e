"""Causal sCM: WanDiT's hand-written JVP with a block mask against torch.func.jvp of the masked forward.

Independent reference: ``torch.func.jvp`` of the plain masked forward with every attention routed to plain
torch math (``attention_reference`` with the same mask's dense twin), so forward-mode autograd differentiates
ordinary ops, while ``forward_jvp`` (also over a packed teacher-forcing sequence) propagates tangents through
the hand-written rules and the JVP attention with the mask. float64: both are exact up to rounding, 1e-10
catches a wrong formula, a mask dropped from the tangent path or a nonzero context tangent.
"""

import pytest
import torch
from _plain_attention import plain_torch_attention

from rcm_kernels.blockmask import BlockLayout, teacher_forcing_positions
from rcm_nets.wan import WanDiT

F64 = torch.float64
TOL = 1e-10
B, C, H, W, HW = 1, 16, 4, 4, 4


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(11)
    net = WanDiT.from_config("tiny", num_layers=1, dtype=F64)  # one layer: the mask acts per layer
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return net


def _inputs(frames):
    x, tx = torch.randn(B, C, frames, H, W, dtype=F64), torch.randn(B, C, frames, H, W, dtype=F64)
    t = torch.rand(B, frames, dtype=F64) * 1000
    return x, tx, t, torch.randn(B, frames, dtype=F64), torch.randn(B, 5, 32, dtype=F64)


def test_forward_jvp_block_causal_per_frame_times(net):
    layout = BlockLayout(2, first_block_frames=1)
    mask = layout.mask(3, HW)
    x, tx, t, tt, ctx = _inputs(5)
    out, tout = net.forward_jvp(x, t, ctx, tx, tt, block_mask=mask)
    with plain_torch_attention(net):
        ref, tref = torch.func.jvp(lambda a, b: net(a, b, ctx, block_mask=mask), (x, t), (tx, tt))
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(tout, tref, atol=TOL, rtol=TOL)
    _, t_bidir = net.forward_jvp(x, t, ctx, tx, tt)
    assert (t_bidir - tout).abs().max() > 1e-3  # the mask changes the tangent: the check is not vacuous


def _packed(net, xc, xn, tn, ctx, mask, tangents=None):
    """The teacher-forcing pass over ``[clean ; noisy]`` (clean at time 0, both halves at RoPE positions
    ``0..T-1``); returns the noisy half (and its tangent, zero tangent on the clean half)."""
    x, t = torch.cat([xc, xn], dim=2), torch.cat([torch.zeros_like(tn), tn], dim=1)
    pos, half = teacher_forcing_positions(xn.shape[2]), xn.shape[2]
    if tangents is None:
        return net(x, t, ctx, block_mask=mask, frame_pos=pos)[:, :, half:]
    tx, tt = torch.cat([torch.zeros_like(tangents[0]), tangents[0]], 2), torch.cat([torch.zeros_like(tn), tangents[1]], 1)
    out, tout = net.forward_jvp(x, t, ctx, tx, tt, block_mask=mask, frame_pos=pos)
    return out[:, :, half:], tout[:, :, half:]


def test_teacher_forcing_jvp(net):
    """Packed [clean ; noisy] with the teacher-forcing mask; tangents only on the noisy half."""
    layout = BlockLayout(2)
    mask = layout.mask(2, HW, teacher_forcing=True)
    xn, tx, tn, tt, ctx = _inputs(4)
    xc = torch.randn_like(xn)
    out, tout = _packed(net, xc, xn, tn, ctx, mask, tangents=(tx, tt))
    with plain_torch_attention(net):
        ref, tref = torch.func.jvp(lambda a, b: _packed(net, xc, a, b, ctx, mask), (xn, tn), (tx, tt))
    torch.testing.assert_close(out, ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(tout, tref, atol=TOL, rtol=TOL)
    # block 0 of the noisy half sees no clean frame: it equals a plain pass over noisy block 0 alone
    with torch.no_grad():
        alone = net(xn[:, :, :2], tn[:, :2], ctx)
    torch.testing.assert_close(out[:, :, :2], alone, atol=TOL, rtol=TOL)
    # block 1 sees clean block 0: changing it changes block 1 only
    out2 = _packed(net, xc + 1, xn, tn, ctx, mask)
    torch.testing.assert_close(out2[:, :, :2], out[:, :, :2], atol=TOL, rtol=TOL)
    assert (out2[:, :, 2:] - out[:, :, 2:]).abs().max() > 1e-3
