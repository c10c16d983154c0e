"""Test helper shared by tests/nets and tests/causal (importable from every test: pytest puts tests/ on
sys.path for the root conftest.py)."""

import contextlib

from torch import nn

from rcm_kernels.attention import Attention, attention_reference


@contextlib.contextmanager
def plain_torch_attention(net: nn.Module):
    """Route every attention seam of ``net`` to plain-torch math (``attention_reference``, the seam's
    ``block_mask`` as its mask, no tangent), so ``torch.func`` differentiates ordinary ops."""
    sites = [m for m in net.modules() if isinstance(m, Attention)]

    def plain(q, k, v, tq=None, tk=None, tv=None, *, scale=None, block_mask=None):
        return attention_reference(q, k, v, scale=scale, mask=block_mask).out, None

    for m in sites:
        m.forward = plain
    try:
        yield
    finally:
        for m in sites:
            del m.forward
