"""Selective activation checkpointing: every mode gives the gradients of no checkpointing, recomputes what
it should (forward ops rerun in backward, counted), keeps state-dict keys, and passes torch.func.jvp through
unchanged."""

import collections

import pytest
import torch
from _train_tiny import tiny_dit
from torch.utils._python_dispatch import TorchDispatchMode

from rcm_train.parallel import ParallelConfig, apply_sac, parallelize


def _run(mode, every=1, max_blocks=None):
    model = tiny_dit(depth=3).double()
    apply_sac(model, mode, every_n_blocks=every, max_blocks=max_blocks)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64)
    (model(x, t) ** 2).sum().backward()
    calls = [b.calls for b in model.blocks]
    # named_parameters() of the parent shows the wrapper's "_checkpoint_wrapped_module." (state_dict does not)
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}, calls, model


@pytest.mark.parametrize("mode, every, max_blocks, recomputed", [
    ("block_wise", 1, None, [1, 1, 1]), ("mm_only", 1, None, [1, 1, 1]), ("block_wise", 2, None, [1, 0, 1]),
    ("attention", 1, None, [1, 1, 1]), ("attn_only", 1, None, [1, 1, 1]), ("block_wise", 1, 2, [1, 1, 0]),
    ("block_wise", 2, 1, [1, 0, 0]), ("attention", 1, 0, [0, 0, 0])])
def test_sac_gradients_equal_no_checkpointing(mode, every, max_blocks, recomputed):
    ref, ref_calls, ref_model = _run("none")
    grads, calls, model = _run(mode, every, max_blocks)
    assert ref_calls == [1, 1, 1]
    # a checkpointed block runs its forward again in backward (block_wise: whole block; mm_only: all but
    # the saved matmuls, still through forward)
    assert [c - 1 for c in calls] == recomputed
    assert list(grads) == list(ref) and list(model.state_dict()) == list(ref_model.state_dict())
    for name in ref:
        # recomputation repeats the same CPU kernels on the same inputs: bit-identical
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=0, msg=name)


