"""Fused DiT ops (rcm_kernels.fused): Triton kernels vs their reference twins, tangents vs torch.func.jvp,
backward vs finite differences.

CPU: the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before any kernel
module is imported) at tiny sizes. Independent references:
  * the reference twin in the same dtype (fp32, fp16): same op sequence and roundings, different reduction
    order, so the primal and tangent agree up to reduction noise;
  * ``torch.func.jvp`` of the float64 reference primal (forward-mode autograd, not the hand-written tangent
    formulas) against the kernel run in float64;
  * ``torch.autograd.gradcheck`` (float64 finite differences) of the kernel's forward against its backward.
GPU (``-m gpu``): the kernel vs the reference in bf16 at a DiT-like size, and the primal bit-identical with and
without tangents.
"""

from __future__ import annotations

import os

import pytest
import torch

from rcm_kernels.fused import apply_rope, gated_residual, gelu_tanh, layer_norm_modulate, rms_norm_rope
from rcm_kernels.fused import reference as R

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="interpreter grid: runs on CPU with TRITON_INTERPRET=1")
pytestmark = pytest.mark.usefixtures("one_thread")

# (dtype, atol, rtol) kernel vs same-dtype reference. fp32: the row reductions (mean, variance, mean square,
# mean(n·ẋ)) are summed in another order; observed max ~1e-6 on O(1)-O(10) values, 1e-5 abs + 1e-5 rel leaves
# 10x margin. fp16: outputs round to fp16 (2^-11 relative); a reduction-order difference can flip one rounding,
# so 1 ulp: 1e-3 rel + 1e-3 abs.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-3, 1e-3)]
F64_TOL = 1e-10  # kernel in float64 vs torch.func.jvp of the float64 reference: rounding only (~1e-15)
B, L, C, H, TM = 2, 5, 24, 2, 3  # odd L, C not a power of two, 3 modulation rows
INDEX = torch.tensor([0, 0, 1, 2, 2])


