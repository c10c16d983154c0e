"""Public attention API on CPU (reference dispatch): autograd, forward AD, torch.func, masks, library backends."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwad

from rcm_kernels import Attention, attention, block_causal, jvp_attention, teacher_forcing
from rcm_kernels.attention import attention_reference
from rcm_kernels.attention.backends import resolve_backend, sdpa_like_attention


def _naive(q, k, v, mask=None):
    """Independent softmax attention in plain torch ops: [B, L, H, D]; autograd/forward AD derive its JVP."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def _rand(*shape, n=6):
    return [torch.randn(*shape, dtype=torch.float64) for _ in range(n)]


def test_func_jvp_and_forward_ad_match_naive_jvp():
    q, k, v, tq, tk, tv = _rand(2, 9, 3, 16)
    want_o, want_t = torch.func.jvp(_naive, (q, k, v), (tq, tk, tv))
    got_o, got_t = torch.func.jvp(attention, (q, k, v), (tq, tk, tv))
    # float64 on both sides: only summation order differs (~1e-16 relative)
    torch.testing.assert_close(got_o, want_o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_t, want_t, atol=1e-12, rtol=1e-12)
    with fwad.dual_level():
        out = attention(fwad.make_dual(q, tq), fwad.make_dual(k, tk), fwad.make_dual(v, tv))
        torch.testing.assert_close(fwad.unpack_dual(out).tangent, want_t, atol=1e-12, rtol=1e-12)
    o2, t2 = jvp_attention(q, k, v, tq, tk, tv)
    torch.testing.assert_close(t2, want_t, atol=1e-12, rtol=1e-12)


def test_some_tangents_none_equal_zero_tangents():
    q, k, v, tq, tk, tv = _rand(1, 7, 2, 16)
    _, want = torch.func.jvp(_naive, (q, k, v), (torch.zeros_like(q), tk, torch.zeros_like(v)))
    _, got = jvp_attention(q, k, v, None, tk, None)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    out, none = jvp_attention(q, k, v)
    assert none is None
    torch.testing.assert_close(out, _naive(q, k, v), atol=1e-12, rtol=1e-12)


def test_gradcheck_with_block_mask():
    mask = block_causal(3, 1, 3)  # 9 tokens, three blocks
    q, k, v = (x.requires_grad_() for x in _rand(1, 9, 2, 16, n=3))
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, block_mask=mask), (q, k, v), fast_mode=True)
    dense = mask.dense(9, 9, "cpu")
    do = torch.randn_like(q)
    got = torch.autograd.grad(attention(q, k, v, block_mask=mask), (q, k, v), do)
    want = torch.autograd.grad(_naive(q, k, v, dense), (q, k, v), do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


def test_torch_func_grad_and_no_grad():
    q, k, v = _rand(1, 5, 1, 16, n=3)
    g = torch.func.grad(lambda q: attention(q, k, v).square().sum())(q)
    want = torch.func.grad(lambda q: _naive(q, k, v).square().sum())(q)
    torch.testing.assert_close(g, want, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        out, tangent = jvp_attention(q.requires_grad_(), k, v, q, None, None)
    assert out.grad_fn is None and tangent is not None


def test_jvp_attention_out_has_grad_and_tangent_is_detached():
    q, k, v, tq, _, _ = _rand(1, 6, 2, 16)
    q.requires_grad_()
    out, tangent = jvp_attention(q, k, v, tq)
    assert out.requires_grad and not tangent.requires_grad
    (g,) = torch.autograd.grad(out.sum(), q)
    (want,) = torch.autograd.grad(_naive(q, k, v).sum(), q)
    torch.testing.assert_close(g, want, atol=1e-12, rtol=1e-12)


def test_seam_and_mask_objects():
    mask = teacher_forcing(2, 1, 4)
    q, k, v, tq, tk, tv = _rand(1, 16, 2, 16)
    out, tangent = Attention()(q, k, v, tq, tk, tv, block_mask=mask)
    ref = attention_reference(q, k, v, tq, tk, tv, mask=mask.dense(16, 16, "cpu"))
    torch.testing.assert_close(out, ref.out, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(tangent, ref.tangent, atol=1e-12, rtol=1e-12)


def test_impl_selection_errors(monkeypatch):
    q, k, v = _rand(1, 4, 1, 16, n=3)
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, k, v, impl="cuda")
    monkeypatch.setenv("RCM_JVP_IMPL", "reference")
    torch.testing.assert_close(attention(q, k, v), _naive(q, k, v), atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------------------ backends


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_sdpa_backends_match_reference(backend):
    mask = block_causal(2, 2, 3, first_block_frames=1)  # 9 tokens
    q, k, v = (torch.randn(2, 9, 2, 16) for _ in range(3))
    got = sdpa_like_attention(q, k, v, block_mask=mask, backend=backend)
    want = attention_reference(*(x.double() for x in (q, k, v)), mask=mask).out
    # fp32 SDPA vs float64 math over 9 keys: ~1e-7; 1e-5 margin
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_env_routes_plain_attention(monkeypatch):
    q, k, v = (torch.randn(1, 6, 2, 16) for _ in range(3))
    monkeypatch.setenv("RCM_ATTENTION_BACKEND", "math")
    assert resolve_backend() == "math"
    got, tangent = jvp_attention(q, k, v)
    assert tangent is None
    torch.testing.assert_close(got.double(), _naive(*(x.double() for x in (q, k, v))), atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("RCM_ATTENTION_BACKEND", "nope")
    with pytest.raises(ValueError, match="RCM_ATTENTION_BACKEND"):
        attention(q, k, v)


def test_flash_attn_backend_says_how_to_install():
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ImportError, match="pip install flash-attn"):
        sdpa_like_attention(q, q, q, backend="flash_attn")
    with pytest.raises(ValueError, match="takes no block mask"):
        sdpa_like_attention(q, q, q, backend="flash_attn", block_mask=block_causal(2, 1, 2))