def test_mm_only_saves_matmuls():
    """The mm_only policy (docs/train.md, parallelism): save matmul outputs (and ops named by the caller), recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    from rcm_train.parallel.checkpointing import _mm_only_policy

    assert _mm_only_policy((), None, torch.ops.aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert _mm_only_policy((), None, torch.ops.aten.addmm.default) == CheckpointPolicy.MUST_SAVE
    assert _mm_only_policy((), None, torch.ops.aten.gelu.default) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _mm_only_policy(("gelu",), None, torch.ops.aten.gelu.default) == CheckpointPolicy.MUST_SAVE


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops that run while it is active (here: during backward, i.e. recomputation)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def _backward_ops(mode, monkeypatch):
    """Gradients and the forward ops rerun in backward, with SDPA as the attention kernel (one aten op on CPU)."""
    monkeypatch.setenv("RCM_ATTENTION_BACKEND", "sdpa")
    model = tiny_dit(depth=3)
    apply_sac(model, mode)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 6, 4, generator=g), torch.rand(2, generator=g)
    loss = (model(x, t) ** 2).sum()
    with _OpCounter() as counter:
        loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    return grads, counter.counts[torch.ops.aten.addmm.default], counter.counts[sdpa]


@pytest.mark.parametrize("mode, addmm, attn", [("block_wise", 9, 3), ("attention", 6, 0), ("attn_only", 9, 0)])
def test_attention_policy_saves_attention_and_narrow_matmuls(mode, addmm, attn, monkeypatch):
    """What each mode keeps, counted by the forward ops that run again in backward (3 blocks). A TinyBlock
    has three addmm linears: qkv (C -> 3C, wide), FFN up (C -> 2C, wide), FFN down (2C -> C, narrow); its
    output projection runs as mm on a strided input. block_wise reruns all of them and the attention;
    ``attention`` keeps the attention (out + LSE) and the narrow FFN down, rerunning the two wide ones;
    ``attn_only`` keeps only the attention. Gradients equal no checkpointing bit for bit (same CPU kernels)."""
    ref, ref_addmm, ref_attn = _backward_ops("none", monkeypatch)
    assert (ref_addmm, ref_attn) == (0, 0)
    grads, n_addmm, n_attn = _backward_ops(mode, monkeypatch)
    assert (n_addmm, n_attn) == (addmm, attn)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=0, atol=0, msg=name)


def test_attention_policy_decisions():
    """The ``attention`` policy on single ops: attention kernels and matmuls with N <= K saved, wide matmuls
    and elementwise ops recomputed; ``attn_only`` recomputes every matmul."""
    from torch.utils.checkpoint import CheckpointPolicy as P

    from rcm_train.parallel.checkpointing import _attention_policy, attention_ops

    ops = attention_ops()
    sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    assert sdpa in ops and torch.ops.aten.mm.default not in ops
    a, w_narrow, w_wide = torch.empty(8, 6), torch.empty(6, 6), torch.empty(6, 12)
    pol = lambda op, *args, save_mm=True: _attention_policy(save_mm, ops, ("flash_attn",), None, op, *args)  # noqa: E731
    assert pol(sdpa) == P.MUST_SAVE
    assert pol(torch.ops.aten.mm.default, a, w_narrow) == P.MUST_SAVE
    assert pol(torch.ops.aten.mm.default, a, w_wide) == P.PREFER_RECOMPUTE
    assert pol(torch.ops.aten.addmm.default, torch.empty(6), a, w_narrow) == P.MUST_SAVE
    assert pol(torch.ops.aten.addmm.default, torch.empty(12), a, w_wide) == P.PREFER_RECOMPUTE
    assert pol(torch.ops.aten.mm.default, a, w_narrow, save_mm=False) == P.PREFER_RECOMPUTE
    assert pol(torch.ops.aten.gelu.default, a) == P.PREFER_RECOMPUTE


@pytest.mark.parametrize("mode", ["mm_only", "attention"])
def test_sac_and_jvp(mode):
    """The sCM JVP pass runs through checkpointed blocks (no grad): same tangent as the plain model."""
    plain, wrapped = tiny_dit().double(), tiny_dit().double()
    parallelize(wrapped, None, ParallelConfig(sac=mode))
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.rand(2, generator=g, dtype=torch.float64)
    tx, tt = torch.randn_like(x), torch.randn_like(t)
    with torch.no_grad():
        a = torch.func.jvp(lambda u, v: plain(u, v), (x, t), (tx, tt))
        b = torch.func.jvp(lambda u, v: wrapped(u, v), (x, t), (tx, tt))
    torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_sac_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation checkpointing mode 'full'"):
        apply_sac(tiny_dit(), "full")
    with pytest.raises(ValueError, match="nn.ModuleList"):
        apply_sac(torch.nn.Linear(2, 2), "block_wise")
    with pytest.raises(ValueError, match="every_n_blocks"):
        apply_sac(tiny_dit(), "mm_only", every_n_blocks=0)
    with pytest.raises(ValueError, match="max_blocks"):
        apply_sac(tiny_dit(), "mm_only", max_blocks=-1)
    with pytest.raises(ValueError, match="sac_blocks"):
        ParallelConfig(sac_blocks=-2)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, reruns", [("block_wise", 3), ("mm_only", 0), ("attention", 0), ("attn_only", 0)])
def test_attention_policy_keeps_triton_attention_gpu(mode, reruns):
    """On CUDA the attention is our Triton op ``rcm_kernels::jvp_attn_fwd`` (outputs out, tangent, LSE): the
    selective modes keep it (it does not run again in backward), block_wise reruns it once per block.
    Gradients equal no checkpointing (fp32; rtol 1e-5: recomputed matmuls may pick other GPU kernels)."""
    import rcm_kernels.attention.triton_jvp  # noqa: F401  (registers the op)

    def run(m):
        model = tiny_dit(dim=64, heads=2, depth=3).cuda()  # head dim 32: the Triton kernel's range
        apply_sac(model, m)
        g = torch.Generator(device="cuda").manual_seed(5)
        x, t = torch.randn(2, 40, 4, device="cuda", generator=g), torch.rand(2, device="cuda", generator=g)
        with _OpCounter() as fwd:
            loss = (model(x, t) ** 2).sum()
        with _OpCounter() as bwd:
            loss.backward()
        grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
        op = torch.ops.rcm_kernels.jvp_attn_fwd.default
        return grads, fwd.counts[op], bwd.counts[op]

    ref, ref_fwd, ref_bwd = run("none")
    assert (ref_fwd, ref_bwd) == (3, 0), "the attention did not run as the Triton op"
    grads, n_fwd, n_bwd = run(mode)
    assert (n_fwd, n_bwd) == (3, reruns)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
