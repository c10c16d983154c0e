"""Triton backward of the fused DiT ops (rcm_kernels.fused): every input gradient vs float64 autograd through
the reference twin.

CPU: the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before any kernel
module is imported) in float32 (the interpreter mishandles bf16) and float64, at tiny odd sizes: L = 7 tokens,
C = 20 channels (neither a power of two nor a multiple of the block), 2 heads of 10. The reference is the twin's
primal evaluated in float64 (inputs upcast, compute dtypes float64) and differentiated by torch.autograd, an
implementation independent of the hand-written backward. Modulation rows as the DiT passes them (strided slices
of a ``[B, Tm, 6, C]`` table): one row per sample, per-frame rows through an index (sorted as in the DiT, and
unsorted), per-token rows (Tm = L); the token rows split among one or several programs per modulation row
(``MIN_ROWS`` lowered), so the per-program partial sums and empty chunks are exercised. float16 (where every
intermediate rounding shows): the Triton backward vs the recompute backward. The tiny WanDiT's gradients through
the Triton backward vs the unfused ops.
Offline (slow): every backward variant the DiT launches compiles for sm_90 with 16-byte vector access
(``test_fused_compile.py``'s check). GPU (``-m gpu``): bf16 at a DiT-like size, the Triton backward vs autograd
through the float32 twin fed the same bf16 inputs, and no less accurate than the recompute backward
(``RCM_FUSED_BACKWARD=reference``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import rcm_kernels.fused._launch as launch
from rcm_kernels.fused import apply_rope, gated_residual, gelu_tanh, layer_norm_modulate, rms_norm_rope
from rcm_kernels.fused import reference as R

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="interpreter grid: runs on CPU with TRITON_INTERPRET=1")
pytestmark = pytest.mark.usefixtures("one_thread")

f32, f64 = torch.float32, torch.float64
# Tolerance, relative to the gradient's largest entry (abs) and elementwise (rel). float32: one rounding is 6e-8;
# a gradient goes through a few ops and one C-term row reduction or a B·L-term token sum, observed <= 1.2e-7 of
# the max: 1e-5 leaves ~100x margin (a wrong term or a missed token is O(1)). float64: rounding only (~1e-16).
TOL = {f32: 1e-5, f64: 1e-12}
B, L, C, H = 2, 7, 20, 2
INDEX = {"per_frame": [0, 0, 0, 1, 1, 2, 2], "unsorted": [2, 0, 1, 1, 0, 2, 0], "per_token": [6, 5, 4, 3, 2, 1, 0]}


@pytest.fixture(params=["one", "many"])
def split(request, monkeypatch):
    """Token rows of a modulation row in one program, or in several (2 rows each, some chunks empty)."""
    if request.param == "many":
        monkeypatch.setattr(launch, "MIN_ROWS", 2)
    return request.param


def _grads(fn, inputs, need, gy=None):
    """Gradients of ``fn(*inputs)`` against ``gy`` (random float64 if None) w.r.t. the inputs with ``need``."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(n) for t, n in zip(inputs, need)]
    out = fn(*leaves)
    gy = torch.randn(out.shape, dtype=f64, device=out.device) if gy is None else gy
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wrt, gy.to(out.dtype)), gy


def check_grads(kernel, ref, inputs, need=None, names=None):
    """Every needed input gradient of ``kernel`` (Triton forward and backward) equals float64 autograd through
    ``ref`` (float64 twin) within ``TOL`` of the kernel's dtype."""
    need = need or [t is not None for t in inputs]
    ref_g, gy = _grads(ref, [None if t is None else t.double() for t in inputs], need)
    got, _ = _grads(kernel, inputs, need, gy)
    names = [n for n, t, k in zip(names or range(len(inputs)), inputs, need) if t is not None and k]
    ins = [t for t, k in zip(inputs, need) if t is not None and k]
    for name, a, b, t in zip(names, got, ref_g, ins):
        assert a.dtype == t.dtype and a.shape == t.shape, f"∂{name}: {a.dtype} {a.shape} vs input {t.dtype} {t.shape}"
        scale = b.abs().max().item()
        assert scale > 1e-3, f"∂{name}: vacuous (zero reference gradient)"
        tol = TOL[t.dtype]
        torch.testing.assert_close(a.double(), b, atol=tol * scale, rtol=tol, msg=lambda m, n=name: f"∂{n}: {m}")


