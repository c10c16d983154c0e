"""Masked primal attention through FlexAttention ("flex") and its flash-attn-4 backend ("flex_fa4").

CPU: the Flex ``BlockMask`` of every mask kind against the dense twin, tile by tile (full tiles skip the
``mask_mod`` in compiled kernels, so a tile wrongly listed as full would pass an eager check); the "flex"
backend (torch's eager, unfused Flex path) against the float64 reference, forward only (torch has no CPU Flex
backward: that gives one clear error); compiled Flex on CPU (which does use the block lists); install errors.
GPU (``-m gpu``, an H200): flex / flex_fa4 / flash_attn in bf16 at 1.3B geometry (H=12, D=128, 1560-token
frames) against an fp32 reference, forward and backward.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rcm_kernels import block_causal, sliding_window, teacher_forcing
from rcm_kernels.attention import attention_reference
from rcm_kernels.attention.backends import sdpa_like_attention


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package
        return False


# (name, mask, lq, lk); frames of 5 or 7 tokens put block boundaries inside the 8/16-token tiles
CPU_CASES = {
    "block_causal_c1-2": (block_causal(3, 2, 5, first_block_frames=1), 25, 25),
    "teacher_forcing": (teacher_forcing(3, 1, 7), 42, 42),
    "sliding_window_sink": (sliding_window(5, 1, 7, window_blocks=2, sink_blocks=1), 35, 35),
    "block_causal_q_offset": (block_causal(4, 2, 5, first_block_frames=1, q_offset=15), 10, 25),
}


def _expand(fb, lq: int, lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``[lq, lk]`` pattern a block-sparse kernel applies for a Flex ``BlockMask`` (full tiles: all keys;
    partial tiles: ``mask_mod``; unlisted tiles: none), from the kv-side lists and from the q-side ones."""
    bq, bk = fb.BLOCK_SIZE
    q_idx, kv_idx = torch.meshgrid(torch.arange(lq), torch.arange(lk), indexing="ij")
    mod = fb.mask_mod(0, 0, q_idx, kv_idx)
    tiles_kv = torch.zeros(2, -(-lq // bq), -(-lk // bk), dtype=torch.bool)  # [full|part, nq, nk]
    for kind, (num, idx) in enumerate(((fb.full_kv_num_blocks, fb.full_kv_indices),
                                       (fb.kv_num_blocks, fb.kv_indices))):
        for i in range(tiles_kv.shape[1]):
            tiles_kv[kind, i, idx[0, 0, i, :num[0, 0, i]].long()] = True
    tiles_q = torch.zeros_like(tiles_kv)
    for kind, (num, idx) in enumerate(((fb.full_q_num_blocks, fb.full_q_indices),
                                       (fb.q_num_blocks, fb.q_indices))):
        for j in range(tiles_q.shape[2]):
            tiles_q[kind, idx[0, 0, j, :num[0, 0, j]].long(), j] = True
    out = []
    for tiles in (tiles_kv, tiles_q):
        assert not (tiles[0] & tiles[1]).any(), "a tile is listed as both full and partial"
        full, part = (t.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:lq, :lk] for t in tiles)
        out.append(full | (part & mod))
    return out[0], out[1]


@pytest.mark.parametrize("block_size", [8, 16, 128])
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_flex_block_mask_tiles_apply_the_dense_mask(case, block_size):
    m, lq, lk = CPU_CASES[case]
    fb = m.flex(lq, lk, "cpu", block_size=block_size)
    dense = m.dense(lq, lk, "cpu")
    from_kv, from_q = _expand(fb, lq, lk)
    assert torch.equal(from_kv, dense), "forward (kv-side) block lists disagree with the dense mask"
    assert torch.equal(from_q, dense), "backward (q-side) block lists disagree with the dense mask"
    assert fb.shape[-2:] == (lq, lk)


def test_flex_mask_mod_indexes_captured_tensors_by_query_alone():
    """flash-attn-4's lowering of a ``mask_mod`` (Flex ``BACKEND="FLASH"``) turns every index of a captured
    tensor into a register value and fails on a constant one (``iv[q_idx, 0]``: "Expected TensorSSA, but got
    int"); the mask_mod must read 1-D tensors with ``q_idx`` only. Checked on the traced graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    mask = block_causal(3, 2, 5, first_block_frames=1)
    fb = mask.flex(25, 25, "cpu", block_size=8)
    graph = make_fx(lambda q, k: fb.mask_mod(0, 0, q, k))(torch.tensor([3, 9]), torch.tensor([4, 1])).graph
    reads = [n for n in graph.nodes if n.op == "call_function"
             and n.target in (torch.ops.aten.index.Tensor, torch.ops.aten.select.int)]
    assert reads, "the mask_mod reads no captured tensor: the check would be vacuous"
    for node in reads:
        assert node.target is torch.ops.aten.index.Tensor, f"constant index into a captured tensor: {node.format_node()}"
        assert node.args[0].meta["val"].dim() == 1, f"captured tensor read is not 1-D: {node.format_node()}"
        assert node.args[1][0].op == "placeholder", f"captured tensor not indexed by q_idx: {node.format_node()}"


@pytest.mark.slow  # the first eager Flex call pays ~6 s of one-off tracing
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_flex_backend_forward_matches_float64_reference(case):
    m, lq, lk = CPU_CASES[case]
    q = torch.randn(2, lq, 2, 16, dtype=torch.float64)
    k, v = (torch.randn(2, lk, 2, 16, dtype=torch.float64) for _ in range(2))
    got = sdpa_like_attention(q, k, v, block_mask=m, backend="flex", scale=0.3)
    want = attention_reference(q, k, v, mask=m, scale=0.3).out
    # float64 on both sides over <= 42 keys: observed <= 1e-15; 1e-12 leaves room for summation order only
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.slow  # torch.compile of the Flex kernel on CPU (C++ codegen): ~12 s
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compiled_flex_on_cpu_uses_the_block_lists():
    # the compiled CPU kernel skips unlisted tiles and runs full ones unmasked (the eager path does not)
    from torch.nn.attention.flex_attention import flex_attention

    m = teacher_forcing(2, 1, 45)  # 180 tokens; block edges at 45/90/135 inside 32-token tiles
    L = m.num_tokens
    q, k, v = (torch.randn(1, L, 2, 16) for _ in range(3))
    fn = torch.compile(flex_attention, dynamic=False)
    got = fn(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=m.flex(L, L, "cpu", block_size=32))
    want = attention_reference(*(x.double() for x in (q, k, v)), mask=m).out
    # fp32 kernel vs float64 over <= 135 keys: observed ~2e-7; 1e-5 margin
    torch.testing.assert_close(got.transpose(1, 2).double(), want, atol=1e-5, rtol=1e-5)


def test_flex_backward_on_cpu_is_one_clear_error():
    m, lq, lk = CPU_CASES["block_causal_c1-2"]
    q = torch.randn(1, lq, 1, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backend 'flex' has no backward on CPU") as err:
        sdpa_like_attention(q, q, q, block_mask=m, backend="flex")
    assert "\n" not in str(err.value)
    with pytest.raises(TypeError, match="rcm_kernels.blockmask mask"):
        sdpa_like_attention(q, q, q, block_mask=m.dense(lq, lk, "cpu"), backend="flex")


def test_flex_fa4_on_cpu_is_one_clear_error():
    m, lq, _ = CPU_CASES["block_causal_c1-2"]
    q = torch.randn(1, lq, 1, 16)
    with pytest.raises(ValueError, match="runs on CUDA only") as err:
        sdpa_like_attention(q, q, q, block_mask=m, backend="flex_fa4")
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(_has("flash_attn.cute"), reason="flash-attn-4 is installed here")
def test_flex_fa4_says_how_to_install():
    m, lq, _ = CPU_CASES["block_causal_c1-2"]
    qc = torch.randn(1, lq, 1, 16, device="cuda")
    with pytest.raises(ImportError, match="pip install --pre flash-attn-4 nvidia-cutlass-dsl") as err:
        sdpa_like_attention(qc, qc, qc, block_mask=m, backend="flex_fa4")
    assert "\n" not in str(err.value)


def test_flash_attn_backend_lists_every_install_line():
    if _has("flash_attn_interface") or _has("flash_attn"):
        pytest.skip("a flash-attn package is installed here")
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ImportError, match="flash-attn-4") as err:
        sdpa_like_attention(q, q, q, backend="flash_attn")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------ GPU

H, D, TPF = 12, 128, 1560  # Wan2.1-1.3B heads / head dim, tokens per latent frame
GPU_MASKS = {
    "block_causal_3x3frames": lambda: block_causal(3, 3, TPF),  # 14040 tokens, blocks of 4680
    "teacher_forcing_3x1frames": lambda: teacher_forcing(3, 1, TPF),  # [clean ; noisy], 9360 tokens
}
FWD_REL, BWD_REL = 1e-2, 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error ``|a - b| / |b|`` in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _reference_fp32(q, k, v, mask, d_out, heads_per_chunk: int = 4):
    """fp32 reference output and q/k/v gradients for ``d_out`` (heads in chunks to bound the L x L memory)."""
    outs, grads = [], []
    for h0 in range(0, q.shape[2], heads_per_chunk):
        sl = slice(h0, h0 + heads_per_chunk)
        qs, ks, vs = (x[:, :, sl].float().requires_grad_() for x in (q, k, v))
        o = attention_reference(qs, ks, vs, mask=mask).out
        grads.append(torch.autograd.grad(o, (qs, ks, vs), d_out[:, :, sl].float()))
        outs.append(o.detach())
        del o
    return torch.cat(outs, 2), [torch.cat(g, 2) for g in zip(*grads)]


def _check_fwd_bwd(backend: str, mask, L: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, d_out = (torch.randn(1, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    want, want_grads = _reference_fp32(q, k, v, mask, d_out)
    with torch.no_grad():  # forward alone first (the no-grad path), then forward and backward
        out = sdpa_like_attention(q, k, v, block_mask=mask, backend=backend)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    # bf16 (unit roundoff 2^-9 ~ 2e-3), P rounded to bf16 before P·V: relative error a few 1e-3; a wrong tile
    # or mask gives O(1)
    assert _rel(out, want) < FWD_REL, f"{backend} forward rel err {_rel(out, want):.2e}"
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    # with gradients torch compiles the backward too (at the forward call or the first backward)
    out = sdpa_like_attention(qg, kg, vg, block_mask=mask, backend=backend)
    got_grads = torch.autograd.grad(out, (qg, kg, vg), d_out)
    assert _rel(out, want) < FWD_REL, f"{backend} forward (grad mode) rel err {_rel(out, want):.2e}"
    for name, got, ref in zip("qkv", got_grads, want_grads):
        # gradients sum over more bf16 terms than the output (dS = P ⊙ (dP - delta)): twice the bound
        assert _rel(got, ref) < BWD_REL, f"{backend} d{name} rel err {_rel(got, ref):.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("mask_name", list(GPU_MASKS))
def test_flex_gpu_bf16_matches_reference(mask_name):
    mask = GPU_MASKS[mask_name]()
    _check_fwd_bwd("flex", mask, mask.num_tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not _has("flash_attn.cute"), reason="flash-attn-4 (flash_attn.cute) is not installed")
@pytest.mark.parametrize("mask_name", list(GPU_MASKS))
def test_flex_fa4_gpu_bf16_matches_reference(mask_name):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("flash-attn-4 needs Hopper (sm90) or newer")
    mask = GPU_MASKS[mask_name]()
    _check_fwd_bwd("flex_fa4", mask, mask.num_tokens)


@pytest.mark.gpu
@pytest.mark.skipif(not (_has("flash_attn_interface") or _has("flash_attn")),
                    reason="no flash-attn package (FA2, FA3 or flash-attn-4) is installed")
def test_flash_attn_gpu_bf16_unmasked_matches_reference():
    _check_fwd_bwd("flash_attn", None, 3 * TPF)


# ------------------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow  # one eager Flex trace plus the reference rows: ~15 s on the shared CPU
def test_masked_attention_benchmark_smoke(tmp_path):
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "masked_attention.py"
    spec = importlib.util.spec_from_file_location("bench_masked_attention", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "masked.json"
    module.main(["--smoke", "--json", str(out), "--rep-ms", "1"])
    rows = json.loads(out.read_text())["rows"]
    got = {(r["mask"], r["mode"], r["provider"]): r for r in rows}
    assert len(got) == len(rows) == 2 * 2 * len(module.PROVIDERS)  # every mask x mode x provider, once
    for (mask, mode, provider), r in got.items():
        if provider == "rcm":
            assert r["ratio"] == 1 and r["ms"] > 0
        elif provider == "flex" and mode == "fwd+bwd":
            assert "no backward on CPU" in r["error"]
        elif provider in ("flex", "sdpa_cudnn"):
            # fp32 on CPU, <= 40 keys a row: observed ~4e-7 from our kernel's (reference) output
            assert r["max_abs_vs_rcm"] < 1e-5 and r["ratio"] > 0, (mask, mode, provider)
