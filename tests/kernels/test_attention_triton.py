"""Triton JVP attention vs the float64 reference: O, Ȯ, LSE and dq/dk/dv, with and without block masks.

CPU: the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) at tiny sizes in
fp32/fp16 (bf16 is broken in the interpreter). GPU (``-m gpu``): the same checks at real sizes in bf16/fp16.
"""

from __future__ import annotations

import os

import pytest
import torch

from rcm_kernels import block_causal, sliding_window, teacher_forcing
from rcm_kernels.attention import attention, jvp_attention
from rcm_kernels.attention.reference import attention_reference, attention_reference_backward

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRET, reason="interpreter grid: runs on CPU with TRITON_INTERPRET=1")
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy overflow warnings of exp2(-inf)

# (dtype, atol, rtol) for the interpreter grid.
# fp32: fp32 accumulation over <= 64 keys; observed max error ~1e-6 on O(1) values, 2e-5 leaves 20x margin.
# fp16: outputs are rounded to fp16 (2^-11 relative) and P, P⊙Ṡ are cast to fp16 before the PV matmuls
#       (2^-11 relative each); observed max ~1.1e-3 on values up to ~4, so 5e-3 abs + 5e-3 rel.
CPU_DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 5e-3, 5e-3)]
TANGENTS = {"all": (True, True, True), "q_v": (True, False, True), "k_only": (False, True, False)}


def rand_qkv(b, lq, lk, h, d, dtype, device, tangents=(True, True, True), strided=False):
    """q, k, v and their tangents (None where not wanted); ``strided``: non-contiguous BLHD views."""
    def mk(length):
        if strided:  # a [B, H, L, D] buffer viewed as [B, L, H, D]
            return torch.randn(b, h, length, d, dtype=dtype, device=device).transpose(1, 2)
        return torch.randn(b, length, h, d, dtype=dtype, device=device)

    q, k, v = mk(lq), mk(lk), mk(lk)
    return (q, k, v, *(mk(x.shape[1]) if want else None for x, want in zip((q, k, v), tangents)))


def _f64(x):
    return None if x is None else x.double()