def rnd(*shape, dtype=f32):
    return torch.randn(*shape, dtype=dtype)


LN_CASES = {  # (modulation rows: None | 1 | index name, affine)
    "sample": (1, False), "per_frame": ("per_frame", False), "unsorted": ("unsorted", False),
    "per_token": ("per_token", False), "affine": (None, True), "affine_per_frame": ("unsorted", True),
}


def _ln_call(fn, index, affine, modulated):
    def call(x, e6, w, b):  # e6 [B, Tm, 6, C]: shift and scale are strided slices of it, as in the DiT
        sh, sc = (e6[:, :, 0], e6[:, :, 1]) if modulated else (None, None)
        kw = dict(weight=w, bias=b) if affine else {}
        return fn(x, None, sh, None, sc, None, eps=1e-6, index=index, **kw)[0]
    return call


def _ln_inputs(dtype, rows, affine):
    index = None if rows in (None, 1) else torch.tensor(INDEX[rows])
    tm = 1 if index is None else int(index.max()) + 1
    e6 = rnd(B, tm, 6, C, dtype=dtype) if rows is not None else None
    return index, (rnd(B, L, C, dtype=dtype) * 2 + 1, e6, rnd(C, dtype=dtype) if affine else None,
                   rnd(C, dtype=dtype) if affine else None)


@interp
@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize("case", list(LN_CASES))
def test_layer_norm_modulate_grads(dtype, case, split):
    rows, affine = LN_CASES[case]
    index, ins = _ln_inputs(dtype, rows, affine)
    fast = _ln_call(lambda *a, **k: layer_norm_modulate(*a, **k, impl="triton"), index, affine, rows is not None)
    ref = _ln_call(R.layer_norm_modulate_reference, index, affine, rows is not None)
    check_grads(fast, ref, ins, names=["x", "e6", "weight", "bias"])


@interp
@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["x_only", "mod_only"])
def test_layer_norm_modulate_partial_needs(need):
    index, (x, e6, _, _) = _ln_inputs(f32, "per_frame", False)
    fast = _ln_call(lambda *a, **k: layer_norm_modulate(*a, **k, impl="triton"), index, False, True)
    ref = _ln_call(R.layer_norm_modulate_reference, index, False, True)
    check_grads(fast, ref, [x, e6, None, None], need=[*need, False, False], names=["x", "e6", "w", "b"])


GATE_CASES = {"sample": 1, "per_frame": "per_frame", "unsorted": "unsorted", "plain_add": None}


@interp
@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize("case", list(GATE_CASES))
@pytest.mark.parametrize("out", ["x", "wide"])
def test_gated_residual_grads(dtype, case, out, split):
    """``out="wide"``: output in float64 (the student's fp32 output over a narrower stream, here one step up),
    so ``∂x`` is a cast the kernel writes instead of the incoming gradient itself."""
    rows = GATE_CASES[case]
    index = None if rows in (None, 1) else torch.tensor(INDEX[rows])
    tm = 1 if index is None else int(index.max()) + 1
    od = f64 if out == "wide" else None

    def call(fn, compute):
        def f(x, y, e6):
            return fn(x, None, y, None, None if e6 is None else e6[:, :, 2], None, compute=compute, index=index,
                      out_dtype=od)[0]
        return f

    ins = [rnd(B, L, C, dtype=dtype), rnd(B, L, C, dtype=dtype), None if rows is None else rnd(B, tm, 6, C, dtype=dtype)]
    fast = call(lambda *a, **k: gated_residual(*a, **k, impl="triton"), od or dtype)
    check_grads(fast, call(R.gated_residual_reference, f64), ins, names=["x", "y", "e6"])


