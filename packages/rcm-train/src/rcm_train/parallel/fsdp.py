"""FSDP2 (``fully_shard``) per block, then per remaining top-level submodule, then the root.

Some top-level submodules must not be separate FSDP units: those the network calls inside
``torch.func.jvp`` (patch and time embeddings of the reference sCM student, docs/nets.md, precision: their unit
hooks would fire inside the functional transform) and those whose parameters the network reads without
calling the module (no hook would gather them). They are listed by name and stay in the root unit, whose
parameters are gathered before the root forward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

__all__ = ["apply_fsdp"]


def _units(model: nn.Module, blocks_attr: str, not_units: Iterable[str]) -> list[nn.Module]:
    skip = set(not_units)
    named = dict(model.named_children())
    unknown = skip - set(named)
    if unknown:
        raise ValueError(f"not_fsdp_units names {sorted(unknown)} that are not submodules of {type(model).__name__} "
                         f"(children: {sorted(named)})")
    blocks = named.get(blocks_attr)
    if not isinstance(blocks, nn.ModuleList):
        raise ValueError(f"FSDP needs model.{blocks_attr} to be an nn.ModuleList of blocks")
    units = list(blocks)
    for name, child in named.items():
        if name != blocks_attr and name not in skip and next(child.parameters(), None) is not None:
            units.append(child)
    return units


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, *, param_dtype: torch.dtype | None = torch.bfloat16,
               reduce_dtype: torch.dtype | None = torch.float32, reshard_after_forward: bool = True,
               blocks_attr: str = "blocks", not_units: Iterable[str] = (), forward_methods: Iterable[str] = (),
               grad_divide_factor: float | None = None) -> nn.Module:
    """Shard ``model`` in place over ``mesh`` (1-D: FSDP; 2-D ``(replicate, shard)``: HSDP).

    Parameters stay in their stored dtype (keep them float32: they are the optimizer's master weights) and
    are cast to ``param_dtype`` for compute; gradients are reduced in ``reduce_dtype``.
    ``forward_methods``: extra methods (e.g. ``forward_jvp``) that must gather parameters like ``forward``,
    registered on every unit that has them. ``grad_divide_factor``: divide summed gradients by this instead
    of the number of FSDP ranks (context parallel: ranks of one CP group hold parts of one sample).
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    units = _units(model, blocks_attr, not_units)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    gloo = dist.get_backend(mesh.get_group(0)) == "gloo"
    for unit in [*units, model]:
        for name in forward_methods:
            if hasattr(unit, name):
                register_fsdp_forward_method(unit, name)
        if grad_divide_factor is not None:
            assert isinstance(unit, FSDPModule)
            unit.set_gradient_divide_factor(grad_divide_factor)
            if gloo:  # gloo has no PREMUL_SUM: reduce with SUM and divide afterwards
                unit.set_force_sum_reduction_for_comms(True)
    return model
