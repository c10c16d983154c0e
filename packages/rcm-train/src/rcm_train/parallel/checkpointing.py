"""Selective activation checkpointing (docs/train.md, parallelism) on the elements of ``model.blocks``.

Modes: ``none``; ``block_wise`` (keep only each block's input, recompute the whole block in backward);
``mm_only`` (keep the outputs of matmuls and fused attention kernels, recompute everything else: norms,
activations, RoPE, elementwise ops); ``attention`` (keep the attention kernels' outputs, their log-sum-exp
included, and the outputs of matmuls no wider than their reduction dimension; recompute the wide FFN
up-projection and everything elementwise); ``attn_only`` (keep only the attention kernels' outputs and
recompute every matmul). Uses torch's non-reentrant checkpoint wrapper, so state-dict keys keep their names.
"""

from __future__ import annotations

from functools import partial
from typing import Literal, get_args

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

__all__ = ["SACMode", "SAC_MODES", "apply_sac", "apply_compile", "attention_ops"]

SACMode = Literal["none", "block_wise", "mm_only", "attention", "attn_only"]
SAC_MODES: tuple[str, ...] = get_args(SACMode)

_MM_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
_MM_OPS_SET = frozenset(_MM_OPS)


def attention_ops() -> frozenset:
    """The fused attention forward ops a policy can save: SDPA's kernels (their outputs include the LSE) and
    ``rcm_kernels::jvp_attn_fwd`` (``(out, tangent, lse)``; registered when ``rcm_kernels.attention.triton_jvp``
    has been imported, i.e. on CUDA). Ops of the ``flash_attn`` package are matched by name instead."""
    ops = set()
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        if hasattr(torch.ops.aten, name):
            ops.add(getattr(torch.ops.aten, name).default)
    if hasattr(torch.ops, "rcm_kernels") and hasattr(torch.ops.rcm_kernels, "jvp_attn_fwd"):
        ops.add(torch.ops.rcm_kernels.jvp_attn_fwd.default)
    return frozenset(ops)


# mm_only: matmuls and the SDPA GPU kernels (rcm_kernels and flash_attn ops are matched by name)
_SAVED_OPS = _MM_OPS | {op for op in attention_ops() if not str(op).endswith(("_for_cpu.default", "jvp_attn_fwd.default"))}


def _mm_only_policy(save_name_substrings: tuple[str, ...], ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in _SAVED_OPS or any(s in str(op) for s in save_name_substrings):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _narrow_mm(op, args) -> bool:
    """A matmul ``[M, K] @ [K, N]`` whose output is no wider than its reduction (``N <= K``): q/k/v/o and the
    FFN down-projection. Keeping it costs ``M·N`` elements and saves ``2·M·N·K`` FLOPs of recompute."""
    a, b = (args[1], args[2]) if op is torch.ops.aten.addmm.default else (args[0], args[1])
    return b.shape[-1] <= a.shape[-1]


def _attention_policy(save_mm: bool, attn_ops: frozenset, save_name_substrings: tuple[str, ...], ctx, op, *args,
                      **kwargs) -> CheckpointPolicy:
    if op in attn_ops or any(s in str(op) for s in save_name_substrings):
        return CheckpointPolicy.MUST_SAVE
    if save_mm and op in _MM_OPS_SET and _narrow_mm(op, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _mm_only_context(save_name_substrings: tuple[str, ...]):
    return create_selective_checkpoint_contexts(partial(_mm_only_policy, save_name_substrings))


def _attention_context(save_mm: bool, save_name_substrings: tuple[str, ...]):
    # the op set is read per forward: rcm_kernels registers its Triton op on first use
    return create_selective_checkpoint_contexts(
        partial(_attention_policy, save_mm, attention_ops(), save_name_substrings))


def apply_sac(model: nn.Module, mode: SACMode, *, every_n_blocks: int = 1, max_blocks: int | None = None,
              blocks_attr: str = "blocks", save_op_substrings: tuple[str, ...] = ("flash_attn", "rcm_kernels")) -> int:
    """Wrap every ``every_n_blocks``-th element of ``getattr(model, blocks_attr)`` in place, the first
    ``max_blocks`` of those only (None: all); returns the count.

    ``save_op_substrings``: in the selective modes, ops whose name contains one of these are saved too (custom
    attention kernels registered as torch ops: ``rcm_kernels::jvp_attn_fwd``, flash-attn's).
    """
    if mode == "none":
        return 0
    if mode not in SAC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}: use one of {', '.join(SAC_MODES)}")
    if every_n_blocks < 1:
        raise ValueError(f"every_n_blocks must be >= 1, got {every_n_blocks}")
    if max_blocks is not None and max_blocks < 0:
        raise ValueError(f"max_blocks must be >= 0 or None, got {max_blocks}")
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"activation checkpointing needs model.{blocks_attr} to be an nn.ModuleList")
    kwargs = {"preserve_rng_state": False, "use_reentrant": False}
    if mode == "mm_only":
        kwargs["context_fn"] = partial(_mm_only_context, tuple(save_op_substrings))
    elif mode in ("attention", "attn_only"):
        kwargs["context_fn"] = partial(_attention_context, mode == "attention", tuple(save_op_substrings))
    wrapped = 0
    for i in list(range(0, len(blocks), every_n_blocks))[:max_blocks]:
        blocks[i] = checkpoint_wrapper(blocks[i], checkpoint_fn=checkpoint, **kwargs)
        wrapped += 1
    return wrapped


def apply_compile(model: nn.Module, *, blocks_attr: str = "blocks", backend: str = "inductor",
                  recompile_limit: int = 64) -> int:
    """Regional ``torch.compile``: compile each element of ``getattr(model, blocks_attr)`` in place
    (``Module.compile``: state-dict keys unchanged); returns the count.

    Call it before :func:`apply_sac` and FSDP (``parallelize`` does): the checkpoint and FSDP wrappers stay
    eager around the compiled block. Compiling the checkpoint wrapper instead (torch's higher-order
    ``checkpoint`` op) cannot work here: the attention autograd Function has a custom ``jvp``, which Dynamo
    does not trace, and a graph break inside that op sends the whole checkpointed block back to eager. The
    same break splits each compiled block into regions around its attention calls (attention runs eagerly:
    it is one fused kernel anyway), so a SAC policy still sees the attention ops and can save them; matmuls
    inside compiled regions are not aten ops the policy sees and are recomputed. The explicit-tangent JVP
    path (``forward_jvp``) and ``torch.func.jvp`` go through the same compiled blocks (their own graphs).
    Raises Dynamo's per-function recompile limit to ``recompile_limit`` (process-wide): one block code serves
    student, teacher and critic, with and without gradients and tangents.
    """
    blocks = getattr(model, blocks_attr, None)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"compile needs model.{blocks_attr} to be an nn.ModuleList")
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)