def close(name, got, ref, atol, rtol):
    assert got.dtype == ref.dtype, f"{name}: dtype {got.dtype} vs {ref.dtype}"
    torch.testing.assert_close(got.double(), ref.double(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


def _ln_args(dtype, mdt, tangents, per_frame, affine, modulated):
    tm = TM if per_frame else 1
    x, tx = rnd(B, L, C, dtype=dtype), (rnd(B, L, C, dtype=dtype) if "x" in tangents else None)
    mods = [rnd(B, tm, C, dtype=mdt) if modulated and (k in ("sh", "sc") or k in tangents) else None
            for k in ("sh", "tsh", "sc", "tsc")]
    kw = dict(eps=1e-6, index=INDEX if per_frame and modulated else None)
    if affine:
        kw.update(weight=rnd(C, dtype=dtype), bias=rnd(C, dtype=dtype))
    return (x, tx, *mods), kw


LN_CASES = {  # (tangents, per_frame, affine, modulated)
    "block": ("x,tsh,tsc", False, False, True), "per_frame": ("x,tsh,tsc", True, False, True),
    "x_only": ("x", True, False, True), "mod_only": ("tsh,tsc", False, False, True),
    "no_tangent": ("", True, False, True), "affine_ln": ("x", False, True, False),
}


@interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", list(LN_CASES))
@pytest.mark.parametrize("out_dtype", [None, "x"])
def test_layer_norm_modulate_matches_reference(dtype, atol, rtol, case, out_dtype):
    tang, per_frame, affine, modulated = LN_CASES[case]
    args, kw = _ln_args(dtype, torch.float32, tang.split(","), per_frame, affine, modulated)
    kw["out_dtype"] = dtype if out_dtype else None
    y, ty = layer_norm_modulate(*args, **kw, impl="triton")
    ry, rty = R.layer_norm_modulate_reference(*args, **kw)
    close("primal", y, ry, atol, rtol)
    assert (ty is None) == (rty is None) == (tang == "")
    if ty is not None:
        close("tangent", ty, rty, atol, rtol)


@interp
@pytest.mark.parametrize("case", ["block", "per_frame", "affine_ln"])
def test_layer_norm_modulate_tangent_is_the_jvp(case):
    tang, per_frame, affine, modulated = LN_CASES[case]
    f64 = torch.float64
    (x, tx, sh, tsh, sc, tsc), kw = _ln_args(f64, f64, tang.split(","), per_frame, affine, modulated)
    y, ty = layer_norm_modulate(x, tx, sh, tsh, sc, tsc, **kw, impl="triton")
    z = lambda t: torch.zeros_like(x) if t is None else t  # noqa: E731
    if modulated:
        ry, rty = torch.func.jvp(lambda a, s, c: R.layer_norm_modulate_reference(a, None, s, None, c, None, **kw)[0],
                                 (x, sh, sc), (tx, tsh, tsc))
    else:
        ry, rty = torch.func.jvp(lambda a: R.layer_norm_modulate_reference(a, None, None, None, None, None, **kw)[0],
                                 (x,), (z(tx),))
    assert rty.abs().max() > 1e-2, "vacuous: zero reference tangent"
    close("primal", y, ry, F64_TOL, F64_TOL)
    close("tangent", ty, rty, F64_TOL, F64_TOL)


@interp
@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_modulate_backward_gradcheck(affine):
    f64 = torch.float64
    x, sh, sc = rnd(1, 3, 8, dtype=f64), rnd(1, 2, 8, dtype=f64), rnd(1, 2, 8, dtype=f64)
    w, b = rnd(8, dtype=f64), rnd(8, dtype=f64)
    idx = torch.tensor([0, 1, 1])
    ins = (x, sh, sc, w, b) if affine else (x, sh, sc)
    ins = tuple(t.requires_grad_() for t in ins)

    def f(x, sh, sc, w=None, b=None):
        return layer_norm_modulate(x, None, sh, None, sc, None, eps=1e-6, weight=w, bias=b, index=idx,
                                   impl="triton")[0]

    assert torch.autograd.gradcheck(f, ins, fast_mode=True)


GATED_CASES = {"all": "x,y,g", "y_g": "y,g", "x_only": "x", "none": ""}


@interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", list(GATED_CASES))
@pytest.mark.parametrize("compute", ["x", "float32"])
@pytest.mark.parametrize("per_frame", [False, True])
def test_gated_residual_matches_reference(dtype, atol, rtol, case, compute, per_frame):
    tang = GATED_CASES[case].split(",")
    x, y = rnd(B, L, C, dtype=dtype), rnd(B, L, C, dtype=dtype)
    tx, ty = (rnd(B, L, C, dtype=dtype) if k in tang else None for k in "xy")
    g, tg = rnd(B, TM if per_frame else 1, C), (rnd(B, TM if per_frame else 1, C) if "g" in tang else None)
    kw = dict(compute=dtype if compute == "x" else torch.float32, index=INDEX if per_frame else None,
              out_dtype=dtype)
    out, tout = gated_residual(x, tx, y, ty, g, tg, **kw, impl="triton")
    rout, rtout = R.gated_residual_reference(x, tx, y, ty, g, tg, **kw)
    close("primal", out, rout, 0, 0)  # elementwise, same roundings: exact
    assert (tout is None) == (rtout is None) == (case == "none")
    if tout is not None:
        close("tangent", tout, rtout, 0, 0)


@interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("case", ["all", "y_g", "none"])
def test_plain_residual_add_matches_reference(dtype, atol, rtol, case):
    """``gate=None``: the residual add ``x + y`` (cross-attention residual), in fp32 or the input dtype."""
    tang = GATED_CASES[case].split(",")
    x, y = rnd(B, L, C, dtype=dtype), rnd(B, L, C, dtype=dtype)
    tx, ty = (rnd(B, L, C, dtype=dtype) if k in tang else None for k in "xy")
    for compute in (dtype, torch.float32):
        out, tout = gated_residual(x, tx, y, ty, None, None, compute=compute, out_dtype=compute, impl="triton")
        rout, rtout = R.gated_residual_reference(x, tx, y, ty, None, None, compute=compute, out_dtype=compute)
        close("primal", out, rout, 0, 0)
        close("primal vs torch", out, x.to(compute) + y.to(compute), 0, 0)
        assert (tout is None) == (rtout is None) == (case == "none")
        if tout is not None:
            close("tangent", tout, rtout, 0, 0)


@interp
def test_gated_residual_tangent_is_the_jvp_and_backward_gradchecks():
    f64 = torch.float64
    x, y, tx, ty = (rnd(B, L, C, dtype=f64) for _ in range(4))
    g, tg = rnd(B, TM, C, dtype=f64), rnd(B, TM, C, dtype=f64)
    kw = dict(compute=f64, index=INDEX)
    out, tout = gated_residual(x, tx, y, ty, g, tg, **kw, impl="triton")
    rout, rtout = torch.func.jvp(lambda a, b, c: R.gated_residual_reference(a, None, b, None, c, None, **kw)[0],
                                 (x, y, g), (tx, ty, tg))
    close("primal", out, rout, F64_TOL, F64_TOL)
    close("tangent", tout, rtout, F64_TOL, F64_TOL)
    ins = tuple(rnd(1, 3, 4, dtype=f64).requires_grad_() for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: gated_residual(a, None, b, None, c, None, compute=f64,
                                                                   index=torch.tensor([0, 1, 2]), impl="triton")[0],
                                    ins, fast_mode=True)


def _rope_tables(dtype=torch.float32, length=L, half=C // H // 2):
    ang = rnd(length, half, dtype=torch.float64) * 3
    return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


@interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("tangent", [False, True])
def test_rms_norm_rope_matches_reference(dtype, atol, rtol, rope, tangent):
    x, w = rnd(B, L, C, dtype=dtype), rnd(C, dtype=dtype)
    tx = rnd(B, L, C, dtype=dtype) if tangent else None
    cos, sin = _rope_tables() if rope else (None, None)
    y, ty = rms_norm_rope(x, tx, w, eps=1e-6, heads=H, cos=cos, sin=sin, impl="triton")
    ry, rty = R.rms_norm_rope_reference(x, tx, w, eps=1e-6, heads=H, cos=cos, sin=sin)
    assert y.shape == (B, L, H, C // H)
    close("primal", y, ry, atol, rtol)
    assert (ty is None) == (rty is None) == (not tangent)
    if tangent:
        close("tangent", ty, rty, atol, rtol)


@interp
@pytest.mark.parametrize("rope", [False, True])
def test_rms_norm_rope_tangent_is_the_jvp_and_backward_gradchecks(rope):
    f64 = torch.float64
    x, tx, w = rnd(B, L, C, dtype=f64), rnd(B, L, C, dtype=f64), rnd(C, dtype=f64)
    cos, sin = _rope_tables(f64) if rope else (None, None)
    kw = dict(eps=1e-6, heads=H, cos=cos, sin=sin)
    y, ty = rms_norm_rope(x, tx, w, **kw, impl="triton")
    ry, rty = torch.func.jvp(lambda a: R.rms_norm_rope_reference(a, None, w, **kw)[0], (x,), (tx,))
    close("primal", y, ry, F64_TOL, F64_TOL)
    close("tangent", ty, rty, F64_TOL, F64_TOL)
    xs, ws = rnd(1, 2, 8, dtype=f64).requires_grad_(), rnd(8, dtype=f64).requires_grad_()
    cs = _rope_tables(f64, 2, 2) if rope else (None, None)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm_rope(a, None, b, eps=1e-6, heads=2, cos=cs[0], sin=cs[1],
                                                               impl="triton")[0], (xs, ws), fast_mode=True)


@interp
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_rope_matches_reference_and_jvp(dtype, atol, rtol):
    x, tx = rnd(B, L, H, C // H, dtype=dtype), rnd(B, L, H, C // H, dtype=dtype)
    cos, sin = _rope_tables()
    y, ty = apply_rope(x, tx, cos, sin, impl="triton")
    ry, rty = R.rope_reference(x, tx, cos, sin)
    close("primal", y, ry, 0, 0)  # elementwise, same roundings: exact
    close("tangent", ty, rty, 0, 0)
    f64 = torch.float64
    x, tx = x.double(), tx.double()
    c64, s64 = _rope_tables(f64)
    y, ty = apply_rope(x, tx, c64, s64, impl="triton")
    ry, rty = torch.func.jvp(lambda a: R.rope_reference(a, None, c64, s64)[0], (x,), (tx,))
    close("tangent f64", ty, rty, F64_TOL, F64_TOL)
    xs = rnd(1, 2, 2, 4, dtype=f64).requires_grad_()
    cs = _rope_tables(f64, 2, 2)
    assert torch.autograd.gradcheck(lambda a: apply_rope(a, None, *cs, impl="triton")[0], (xs,), fast_mode=True)


@interp
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 2e-5, 1e-5), (torch.float16, 1e-3, 1e-3)])
def test_gelu_tanh_matches_float64_and_jvp(dtype, atol, rtol):
    """The kernel evaluates the derivative in fp32 and rounds once, so it is compared with the float64 twin
    (the same-dtype twin rounds op by op). fp32: ``1 − σ`` near σ = 1 loses ~ulp(1) = 6e-8, times ~2·9·10 at
    |x| ~ 9: 2e-5 abs; fp16: one ulp of the output."""
    x, tx = rnd(B, L, 37, dtype=dtype) * 3, rnd(B, L, 37, dtype=dtype)
    y, ty = gelu_tanh(x, tx, impl="triton")
    ry, rty = R.gelu_tanh_reference(x.double(), tx.double())
    close("primal", y, ry.to(dtype), atol, rtol)
    close("tangent", ty, rty.to(dtype), atol, rtol)
    x, tx = x.double(), tx.double()
    y, ty = gelu_tanh(x, tx, impl="triton")
    ry, rty = torch.func.jvp(lambda a: torch.nn.functional.gelu(a, approximate="tanh"), (x,), (tx,))
    close("primal f64", y, ry, F64_TOL, F64_TOL)
    close("tangent f64", ty, rty, F64_TOL, F64_TOL)
    assert torch.autograd.gradcheck(lambda a: gelu_tanh(a, None, impl="triton")[0],
                                    (rnd(2, 5, dtype=torch.float64).requires_grad_(),), fast_mode=True)


def test_primal_keeps_grad_and_tangent_is_detached():
    x = rnd(B, L, C).requires_grad_()
    sh, sc, tsc = rnd(B, 1, C), rnd(B, 1, C).requires_grad_(), rnd(B, 1, C)
    impl = "triton" if INTERPRET else "reference"
    y, ty = layer_norm_modulate(x, rnd(B, L, C), sh, None, sc, tsc, eps=1e-6, impl=impl)
    assert y.requires_grad and not ty.requires_grad
    (y * rnd(B, L, C)).sum().backward()
    assert x.grad is not None and sc.grad is not None and sc.grad.abs().sum() > 0
    with torch.no_grad():
        y, _ = layer_norm_modulate(x, None, sh, None, sc, None, eps=1e-6, impl=impl)
    assert not y.requires_grad


def test_bad_input_names_the_argument():
    x = rnd(B, L, C)
    with pytest.raises(ValueError, match="scale must be"):
        layer_norm_modulate(x, None, rnd(B, 1, C), None, rnd(B, 2, C), None, eps=1e-6)
    with pytest.raises(ValueError, match="index must be"):
        gated_residual(x, None, x, None, rnd(B, 3, C), None, compute=torch.float32, index=torch.arange(2))
    with pytest.raises(ValueError, match="cos must be"):
        rms_norm_rope(x, None, rnd(C), eps=1e-6, heads=H, cos=rnd(L, 3), sin=rnd(L, 3))
    with pytest.raises(ValueError, match="unknown impl"):
        gated_residual(x, None, x, None, rnd(B, 1, C), None, compute=torch.float32, impl="cuda")
    with pytest.raises(ValueError, match="cannot run this call"):
        rms_norm_rope(x, None, rnd(C, dtype=torch.float64), eps=1e-6, heads=H, impl="triton")


# GPU: bf16 at a DiT-like size (1.3B width, 12 heads, 2 frames of 30x52 tokens). The kernel and the reference
# round the same float32 values, which differ only by the reduction order (~1e-6 relative), so now and then an
# intermediate bf16 rounding (the normalized value, before modulation or rotation) flips by one ulp, and the
# modulation/rotation can scale that flip up against a small output. Hence: norm-relative error <= 1e-3
# (observed flips give ~1e-5; a wrong kernel gives O(1)) and at least 99.9% of the elements within 1e-2 abs + rel.
GB, GL, GC, GH = 1, 3120, 1536, 12
bf16 = torch.bfloat16


def close_bf16(name, got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape, f"{name}: {got.dtype} {got.shape} vs {ref.dtype} {ref.shape}"
    got, ref = got.double(), ref.double()
    rel = ((got - ref).norm() / ref.norm()).item()
    off = ((got - ref).abs() > 1e-2 + 1e-2 * ref.abs()).double().mean().item()
    assert rel <= 1e-3 and off <= 1e-3, f"{name}: norm-relative error {rel:.3g}, {off:.3g} of elements off"


@pytest.mark.gpu
def test_gpu_bf16_layer_norm_modulate_and_gated_residual():
    dev = "cuda"
    x, tx, y, ty = (torch.randn(GB, GL, GC, device=dev, dtype=bf16) for _ in range(4))
    mods = [torch.randn(GB, 2, GC, device=dev) for _ in range(6)]
    idx = (torch.arange(GL, device=dev) >= GL // 2).long()
    a = layer_norm_modulate(x, tx, *mods[:4], eps=1e-6, index=idx, out_dtype=bf16)
    ra = R.layer_norm_modulate_reference(x, tx, *mods[:4], eps=1e-6, index=idx, out_dtype=bf16)
    close_bf16("ln primal", a[0], ra[0])
    close_bf16("ln tangent", a[1], ra[1])
    plain, _ = layer_norm_modulate(x, None, mods[0], None, mods[2], None, eps=1e-6, index=idx, out_dtype=bf16)
    assert torch.equal(plain, a[0]), "primal must not depend on the tangent"
    for compute in (bf16, torch.float32):
        g = gated_residual(x, tx, y, ty, mods[4], mods[5], compute=compute, index=idx)
        rg = R.gated_residual_reference(x, tx, y, ty, mods[4], mods[5], compute=compute, index=idx)
        close("gated primal", g[0], rg[0], 0, 0)  # elementwise, the same roundings
        close("gated tangent", g[1], rg[1], 0, 0)  # no FMA contraction in the kernels: the same roundings


@pytest.mark.gpu
def test_gpu_bf16_rms_norm_rope():
    dev = "cuda"
    x, tx = (torch.randn(GB, GL, GC, device=dev, dtype=bf16) for _ in range(2))
    w = torch.randn(GC, device=dev, dtype=bf16)
    ang = torch.rand(GL, GC // GH // 2, device=dev, dtype=torch.float64) * 100
    cos, sin = torch.cos(ang).float(), torch.sin(ang).float()
    y, ty = rms_norm_rope(x, tx, w, eps=1e-6, heads=GH, cos=cos, sin=sin)
    ry, rty = R.rms_norm_rope_reference(x, tx, w, eps=1e-6, heads=GH, cos=cos, sin=sin)
    close_bf16("primal", y, ry)
    close_bf16("tangent", ty, rty)
    assert torch.equal(rms_norm_rope(x, None, w, eps=1e-6, heads=GH, cos=cos, sin=sin)[0], y)
    xg = x.clone().requires_grad_()
    rms_norm_rope(xg, None, w, eps=1e-6, heads=GH, cos=cos, sin=sin)[0].float().square().sum().backward()
    xr = x.clone().requires_grad_()
    R.rms_norm_rope_reference(xr, None, w, eps=1e-6, heads=GH, cos=cos, sin=sin)[0].float().square().sum().backward()
    close_bf16("grad", xg.grad, xr.grad)  # Triton backward vs the twin's autograd: same roundings, reduction order


@interp
def test_func_jvp_through_the_fused_op_sees_the_tangent():
    """Under torch.func.jvp the op must not drop the transform's tangent (it runs the reference twin)."""
    x, tx, w = rnd(B, L, C), rnd(B, L, C), rnd(C)
    y, ty = torch.func.jvp(lambda a: rms_norm_rope(a, None, w, eps=1e-6, heads=H, impl="triton")[0], (x,), (tx,))
    _, rty = R.rms_norm_rope_reference(x, tx, w, eps=1e-6, heads=H)
    close("tangent", ty, rty, 1e-5, 1e-5)
