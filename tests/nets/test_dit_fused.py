"""WanDiT with the fused DiT ops (rcm_kernels.fused, switched by rcm_nets.wan._ops.fused_ops) vs the unfused ops.

CPU: with ``fused_ops("on")`` the fused entry points run their reference twins, which keep the unfused op
sequence, so forward and forward_jvp must equal the unfused network bit for bit (teacher and student numerics,
one time per sample and per-frame times): any mis-wired modulation row, gate, tangent or cast shows up. The
Triton kernels themselves (interpreter, ``RCM_FUSED_IMPL=triton``) agree up to float32 reduction order.
GPU (``-m gpu``): bf16 on CUDA, the kernels vs the unfused ops; bound stated at the test.
"""

import pytest
import torch

from rcm_nets.wan import WanDiT
from rcm_nets.wan._ops import fused_ops, use_fused

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(dtype=torch.float32, device="cpu", precision="teacher", num_layers=2) -> WanDiT:
    torch.manual_seed(1)
    net = WanDiT.from_config("tiny", dtype=torch.float64, num_layers=num_layers, precision=precision)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))  # every parameter non-trivial, the zero head included
    return net.to(device, dtype)


def _inputs(dtype, device, per_frame, frames=3, h=4, w=6):
    x = torch.randn(2, 16, frames, h, w, dtype=dtype, device=device)
    t = torch.rand(*((2, frames) if per_frame else (2,)), device=device) * 1000
    ctx = torch.randn(2, 5, 32, dtype=dtype, device=device)
    return x, t, ctx, torch.randn_like(x), torch.randn_like(t) * 100


def _both(net, x, t, ctx, tx, tt, mode):
    with torch.no_grad(), fused_ops(mode):
        return net(x, t, ctx), *net.forward_jvp(x, t, ctx, tx, tt)


@pytest.mark.parametrize("precision", ["teacher", "student"])
@pytest.mark.parametrize("per_frame", [False, True])
def test_fused_reference_path_equals_unfused_bitwise(precision, per_frame):
    net = _net(precision=precision)
    args = _inputs(torch.float32, "cpu", per_frame)
    fused, unfused = _both(net, *args, "on"), _both(net, *args, "off")
    for name, a, b in zip(("forward", "jvp primal", "jvp tangent"), fused, unfused):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max():.3g}"
    assert unfused[2].abs().max() > 1e-3, "vacuous: zero tangent"


def test_fused_reference_path_equals_unfused_bitwise_i2v():
    """i2v: the CLIP image branch (its own k/v projections with qk-norm, no RoPE) through the fused path."""
    torch.manual_seed(1)
    net = WanDiT.from_config("tiny-i2v", dtype=torch.float64, num_layers=1)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    net = net.float()
    cfg = net.config
    x = torch.randn(1, cfg.out_dim, 2, 4, 4)
    kw = dict(y=torch.randn(1, cfg.in_dim - cfg.out_dim, 2, 4, 4), clip_fea=torch.randn(1, 3, 1280))
    t, ctx, tx, tt = torch.tensor([300.0]), torch.randn(1, 5, cfg.text_dim), torch.randn_like(x), torch.tensor([50.0])
    out = {}
    for mode in ("on", "off"):
        with torch.no_grad(), fused_ops(mode):
            out[mode] = (net(x, t, ctx, **kw), *net.forward_jvp(x, t, ctx, tx, tt, **kw))
    for name, a, b in zip(("forward", "jvp primal", "jvp tangent"), out["on"], out["off"]):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max():.3g}"


@pytest.mark.parametrize("per_frame", [False, True])
def test_fused_triton_interpreter_matches_unfused(monkeypatch, per_frame):
    """The kernels (interpreter) inside the network: float32, differences only from reduction order, ~1e-6
    relative per op; 1e-4 relative to the output scale over two blocks leaves a wide margin."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (CPU)")
    monkeypatch.setenv("RCM_FUSED_IMPL", "triton")
    net = _net(num_layers=1)
    args = _inputs(torch.float32, "cpu", per_frame, frames=2, h=2, w=4)
    fused, unfused = _both(net, *args, "on"), _both(net, *args, "off")
    assert torch.equal(fused[0], fused[1]), "fused: the JVP pass's primal must equal the plain forward"
    for name, a, b in zip(("forward", "jvp primal", "jvp tangent"), fused, unfused):
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel < 1e-4, f"{name}: relative error {rel:.3g}"


def test_switch():
    x = torch.zeros(1)
    with fused_ops("on"):
        assert use_fused(x)
    with fused_ops("off"):
        assert not use_fused(x)
    with fused_ops("auto"):
        assert not use_fused(x)  # CPU tensor
    with pytest.raises(ValueError, match="fused_ops"):
        with fused_ops("yes"):
            pass


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["teacher", "student"])
@pytest.mark.parametrize("per_frame", [False, True])
def test_gpu_bf16_fused_equals_unfused_within_bf16_noise(precision, per_frame):
    """bf16 on CUDA. The norm/modulation/residual/RoPE kernels round the same float32 values as the unfused
    ops, up to reduction order, so a bf16 rounding flips by one ulp (2^-8 relative) here and there and compounds
    over the blocks; the GELU tangent differs more, because the unfused one evaluates its derivative op by op in
    bf16 (~10 roundings) while the kernel rounds once. Bounds, max error relative to the output scale: fused vs
    unfused < 1e-2 for the outputs and < 3e-2 for the tangent; against the float64 network, the fused error is
    at most 1.5x the unfused one + 5e-3 (it must not be less accurate). The JVP primal is not compared bitwise
    with the plain forward here: on CUDA the plain pass uses another attention kernel (the fused ops' own
    primal is tangent-free: tests/kernels/test_fused_ops.py)."""
    net = _net(torch.bfloat16, "cuda", precision)
    args = _inputs(torch.bfloat16, "cuda", per_frame, frames=3, h=16, w=16)
    fused, unfused = _both(net, *args, "auto"), _both(net, *args, "off")
    ref = _both(_net(torch.float64, "cuda", precision), *(a.double() for a in args), "off")

    def rel(a, b):
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

    for name, a, b, r, bound in zip(("forward", "jvp primal", "jvp tangent"), fused, unfused, ref,
                                    (1e-2, 1e-2, 3e-2)):
        assert rel(a, b) < bound, f"{name}: fused vs unfused relative error {rel(a, b):.3g}"
        assert rel(a, r) <= 1.5 * rel(b, r) + 5e-3, f"{name}: fused {rel(a, r):.3g} vs unfused {rel(b, r):.3g}"


@pytest.mark.gpu
def test_gpu_fused_student_backward_matches_unfused():
    """Gradients of a bf16 student forward through the fused ops (backward: the Triton kernels) vs unfused;
    bound: norm-relative error 2e-2 per parameter tensor (bf16 noise compounded by the backward)."""
    net = _net(torch.bfloat16, "cuda", "student")
    x, t, ctx, _, _ = _inputs(torch.bfloat16, "cuda", False, frames=3, h=16, w=16)
    grads = {}
    for mode in ("auto", "off"):
        net.zero_grad()
        with fused_ops(mode):
            net(x, t, ctx).float().square().mean().backward()
        grads[mode] = {n: p.grad.double().clone() for n, p in net.named_parameters() if p.grad is not None}
    assert grads["auto"].keys() == grads["off"].keys()
    for n, g in grads["off"].items():
        rel = ((grads["auto"][n] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert rel < 2e-2, f"{n}: relative gradient error {rel:.3g}"