@interp
@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize("rope", [False, True])
def test_rms_norm_rope_grads(dtype, rope, split):
    ang = rnd(L, C // H // 2, dtype=f64) * 3
    cs = (torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)) if rope else (None, None)

    def call(fn):
        def f(x, w):
            return fn(x, None, w, eps=1e-6, heads=H, cos=None if cs[0] is None else cs[0].to(x.dtype),
                      sin=None if cs[1] is None else cs[1].to(x.dtype))[0]
        return f

    fast = call(lambda *a, **k: rms_norm_rope(*a, **k, impl="triton"))
    check_grads(fast, call(R.rms_norm_rope_reference), [rnd(B, L, C, dtype=dtype) * 3, rnd(C, dtype=dtype)],
                names=["x", "weight"])


@interp
@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["x_only", "weight_only"])
def test_rms_norm_rope_partial_needs(need):
    ang = rnd(L, C // H // 2, dtype=f64)
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()

    def call(fn):
        return lambda x, w: fn(x, None, w, eps=1e-6, heads=H, cos=cos.to(x.dtype), sin=sin.to(x.dtype))[0]

    fast = call(lambda *a, **k: rms_norm_rope(*a, **k, impl="triton"))
    check_grads(fast, call(R.rms_norm_rope_reference), [rnd(B, L, C), rnd(C)], need=list(need), names=["x", "w"])


@interp
@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's σ at x ~ -9 (exact: 0)
@pytest.mark.parametrize("dtype", [f32, f64])
def test_rope_and_gelu_grads(dtype):
    ang = rnd(L, C // H // 2, dtype=f64) * 3
    cos, sin = torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)
    check_grads(lambda x: apply_rope(x, None, cos, sin, impl="triton")[0],
                lambda x: R.rope_reference(x, None, cos.double(), sin.double())[0],
                [rnd(B, L, H, C // H, dtype=dtype)], names=["x"])
    # GELU over |x| up to ~9 (both tails) and a size that is not a multiple of the 2048-element block
    check_grads(lambda x: gelu_tanh(x, None, impl="triton")[0], lambda x: R.gelu_tanh_reference(x, None)[0],
                [rnd(3, 701, dtype=dtype) * 3], names=["x"])


@interp
def test_backward_is_deterministic_and_saves_only_inputs():
    index, (x, e6, _, _) = _ln_inputs(f32, "unsorted", False)
    x, e6 = x.requires_grad_(), e6.requires_grad_()
    gy = rnd(B, L, C)
    grads = []
    for _ in range(2):
        y = layer_norm_modulate(x, rnd(B, L, C), e6[:, :, 0], None, e6[:, :, 1], None, eps=1e-6, index=index,
                                impl="triton")[0]
        saved = [t for t in y.grad_fn.saved_tensors if t is not None]
        assert [t.data_ptr() for t in saved] == [x.data_ptr(), e6.data_ptr(), e6[:, :, 1].data_ptr()]
        assert y.grad_fn.bwd is not None, "the Triton backward must be selected after a Triton forward"
        grads.append(torch.autograd.grad(y, (x, e6), gy))
    for a, b in zip(*grads):
        assert torch.equal(a, b), "backward not deterministic"


def test_row_split_follows_the_index():
    """The token order of the modulation rows is kept for the last index; an in-place change must refresh it."""
    x, index = torch.zeros(1, L, 4), torch.tensor(INDEX["unsorted"])
    order, bounds, _ = launch.row_split(x, index, 3)
    assert order.tolist() == [1, 4, 6, 2, 3, 0, 5] and bounds.tolist() == [0, 3, 5, 7]
    assert launch.row_split(x, index, 3)[0] is order  # kept
    index.copy_(torch.tensor(INDEX["per_frame"]))
    order, bounds, _ = launch.row_split(x, index, 3)
    assert order.tolist() == list(range(L)) and bounds.tolist() == [0, 3, 5, 7]


@interp
def test_reference_backward_switch(monkeypatch):
    """``RCM_FUSED_BACKWARD=reference`` keeps the recompute backward; it agrees with the Triton one (float32,
    different reduction order: 1e-5 of the max); a bad value names the variable."""
    x, w = rnd(B, L, C).requires_grad_(), rnd(C).requires_grad_()
    gy = rnd(B, L, H, C // H)
    out = {}
    for impl in ("triton", "reference"):
        monkeypatch.setenv("RCM_FUSED_BACKWARD", impl)
        y = rms_norm_rope(x, None, w, eps=1e-6, heads=H, impl="triton")[0]
        assert (y.grad_fn.bwd is None) == (impl == "reference")
        out[impl] = torch.autograd.grad(y, (x, w), gy)
    for a, b in zip(out["triton"], out["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5)
    monkeypatch.setenv("RCM_FUSED_BACKWARD", "cuda")
    with pytest.raises(ValueError, match="RCM_FUSED_BACKWARD"):
        rms_norm_rope(x, None, w, eps=1e-6, heads=H, impl="triton")


def _half_cases():
    """(name, call, inputs) in float16 (fp32 modulation rows), each op as the DiT calls it."""
    h = torch.float16
    idx = torch.tensor(INDEX["per_frame"])
    x, y, w, b = rnd(B, L, C, dtype=h), rnd(B, L, C, dtype=h), rnd(C, dtype=h), rnd(C, dtype=h)
    e1, e3 = rnd(B, 1, 6, C), rnd(B, 3, 6, C)
    ang = rnd(L, C // H // 2, dtype=f64) * 3
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()

    def ln(index):
        return lambda x, e: layer_norm_modulate(x, None, e[:, :, 0], None, e[:, :, 1], None, eps=1e-6, index=index,
                                                out_dtype=h, impl="triton")[0]

    def gated(index, compute):
        return lambda x, y, e: gated_residual(x, None, y, None, e[:, :, 2], None, compute=compute, index=index,
                                              out_dtype=h, impl="triton")[0]

    yield "ln_sample", ln(None), [x, e1]
    yield "ln_per_frame", ln(idx), [x, e3]
    yield "ln_affine", lambda x, w, b: layer_norm_modulate(x, None, None, None, None, None, eps=1e-6, weight=w,
                                                           bias=b, impl="triton")[0], [x, w, b]
    for compute in (h, f32):
        yield f"gated_{compute}", gated(None, compute), [x, y, e1]
        yield f"gated_per_frame_{compute}", gated(idx, compute), [x, y, e3]
    yield "rms_norm_rope", lambda x, w: rms_norm_rope(x, None, w, eps=1e-6, heads=H, cos=cos, sin=sin,
                                                      impl="triton")[0], [x * 3, w]
    yield "rope", lambda x: apply_rope(x, None, cos, sin, impl="triton")[0], [x.unflatten(-1, (H, -1))]


@interp
def test_half_precision_gradients_round_where_the_twin_rounds(monkeypatch):
    """float16 (the interpreter's narrow float): the Triton backward vs the recompute backward, i.e. autograd
    through the float16 twin after the same kernel forward. float32/64 cannot see a misplaced rounding; here
    each intermediate rounds to float16 (2^-11), so a missing or extra rounding changes a large share of the
    row gradients. Bounds: row gradients ([B, L, C]) differ in <= 2% of the elements (observed <= 0.4%: the
    float32 reduction order flips a float16 rounding now and then) by <= 1e-3 of the max; per-channel sums
    within 1e-3 of the max (float32 partials vs the twin's float16 broadcast reduction: one rounding)."""
    for name, call, ins in _half_cases():
        got = {}
        for impl in ("triton", "reference"):
            monkeypatch.setenv("RCM_FUSED_BACKWARD", impl)
            gy = torch.randn(call(*ins).shape, generator=torch.Generator().manual_seed(1)).half()
            got[impl], _ = _grads(call, ins, [True] * len(ins), gy)
        for i, (a, b) in enumerate(zip(got["triton"], got["reference"])):
            assert a.dtype == b.dtype, f"{name} ∂{i}: {a.dtype} vs {b.dtype}"
            scale = b.float().abs().max().item()
            d = (a.float() - b.float()).abs()
            assert d.max().item() <= 1e-3 * scale, f"{name} ∂{i}: max diff {d.max().item() / scale:.3g} of max"
            if a.dim() >= 3 and a.shape[1] == L:  # a row gradient
                off = (d > 0).float().mean().item()
                assert off <= 0.02, f"{name} ∂{i}: {off:.1%} of the elements differ"


@interp
@pytest.mark.parametrize("precision", ["teacher", "student"])
@pytest.mark.parametrize("per_frame", [False, True])
def test_dit_gradients_through_the_triton_backward(monkeypatch, precision, per_frame):
    """The tiny WanDiT (one block, float32) through the fused ops (Triton forward and backward, interpreter) vs
    the unfused ops: the input and every parameter gradient within 1e-4 norm-relative (float32 reduction order,
    ~1e-6 observed; a mis-wired gradient is O(1)), and every op's Triton backward ran."""
    from importlib import import_module

    from rcm_nets.wan import WanDiT
    from rcm_nets.wan._ops import fused_ops

    calls = {}
    bwds = {"modulate_norm": "_triton_bwd", "gated_residual": "_triton_bwd", "rms_norm": "triton_rms_norm_rope_bwd",
            "gelu": "_triton_bwd"}
    for module, name in bwds.items():  # count the calls of each op's Triton backward
        mod = import_module(f"rcm_kernels.fused.{module}")
        f = getattr(mod, name)

        def counted(*a, _f=f, _k=module, **k):
            calls[_k] = calls.get(_k, 0) + 1
            return _f(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    monkeypatch.setenv("RCM_FUSED_IMPL", "triton")
    torch.manual_seed(1)
    net = WanDiT.from_config("tiny", dtype=f64, num_layers=1, precision=precision)
    net.init_weights()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))  # every parameter non-trivial, the zero head included
    net = net.float()
    x, ctx = rnd(2, 16, 2, 2, 4), rnd(2, 5, 32)
    t = torch.rand(2, 2) * 1000 if per_frame else torch.rand(2) * 1000
    w = None
    grads = {}
    for mode in ("on", "off"):
        net.zero_grad()
        xg = x.clone().requires_grad_()
        with fused_ops(mode):
            out = net(xg, t, ctx)
        w = torch.randn_like(out) if w is None else w
        (out * w).sum().backward()
        grads[mode] = {"x": xg.grad, **{n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}}
    assert set(calls) == set(bwds), f"Triton backward calls: {calls}"
    assert grads["on"].keys() == grads["off"].keys()
    for n, g in grads["off"].items():
        rel = ((grads["on"][n] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert rel < 1e-4, f"∂{n}: relative error {rel:.3g}"


# GPU: bf16 at a DiT-like size (1.3B width, 12 heads, 2 frames of 30x52 tokens), modulation rows fp32. The Triton
# backward and the recompute backward are both compared with autograd through the float32 twin fed the same bf16
# inputs (so only the bf16 roundings of the fused path differ). Bounds, norm-relative: the Triton gradient within
# 1e-2 of the float32 one (bf16 rounds to 2^-9 relative; a wrong term gives O(1)), and no less accurate than the
# recompute backward (<= 1.5x its error + 1e-4: the two round the same values, up to reduction order).
GB, GL, GC, GH = 1, 3120, 1536, 12
bf16 = torch.bfloat16


def gpu_check(monkeypatch, kernel, ref, inputs, names):
    need = [True] * len(inputs)
    ref_g, gy = _grads(ref, [t.float() for t in inputs], need)
    got = {}
    for impl in ("triton", "reference"):
        monkeypatch.setenv("RCM_FUSED_BACKWARD", impl)
        got[impl], _ = _grads(kernel, inputs, need, gy)
    for name, a, b, r in zip(names, got["triton"], got["reference"], ref_g):
        assert a.dtype == b.dtype and a.shape == r.shape, f"∂{name}: {a.dtype} {a.shape} vs {b.dtype} {r.shape}"
        err_t = ((a.double() - r.double()).norm() / r.double().norm()).item()
        err_r = ((b.double() - r.double()).norm() / r.double().norm()).item()
        assert err_t <= 1e-2 and err_t <= 1.5 * err_r + 1e-4, f"∂{name}: triton {err_t:.3g}, recompute {err_r:.3g}"


def _gpu_rnd(*shape, dtype=bf16):
    return torch.randn(*shape, dtype=dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("per_frame", [False, True])
def test_gpu_bf16_layer_norm_modulate_and_gated_residual(monkeypatch, per_frame):
    tm = 2 if per_frame else 1
    idx = (torch.arange(GL, device="cuda") >= GL // 2).long() if per_frame else None
    x, y, e6 = _gpu_rnd(GB, GL, GC), _gpu_rnd(GB, GL, GC), _gpu_rnd(GB, tm, 6, GC, dtype=f32)

    def ln(x, e6):
        return layer_norm_modulate(x, None, e6[:, :, 0], None, e6[:, :, 1], None, eps=1e-6, index=idx,
                                   out_dtype=x.dtype)[0]

    def ln_ref(x, e6):
        return R.layer_norm_modulate_reference(x, None, e6[:, :, 0], None, e6[:, :, 1], None, eps=1e-6, index=idx,
                                               out_dtype=x.dtype)[0]

    gpu_check(monkeypatch, ln, ln_ref, [x, e6], ["x", "e6"])
    for compute in (bf16, f32):  # teacher, student residual stream
        def gr(x, y, e6, fn=gated_residual, compute=compute):
            return fn(x, None, y, None, e6[:, :, 2], None, compute=compute if x.dtype == bf16 else f32, index=idx,
                      out_dtype=x.dtype)[0]

        gpu_check(monkeypatch, gr, lambda *a: gr(*a, fn=R.gated_residual_reference), [x, y, e6], ["x", "y", "e6"])


@pytest.mark.gpu
def test_gpu_bf16_affine_layer_norm_rms_norm_rope_gelu(monkeypatch):
    x, w, b = _gpu_rnd(GB, GL, GC), _gpu_rnd(GC), _gpu_rnd(GC)
    gpu_check(monkeypatch, lambda x, w, b: layer_norm_modulate(x, None, None, None, None, None, eps=1e-6, weight=w,
                                                               bias=b)[0],
              lambda x, w, b: R.layer_norm_modulate_reference(x, None, None, None, None, None, eps=1e-6, weight=w,
                                                              bias=b)[0], [x, w, b], ["x", "weight", "bias"])
    ang = torch.rand(GL, GC // GH // 2, device="cuda", dtype=f64) * 100
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
    gpu_check(monkeypatch, lambda x, w: rms_norm_rope(x, None, w, eps=1e-6, heads=GH, cos=cos, sin=sin)[0],
              lambda x, w: R.rms_norm_rope_reference(x, None, w, eps=1e-6, heads=GH, cos=cos, sin=sin)[0],
              [x, w], ["x", "weight"])
    x4 = x.unflatten(-1, (GH, -1))
    gpu_check(monkeypatch, lambda x: apply_rope(x, None, cos, sin)[0], lambda x: R.rope_reference(x, None, cos, sin)[0],
              [x4], ["x"])
    h = _gpu_rnd(GB, GL, 8960) * 3
    gpu_check(monkeypatch, lambda x: gelu_tanh(x, None)[0], lambda x: R.gelu_tanh_reference(x, None)[0], [h], ["x"])


def _bwd_variants():
    """(name, kernel, argument types, constexprs, warps) of each backward variant the DiT launches (bf16, C=1536)."""
    import triton.language as tl

    from rcm_kernels.fused.gated_residual import _gated_bwd
    from rcm_kernels.fused.gelu import _gelu_bwd
    from rcm_kernels.fused.modulate_norm import _ln_mod_bwd
    from rcm_kernels.fused.rms_norm import _rms_rope_bwd

    i32 = "i32"
    ln = dict(X="*bf16", GY="*bf16", W="*bf16", BIAS="*bf16", SC="*fp32", ORDER="*i64", BOUNDS="*i64", DX="*bf16",
              PSH="*fp32", PSC="*fp32", PW="*fp32", PB="*fp32", L=i32, C=i32, K=i32, eps="fp32", s_scb=i32, s_sct=i32)
    base = dict(ISL=tl.float32, MDT=tl.float32, NEED_DX=True, BLOCK_C=2048)
    for idx in (False, True):
        c = dict(base, HAS_W=False, HAS_B=False, HAS_MOD=True, HAS_IDX=idx, NEED_MOD=True, NEED_AFF=False, W=None,
                 BIAS=None, PW=None, PB=None, **({} if idx else dict(ORDER=None, BOUNDS=None)))
        yield f"layer_norm_modulate per_frame={idx}", _ln_mod_bwd, ln, c, 8
    c = dict(base, HAS_W=True, HAS_B=True, HAS_MOD=False, HAS_IDX=False, NEED_MOD=False, NEED_AFF=True, SC=None,
             PSH=None, PSC=None, ORDER=None, BOUNDS=None)
    yield "layer_norm affine", _ln_mod_bwd, ln, c, 8
    gated = dict(GO="*bf16", Yb="*bf16", G="*fp32", ORDER="*i64", BOUNDS="*i64", DX="*fp32", DY="*bf16", PG="*fp32",
                 L=i32, C=i32, K=i32, s_gb=i32, s_gt=i32)
    for cdt, need_dx in ((tl.bfloat16, False), (tl.float32, True)):
        c = dict(CDT=cdt, WIDE=tl.float32, HAS_IDX=False, NEED_DX=need_dx, NEED_DY=True, NEED_G=True, BLOCK_C=2048,
                 ORDER=None, BOUNDS=None, **({} if need_dx else dict(DX=None)))
        yield f"gated_residual compute={cdt}", _gated_bwd, gated, c, 8
    rms = dict(X="*bf16", GY="*bf16", W="*bf16", COS="*fp32", SIN="*fp32", DX="*bf16", PW="*fp32", L=i32, C=i32,
               K=i32, s_cos=i32, s_sin=i32, eps="fp32")
    for norm, rope in ((True, True), (True, False), (False, True)):
        c = dict(HALF_D=64, ISL=tl.float32, RDT=tl.float32, NORM=norm, ROPE=rope, NEED_DX=True, NEED_W=norm,
                 BLOCK_P=1024, **({} if norm else dict(W=None, PW=None)), **({} if rope else dict(COS=None, SIN=None)))
        yield f"rms_norm_rope norm={norm} rope={rope}", _rms_rope_bwd, rms, c, 4
    yield ("gelu_tanh", _gelu_bwd, dict(X="*bf16", GY="*bf16", DX="*bf16", N=i32), dict(ISL=tl.float32, BLOCK=2048),
           8)


@pytest.mark.slow
def test_backward_kernels_compile_for_sm90_with_vector_access():
    """Compiled by triton's own compiler (no GPU; a subprocess without the interpreter): each DiT variant of the
    backward kernels must build for sm_90 and move activations in 16-byte vectors only (~6 s)."""
    from test_fused_compile import compiles_in_subprocess  # this folder is on the path (pytest and script)

    compiles_in_subprocess(__file__)


if __name__ == "__main__":
    from test_fused_compile import report

    sys.exit(report(_bwd_variants(), "all backward variants vectorized"))