def assert_close(name, got, ref, atol, rtol):
    """Elementwise ``|got - ref| <= atol + rtol |ref|``; the failure message lists the worst entries."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    got, ref = got.double().cpu(), ref.double().cpu()
    assert torch.isfinite(got).eq(torch.isfinite(ref)).all(), f"{name}: non-finite pattern differs"
    fin = torch.isfinite(ref)
    assert (got[~fin] == ref[~fin]).all(), f"{name}: infinite entries differ"
    got, ref = got.where(fin, 0.0), ref.where(fin, 0.0)
    excess = (got - ref).abs() - (atol + rtol * ref.abs())
    if (excess > 0).any():
        worst = excess.flatten().topk(min(5, excess.numel())).indices.tolist()
        rows = [f"{tuple(int(j) for j in torch.unravel_index(torch.tensor(i), got.shape))}: got "
                f"{got.flatten()[i]:.6g} ref {ref.flatten()[i]:.6g}" for i in worst]
        raise AssertionError(f"{name}: {(excess > 0).sum()} of {excess.numel()} outside atol={atol} rtol={rtol},"
                             f" max |diff| {(got - ref).abs().max():.3g}\n  " + "\n  ".join(rows))


def assert_rel(name, got, ref, tol):
    """Norm-relative error ``‖got − ref‖ / ‖ref‖ <= tol`` (for bf16 on the GPU, METHOD: 1e-3..1e-2)."""
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel <= tol, f"{name}: relative error {rel:.3g} > {tol}"


def check_against_reference(q, k, v, tq, tk, tv, mask, cmp, backward=True):
    """Run kernel forward (+ backward) and compare everything that flows out with float64 math."""
    out, tangent = jvp_attention(q, k, v, tq, tk, tv, block_mask=mask, impl="triton")
    ref = attention_reference(*map(_f64, (q, k, v, tq, tk, tv)), mask=mask)
    cmp("out", out, ref.out)
    if tangent is None:
        assert ref.tangent is None
    else:
        cmp("tangent", tangent, ref.tangent)
    from rcm_kernels.attention import triton_jvp

    res = triton_jvp.jvp_attention_fwd(q, k, v, block_mask=mask)
    cmp("lse", res.lse, ref.lse)
    if backward:
        do = torch.randn_like(out)
        got = triton_jvp.attention_bwd(do, q, k, v, res.out, res.lse, block_mask=mask)
        want = attention_reference_backward(*map(_f64, (q, k, v, ref.out)), ref.lse, do.double(), mask=mask)
        for name, g, w in zip(("dq", "dk", "dv"), got, want):
            cmp(name, g, w)


# ------------------------------------------------------------------------------------- interpreter grid

SHAPES = [  # (B, Lq, Lk, H, D, strided): odd lengths, Lq != Lk both ways, B > 1, H > 1, non-contiguous
    (1, 37, 37, 1, 16, False),
    (2, 20, 45, 2, 32, True),
    (1, 33, 17, 3, 16, False),
]


@interp
@pytest.mark.parametrize("tangents", list(TANGENTS))
@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])) + ("_strided" if s[5] else ""))
def test_unmasked_matches_reference(shape, dtype, atol, rtol, tangents):
    b, lq, lk, h, d, strided = shape
    q, k, v, tq, tk, tv = rand_qkv(b, lq, lk, h, d, dtype, "cpu", TANGENTS[tangents], strided)
    cmp = lambda n, g, r: assert_close(n, g, r, atol, rtol)  # noqa: E731
    check_against_reference(q, k, v, tq, tk, tv, None, cmp, backward=tangents == "all")


def _small_masks():
    # tokens_per_frame 7/5/3: block boundaries fall inside the 16-wide interpreter tiles (partial tiles)
    return {"block_causal_c1-2": block_causal(3, 2, 7, first_block_frames=1),
            "teacher_forcing": teacher_forcing(3, 1, 5),
            "sliding_window_sink": sliding_window(5, 1, 7, window_blocks=2, sink_blocks=1)}


@interp
@pytest.mark.parametrize("tangents", ["all", "q_v"])
@pytest.mark.parametrize("dtype, atol, rtol", CPU_DTYPES)
@pytest.mark.parametrize("mask_name", list(_small_masks()))
def test_masked_matches_reference(mask_name, dtype, atol, rtol, tangents):
    mask = _small_masks()[mask_name]
    L = mask.num_tokens
    q, k, v, tq, tk, tv = rand_qkv(1, L, L, 2, 16, dtype, "cpu", TANGENTS[tangents])
    cmp = lambda n, g, r: assert_close(n, g, r, atol, rtol)  # noqa: E731
    check_against_reference(q, k, v, tq, tk, tv, mask, cmp, backward=tangents == "all")


@interp
def test_lazy_rescale_variant_matches_reference(monkeypatch):
    monkeypatch.setenv("RCM_JVP_LAZY_RESCALE", "1")  # the non-default kernel switch stays correct
    mask = _small_masks()["teacher_forcing"]
    q, k, v, tq, tk, tv = rand_qkv(1, mask.num_tokens, mask.num_tokens, 1, 16, torch.float32, "cpu")
    q = q * 4  # sharper softmax: the running max grows by > 2^8 at some tiles, not at others
    cmp = lambda n, g, r: assert_close(n, g, r, 2e-5, 2e-5)  # noqa: E731
    check_against_reference(q, k, v, tq, tk, tv, mask, cmp, backward=False)
    check_against_reference(q, k, v, tq, tk, tv, None, cmp, backward=False)


@interp
def test_fully_masked_rows_give_zero_and_minus_inf_lse():
    # queries in block 4 with a 1-block window, keys only up to block 1: nothing is visible to them
    mask = sliding_window(5, 1, 4, window_blocks=1, q_offset=16)
    q, k, v, tq, tk, tv = rand_qkv(1, 4, 8, 1, 16, torch.float32, "cpu")
    cmp = lambda n, g, r: assert_close(n, g, r, 2e-5, 2e-5)  # noqa: E731
    check_against_reference(q, k, v, tq, tk, tv, mask, cmp)
    out, tangent = jvp_attention(q, k, v, tq, tk, tv, block_mask=mask, impl="triton")
    assert out.abs().max() == 0 and tangent.abs().max() == 0


@interp
def test_func_jvp_forward_ad_and_backward_run_the_kernel():
    q, k, v, tq, tk, tv = rand_qkv(1, 21, 21, 2, 16, torch.float16, "cpu")
    mask = block_causal(3, 1, 7)
    fn = lambda q, k, v: attention(q, k, v, block_mask=mask, impl="triton")  # noqa: E731
    _, kernel_tangent = jvp_attention(q, k, v, tq, tk, tv, block_mask=mask, impl="triton")
    # the forward-AD rule runs the same kernel on the same inputs: bitwise equal (the fp16 reference is not)
    _, func_tangent = torch.func.jvp(fn, (q, k, v), (tq, tk, tv))
    assert torch.equal(func_tangent, kernel_tangent)
    ref_tangent = attention_reference(q, k, v, tq, tk, tv, mask=mask).tangent
    assert not torch.equal(ref_tangent, kernel_tangent)
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        dual = fn(fwad.make_dual(q, tq), fwad.make_dual(k, tk), fwad.make_dual(v, tv))
        assert torch.equal(fwad.unpack_dual(dual).tangent, kernel_tangent)
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    fn(qq, kk, vv).backward(do)
    ref = attention_reference(*map(_f64, (q, k, v)), mask=mask)
    want = attention_reference_backward(*map(_f64, (q, k, v, ref.out)), ref.lse, do.double(), mask=mask)
    for name, g, w in zip(("dq", "dk", "dv"), (qq.grad, kk.grad, vv.grad), want):
        assert_close(name, g, w, 5e-3, 5e-3)


@interp
def test_jvp_attention_output_is_differentiable_and_tangent_detached():
    q, k, v, tq, tk, tv = rand_qkv(1, 17, 17, 1, 16, torch.float32, "cpu")
    qq = q.clone().requires_grad_()
    out, tangent = jvp_attention(qq, k, v, tq, None, tv, impl="triton")
    assert out.requires_grad and not tangent.requires_grad
    out.sum().backward()
    ref = attention_reference(*map(_f64, (q, k, v, tq, None, tv)))
    assert_close("tangent", tangent, ref.tangent, 2e-5, 2e-5)  # fp32 tolerance of CPU_DTYPES
    dq, _, _ = attention_reference_backward(*map(_f64, (q, k, v, ref.out)), ref.lse, torch.ones_like(ref.out))
    assert_close("dq", qq.grad, dq, 2e-5, 2e-5)
    with torch.no_grad():
        out, tangent = jvp_attention(q, k, v, None, None, None, impl="triton")
    assert tangent is None and out.grad_fn is None


@interp
def test_forced_triton_names_the_problem():
    q, k, v, *_ = rand_qkv(1, 8, 8, 1, 24, torch.float32, "cpu")
    with pytest.raises(ValueError, match="power of two"):
        jvp_attention(q, k, v, impl="triton")
    q, k, v, *_ = rand_qkv(1, 8, 8, 1, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="block-sparse"):
        attention(q, k, v, block_mask=torch.ones(8, 8, dtype=torch.bool), impl="triton")
    with pytest.raises(ValueError, match="shape"):
        jvp_attention(q, k, v, torch.randn(1, 9, 1, 16), impl="triton")


# ---------------------------------------------------------------------------------------------- GPU grid

# bf16: outputs and P/H rounded to 8 mantissa bits; norm-relative error of bf16-operand matmuls is 1e-3..1e-2
# (METHOD.md), so 1.5e-2. fp16 has 3 more mantissa bits: 4e-3.
GPU_DTYPES = [(torch.bfloat16, 1.5e-2), (torch.float16, 4e-3)]
GPU_SHAPES = [  # (B, Lq, Lk, H, D, strided)
    (2, 1000, 1000, 3, 64, False),
    (1, 4100, 512, 2, 128, True),  # cross-attention to 512 text tokens, odd Lq
    (1, 777, 1531, 2, 256, False),
    (1, 2049, 2049, 2, 16, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("tangents", ["all", "q_v"])
@pytest.mark.parametrize("dtype, tol", GPU_DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_gpu_unmasked_matches_reference(shape, dtype, tol, tangents):
    b, lq, lk, h, d, strided = shape
    q, k, v, tq, tk, tv = rand_qkv(b, lq, lk, h, d, dtype, "cuda", TANGENTS[tangents], strided)
    check_against_reference(q, k, v, tq, tk, tv, None, lambda n, g, r: assert_rel(n, g, r, tol),
                            backward=tangents == "all")


def _real_masks():
    # 1560 tokens/frame: boundaries are not multiples of any tile size
    return {"block_causal_c1-2": block_causal(3, 2, 1560, first_block_frames=1),
            "teacher_forcing": teacher_forcing(2, 1, 1560),
            "sliding_window_sink": sliding_window(4, 1, 1560, window_blocks=2, sink_blocks=1)}


@pytest.mark.gpu
@pytest.mark.parametrize("tangents", ["all", "q_v"])
@pytest.mark.parametrize("dtype, tol", GPU_DTYPES)
@pytest.mark.parametrize("mask_name", list(_real_masks()))
def test_gpu_masked_matches_reference(mask_name, dtype, tol, tangents):
    mask = _real_masks()[mask_name]
    L = mask.num_tokens
    q, k, v, tq, tk, tv = rand_qkv(1, L, L, 2, 128, dtype, "cuda", TANGENTS[tangents])
    check_against_reference(q, k, v, tq, tk, tv, mask, lambda n, g, r: assert_rel(n, g, r, tol),
                            backward=tangents == "all")


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["triton", "flash", "cudnn"])
def test_gpu_backward_variants_fed_our_lse_match(monkeypatch, which):
    from rcm_kernels.attention import triton_jvp

    q, k, v, *_ = rand_qkv(1, 3001, 1777, 2, 128, torch.bfloat16, "cuda", strided=which == "triton")
    res = triton_jvp.jvp_attention_fwd(q, k, v)
    do = torch.randn_like(res.out)
    monkeypatch.setenv("RCM_ATTN_BWD", which)
    got = triton_jvp.attention_bwd(do, q, k, v, res.out, res.lse)
    ref = attention_reference(*map(_f64, (q, k, v)))
    want = attention_reference_backward(*map(_f64, (q, k, v, ref.out)), ref.lse, do.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert_rel(f"{which} {name}", g, w, 1.5e-2)


@pytest.mark.gpu
def test_gpu_our_lse_is_the_one_cudnn_saves():
    from rcm_kernels.attention import triton_jvp

    q, k, v, *_ = rand_qkv(1, 1000, 1000, 2, 128, torch.bfloat16, "cuda")
    res = triton_jvp.jvp_attention_fwd(q, k, v)
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, scale=q.shape[-1] ** -0.5)
    assert_rel("lse", res.lse, cudnn[1].reshape(res.lse.shape).float(), 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("flags", [{"RCM_JVP_TMA": "1"}, {"RCM_JVP_TMA": "0"}, {"RCM_JVP_LAZY_RESCALE": "1"},
                                   {"RCM_JVP_TMA": "1", "RCM_JVP_LAZY_RESCALE": "1"}], ids=str)
def test_gpu_kernel_switches_match_reference(monkeypatch, flags):
    for key, val in flags.items():
        monkeypatch.setenv(key, val)
    mask = _real_masks()["teacher_forcing"]
    L = mask.num_tokens
    for m, lk in ((mask, L), (None, L - 77)):  # masked, and unmasked with a ragged key length
        q, k, v, tq, tk, tv = rand_qkv(1, L, lk, 2, 128, torch.bfloat16, "cuda")
        check_against_reference(q, k, v, tq, tk, tv, m, lambda n, g, r: assert_rel(n, g, r, 1.5e-2),
                                backward=False)


@pytest.mark.gpu
def test_gpu_autograd_paths_use_the_kernel():
    q, k, v, tq, tk, tv = rand_qkv(1, 1000, 1000, 2, 128, torch.bfloat16, "cuda")
    _, kernel_tangent = jvp_attention(q, k, v, tq, tk, tv)
    _, func_tangent = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    assert torch.equal(func_tangent, kernel_tangent)


@pytest.mark.gpu
def test_gpu_new_length_does_not_recompile():
    from rcm_kernels.attention import triton_jvp

    caches = getattr(triton_jvp._jvp_attn_fwd, "device_caches", None)
    if caches is None:
        pytest.skip("this triton version does not expose JITFunction.device_caches")
    count = lambda: sum(len(c[0]) for c in caches.values())  # noqa: E731
    for L in (1000, 1003, 4097, 777):
        q, k, v, tq, tk, tv = rand_qkv(1, L, L, 2, 64, torch.bfloat16, "cuda")
        jvp_attention(q, k, v, tq, tk, tv)
        if L == 1000:
            first = count()
    assert count() == first, "a new sequence length compiled a new kernel"
