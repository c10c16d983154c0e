"""Selective activation checkpointing (docs/train.md, parallelism) on the elements of ``model.blocks``.

Modes: ``none``; ``block_wise`` (keep only each block's input, recompute the whole block in backward);
``mm_only`` (keep the outputs of matmuls and fused attention kernels, recompute everything else: norms,
activations, RoPE, elementwise ops). Uses torch's non-reentrant checkpoint wrapper, so state-dict keys keep
their names.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["SACMode", "apply_sac"]

SACMode = Literal["none", "block_wise", "mm_only"]

_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
for _name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention"):
    if hasattr(torch.ops.aten, _name):
        _SAVED_OPS.add(getattr(torch.ops.aten, _name).default)


def _mm_only_policy(save_name_substrings: tuple[str, ...], ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVED_OPS or any(s in str(op) for s in save_name_substrings):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _mm_only_context(save_name_substrings: tuple[str, ...]):
    return create_selective_checkpoint_contexts(partial(_mm_only_policy, save_name_substrings))


def apply_sac(model: nn.Module, mode: SACMode, *, every_n_blocks: int = 1, blocks_attr: str = "blocks",
              save_op_substrings: tuple[str, ...] = ("flash_attn", "rcm_kernels")) -> int:
    """Wrap every ``every_n_blocks``-th element of ``getattr(model, blocks_attr)`` in place; returns the count.

    ``save_op_substrings``: in ``mm_only`` mode, ops whose name contains one of these are saved too (custom
    attention kernels registered as torch ops).
    """
    if mode == "none":
        return 0
    if mode not in ("block_wise", "mm_only"):
        raise ValueError(f"unknown activation checkpointing mode {mode!r}: use none, block_wise or mm_only")
    if every_n_blocks < 1:
        raise ValueError(f"every_n_blocks must be >= 1, got {every_n_blocks}")
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"activation checkpointing needs model.{blocks_attr} to be an nn.ModuleList")
    kwargs = {"preserve_rng_state": False, "use_reentrant": False}
    if mode == "mm_only":
        kwargs["context_fn"] = partial(_mm_only_context, tuple(save_op_substrings))
    wrapped = 0
    for i in range(0, len(blocks), every_n_blocks):
        blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_fn=checkpoint, **kwargs)
        wrapped += 1
    return wrapped
