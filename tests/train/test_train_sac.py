"""Selective activation checkpointing: every mode gives the gradients of no checkpointing, recomputes what
it should, keeps state-dict keys, and passes torch.func.jvp through unchanged."""

import pytest
import torch
from _train_tiny import tiny_dit

from rcm_train.parallel import ParallelConfig, apply_sac, parallelize


def _run(mode, every=1):
    model = tiny_dit(depth=3).double()
    apply_sac(model, mode, every_n_blocks=every)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    t = torch.rand(2, generator=g, dtype=torch.float64)
    (model(x, t) ** 2).sum().backward()
    calls = [b.calls for b in model.blocks]
    # named_parameters() of the parent shows the wrapper's "_checkpoint_wrapped_module." (state_dict does not)
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}, calls, model


@pytest.mark.parametrize("mode, every, recomputed", [("block_wise", 1, [1, 1, 1]), ("mm_only", 1, [1, 1, 1]),
                                                     ("block_wise", 2, [1, 0, 1])])
def test_sac_gradients_equal_no_checkpointing(mode, every, recomputed):
    ref, ref_calls, ref_model = _run("none")
    grads, calls, model = _run(mode, every)
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


def test_sac_and_jvp():
    """The sCM JVP pass runs through checkpointed blocks (no grad): same tangent as the plain model."""
    plain, wrapped = tiny_dit().double(), tiny_dit().double()
    parallelize(wrapped, None, ParallelConfig(sac="mm_only"))
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
