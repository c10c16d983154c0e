"""Parallelism applied from outside: ``parallelize(model, mesh, config)``.

Fixed order (each step sees the module tree the previous one left):
1. context parallel: swap the ``rcm_kernels`` attention / sequence seams for Ulysses versions (module swap,
   before any wrapper, so the seams are found by type);
2. regional ``torch.compile`` of each element of ``model.blocks`` when ``compile`` is set (inside the
   checkpoint and FSDP wrappers, which stay eager);
3. selective activation checkpointing on each element of ``model.blocks`` (inside the FSDP units, so
   recomputation runs on gathered parameters);
4. FSDP2 ``fully_shard`` per block, then per remaining top-level submodule except ``not_fsdp_units``, then
   the root, with a ``MixedPrecisionPolicy``.
Build big models on the ``meta`` device, parallelize, then ``to_empty`` and initialise or load.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from .checkpointing import SACMode, apply_compile, apply_sac
from .context_parallel import (
    UlyssesAttention,
    UlyssesSequenceShard,
    apply_context_parallel,
    broadcast_from_leader,
)
from .fsdp import apply_fsdp
from .mesh import ParallelMesh, build_mesh, init_distributed, mesh_from_megatron, mesh_from_process_groups

__all__ = ["MeshConfig", "ParallelConfig", "parallelize", "ParallelMesh", "build_mesh", "init_distributed",
           "mesh_from_process_groups", "mesh_from_megatron", "apply_sac", "apply_compile", "apply_fsdp", "apply_context_parallel",
           "broadcast_from_leader", "UlyssesAttention", "UlyssesSequenceShard"]

class MeshConfig(BaseModel):
    """The device mesh ``(replicate, shard, cp)`` of a run, from two knobs: parameters are sharded over
    ``fsdp_shard_size`` ranks (context-parallel ranks included) and replicated across such groups (HSDP)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    fsdp_shard_size: int = -1
    """Ranks per FSDP shard group (HSDP replicates across groups); -1 (or more than the world): all ranks."""
    cp: int = Field(1, ge=1)
    """Ulysses context-parallel size (consecutive ranks share samples); must divide fsdp_shard_size and the
    attention head count."""

    @field_validator("fsdp_shard_size")
    @classmethod
    def _shard(cls, v: int) -> int:
        if v < 1 and v != -1:
            raise ValueError(f"fsdp_shard_size must be >= 1 or -1 (all ranks), got {v}")
        return v

    def build(self) -> ParallelMesh:
        """The mesh over the default process group's world (raises when the sizes do not nest)."""
        import torch.distributed as dist

        world = dist.get_world_size()
        shard = world if self.fsdp_shard_size == -1 else min(self.fsdp_shard_size, world)
        if world % self.cp or shard % self.cp or world % shard:
            raise ValueError(f"parallel.mesh: world size {world}, fsdp_shard_size {shard} and cp {self.cp} must "
                             "nest (cp divides fsdp_shard_size, which divides the world size)")
        return build_mesh(world // shard, shard // self.cp, self.cp)


class ParallelConfig(BaseModel):
    """How one network is parallelized (student, teacher, fake score and EMA may differ)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    sac: SACMode = "none"
    """Activation checkpointing of each block: none, block_wise (recompute all), mm_only (keep matmul and
    attention outputs, recompute the rest), attention (keep attention outputs with their LSE and the matmuls
    no wider than their input; recompute the FFN up-projection and elementwise ops) or attn_only (keep
    attention outputs only)."""
    sac_every_n_blocks: int = Field(1, ge=1)
    """Checkpoint every n-th block only."""
    sac_blocks: int | None = Field(None, ge=0)
    """Checkpoint only the first this many blocks (after ``sac_every_n_blocks``); the later ones keep all their
    activations. A memory / speed dial finer than ``sac_every_n_blocks``: each block left out saves its
    recomputation and costs its activations (T2V-1.3B critic at 32760 tokens: ~2.4 GiB, ~5 ms per block)."""
    compile: bool = False
    """Regional torch.compile: compile each block (Module.compile, keys unchanged) before checkpointing and
    FSDP wrap it. The attention call stays eager (a graph break); forward_jvp and torch.func.jvp work."""
    compile_backend: Literal["inductor", "aot_eager", "eager"] = "inductor"
    """torch.compile backend of ``compile`` (aot_eager: CPU tests)."""
    fsdp: bool = True
    """Shard with FSDP2 (needs a mesh); False leaves parameters replicated and unsynchronised."""
    param_dtype: Literal["float32", "bfloat16", "float16", "float64"] | None = "bfloat16"
    """Compute dtype FSDP casts parameters to (stored parameters keep their dtype); None = stored dtype."""
    reduce_dtype: Literal["float32", "bfloat16", "float64"] | None = "float32"
    """Dtype of the gradient reduce-scatter / all-reduce; None = the compute dtype."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each unit's forward (re-gather in backward)."""
    context_parallel: bool = True
    """Swap the attention / sequence seams for Ulysses versions when the mesh has cp > 1."""
    blocks_attr: str = "blocks"
    """Name of the model's ModuleList of transformer blocks."""
    not_fsdp_units: list[str] = ["patch_embedding", "time_embedding", "time_projection", "text_embedding",
                                 "interval_embedding"]
    """Top-level submodules that must not be separate FSDP units and stay in the root unit: those the network
    runs inside torch.func.jvp (unit hooks must not fire there, docs/nets.md, precision) and those whose parameters it
    reads without calling the module (no hook would gather them). Names absent from the model are ignored;
    the defaults fit WanDiT."""
    forward_methods: list[str] = []
    """Methods besides forward that must gather FSDP parameters (registered where they exist). Not needed
    for methods that go through __call__, like WanDiT.forward_jvp."""


def parallelize(model: nn.Module, mesh: ParallelMesh | None, config: ParallelConfig) -> nn.Module:
    """Apply context parallel, activation checkpointing and FSDP2 to ``model`` in place (order above).

    ``mesh`` comes from :func:`build_mesh` (or ``None`` for a single process: only checkpointing applies).
    Returns the same module.
    """
    cp = mesh.cp_size if mesh is not None else 1
    if cp > 1 and config.context_parallel:
        apply_context_parallel(model, mesh.cp_group)
        if not config.fsdp and any(p.requires_grad for p in model.parameters()):
            warnings.warn("context parallel without FSDP: nothing sums the CP ranks' partial gradients; train "
                          "with fsdp=True (or freeze this network)", stacklevel=2)
    if config.compile:
        apply_compile(model, blocks_attr=config.blocks_attr, backend=config.compile_backend)
    apply_sac(model, config.sac, every_n_blocks=config.sac_every_n_blocks, max_blocks=config.sac_blocks,
              blocks_attr=config.blocks_attr)
    if mesh is not None and config.fsdp:
        children = dict(model.named_children())
        apply_fsdp(model, mesh.fsdp, param_dtype=getattr(torch, config.param_dtype) if config.param_dtype else None,
                   reduce_dtype=getattr(torch, config.reduce_dtype) if config.reduce_dtype else None,
                   reshard_after_forward=config.reshard_after_forward,
                   blocks_attr=config.blocks_attr, not_units=[n for n in config.not_fsdp_units if n in children],
                   forward_methods=config.forward_methods,
                   grad_divide_factor=float(mesh.dp_size) if cp > 1 else None)
    return model
