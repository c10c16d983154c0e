"""Device meshes for HSDP × context parallel, built fresh or from process groups a host codebase made.

Mesh dimensions (outer to inner): ``dp_replicate`` (HSDP replicas), ``dp_shard`` (FSDP shards), ``cp``
(Ulysses context parallel). Ranks are laid out row-major, so a CP group is ``cp`` consecutive ranks and an
FSDP shard group is strided by ``cp`` — the same layout megatron-core's ``parallel_state`` uses with TP=PP=1.
Two flattened dimensions are added: ``dp_shard_cp`` (what FSDP shards over: CP ranks hold different tokens
of the same samples, so their gradients are summed like those of shards) and ``dp`` (replicate × shard:
ranks that read different data).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["MESH_DIMS", "ParallelMesh", "build_mesh", "mesh_from_process_groups", "mesh_from_megatron",
           "init_distributed"]

MESH_DIMS = ("dp_replicate", "dp_shard", "cp")


def init_distributed(backend: str | None = None) -> None:
    """Initialise the default process group: from torchrun's environment, or as a world of one.

    A single process without ``RANK``/``WORLD_SIZE`` gets a one-rank group on an in-memory store, so the same
    code path (FSDP2 mixed precision, DCP) runs with and without a launcher. No-op when already initialised.
    """
    if dist.is_initialized():
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"


@dataclass(frozen=True)
class ParallelMesh:
    """The world mesh plus the sub-meshes each consumer needs (kept here rather than sliced from the root
    by flattened names, which torch is deprecating)."""

    world: DeviceMesh
    """``(dp_replicate, dp_shard, cp)``."""
    fsdp: DeviceMesh
    """What FSDP shards over: 1-D ``dp_shard_cp``, or 2-D ``(dp_replicate, dp_shard_cp)`` (HSDP)."""
    dp: DeviceMesh
    """Flattened ``dp_replicate x dp_shard``: ranks that read different data."""
    cp: DeviceMesh
    """Context-parallel ranks (hold different tokens of the same samples)."""

    @property
    def dp_rank(self) -> int:
        return self.dp.get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.dp.size()

    @property
    def cp_rank(self) -> int:
        return self.cp.get_local_rank()

    @property
    def cp_size(self) -> int:
        return self.cp.size()

    @property
    def cp_group(self) -> dist.ProcessGroup:
        return self.cp.get_group()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.world.shape)


def _sub_meshes(world: DeviceMesh) -> ParallelMesh:
    shard_cp = world["dp_shard", "cp"]._flatten("dp_shard_cp")
    dp = world["dp_replicate", "dp_shard"]._flatten("dp")
    if world["dp_replicate"].size() > 1:
        rep, shard = world.shape[0], world.shape[1] * world.shape[2]
        fsdp = DeviceMesh.from_group([world["dp_replicate"].get_group(), shard_cp.get_group()], world.device_type,
                                     mesh=world.mesh.reshape(rep, shard),
                                     mesh_dim_names=("dp_replicate", "dp_shard_cp"))
    else:
        fsdp = shard_cp
    return ParallelMesh(world=world, fsdp=fsdp, dp=dp, cp=world["cp"])


def build_mesh(dp_replicate: int = 1, dp_shard: int = -1, cp: int = 1, *, device_type: str | None = None) -> ParallelMesh:
    """A 3-D mesh ``(dp_replicate, dp_shard, cp)`` over the default process group.

    ``dp_shard=-1`` takes what is left of the world. The product must equal the world size. HSDP is
    ``dp_replicate > 1`` with ``dp_shard > 1``; plain DDP-like replication is ``dp_shard == 1``.
    """
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs an initialised process group: call rcm_train.parallel.init_distributed()")
    world = dist.get_world_size()
    for name, size in (("dp_replicate", dp_replicate), ("cp", cp)):
        if size < 1:
            raise ValueError(f"{name} must be >= 1, got {size}")
    if dp_shard == -1:
        if world % (dp_replicate * cp):
            raise ValueError(f"world size {world} is not divisible by dp_replicate*cp = {dp_replicate * cp}")
        dp_shard = world // (dp_replicate * cp)
    if dp_shard < 1 or dp_replicate * dp_shard * cp != world:
        raise ValueError(f"mesh dp_replicate={dp_replicate} x dp_shard={dp_shard} x cp={cp} does not match the world "
                         f"size {world}")
    mesh = init_device_mesh(device_type or _device_type(), (dp_replicate, dp_shard, cp), mesh_dim_names=MESH_DIMS)
    return _sub_meshes(mesh)


def mesh_from_process_groups(dp_shard: dist.ProcessGroup, cp: dist.ProcessGroup | None = None,
                             dp_replicate: dist.ProcessGroup | None = None, *,
                             device_type: str | None = None) -> ParallelMesh:
    """The same 3-D mesh, made from process groups that already exist (no new communicators for the dims).

    Each rank's coordinates are its rank inside each group; the groups must tile the world (every
    coordinate triple taken by exactly one rank), otherwise a ValueError names the clash. A missing group
    stands for a dimension of size 1.
    """
    groups = []
    for g in (dp_replicate, dp_shard, cp):
        if g is None:
            # one singleton group per rank; every rank must create all of them (collective call)
            g, _ = dist.new_subgroups(group_size=1)
        groups.append(g)
    me = dist.get_rank()
    coord = tuple(dist.get_group_rank(g, me) for g in groups)
    shape = tuple(g.size() for g in groups)
    coords: list = [None] * dist.get_world_size()
    dist.all_gather_object(coords, coord)
    mesh_t = torch.full(shape, -1, dtype=torch.int64)
    for rank, c in enumerate(coords):
        if mesh_t[c] != -1:
            raise ValueError(f"process groups do not tile the world: ranks {int(mesh_t[c])} and {rank} share "
                             f"coordinates {c} in (dp_replicate, dp_shard, cp) of shape {shape}")
        mesh_t[c] = rank
    if (mesh_t < 0).any():
        raise ValueError(f"process groups of sizes {shape} do not cover the world of {dist.get_world_size()} ranks")
    mesh = DeviceMesh.from_group(groups, device_type or _device_type(), mesh=mesh_t, mesh_dim_names=MESH_DIMS)
    return _sub_meshes(mesh)


def mesh_from_megatron(*, device_type: str | None = None) -> ParallelMesh:
    """The mesh from megatron-core's ``parallel_state`` (TP = PP = 1): its data-parallel group as ``dp_shard``,
    its context-parallel group as ``cp``. Needs the optional ``megatron-core`` package."""
    try:
        from megatron.core import parallel_state
    except ImportError as e:
        raise ImportError("mesh_from_megatron needs megatron-core: pip install megatron-core "
                          "(or build the mesh with rcm_train.parallel.build_mesh)") from e
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("megatron parallel_state is not initialised: call initialize_model_parallel first")
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("mesh_from_megatron supports tensor/pipeline model parallel size 1 only")
    return mesh_from_process_groups(parallel_state.get_data_parallel_group(with_context_parallel=False),
                                    parallel_state.get_context_parallel_group(), device_type=device_type)
