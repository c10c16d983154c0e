"""Training-state safety: non-finite detection and checkpoint reading that never unpickles arbitrary objects.

* :class:`NonFiniteError` names the iteration (when known), the network and the first non-finite quantity;
  :func:`first_nonfinite` / :func:`check_finite_state_dict` / :func:`check_finite_module` find it (the module
  check is collective under a process group, so every rank raises together).
* :class:`SafeLoadPlanner` / :class:`SafeFileSystemReader`: torch DCP loading where the ``.metadata`` file is
  read by an unpickler that only knows DCP's own metadata classes (``rcm_kernels.safe_dcp``, shared with the
  network loader), and every non-tensor item is read with ``torch.load(weights_only=True)`` and must be a plain value (number, string, bool, None, or a list / tuple /
  dict of them). A pickled object anywhere raises :class:`UnsafeCheckpointError` naming the file and key
  before anything of it runs. See ``docs/reliability.md``.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from rcm_kernels.safe_dcp import SafeFileSystemReader as _SafeReader
from rcm_kernels.safe_dcp import UnsafeCheckpointError as _KernelsUnsafe

__all__ = ["NonFiniteError", "CheckpointError", "UnsafeCheckpointError", "first_nonfinite",
           "check_finite_state_dict", "check_finite_module", "SafeLoadPlanner", "SafeFileSystemReader",
           "is_plain"]


class NonFiniteError(RuntimeError):
    """A NaN/inf in a loss, a gradient norm or weights; the message names where (iteration, network, quantity)."""

    def __init__(self, quantity: str, *, network: str | None = None, iteration: int | None = None,
                 source: str | None = None):
        self.quantity, self.network, self.iteration, self.source = quantity, network, iteration, source
        where = [f"iteration {iteration}"] if iteration is not None else []
        where += [f"network {network!r}"] if network is not None else []
        where += [str(source)] if source is not None else []
        super().__init__(f"non-finite value in {quantity}" + (f" ({', '.join(where)})" if where else ""))


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the file or directory."""


class UnsafeCheckpointError(CheckpointError, _KernelsUnsafe):
    """A checkpoint holding something other than tensors and plain values (e.g. a pickled object)."""


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard: each rank checks its own


def first_nonfinite(named: Iterable[tuple[str, Any]]) -> str | None:
    """The name of the first floating tensor holding a NaN/inf (this process's data only), else None."""
    for name, value in named:
        if isinstance(value, Tensor) and value.is_floating_point():
            if not bool(torch.isfinite(_local(value).detach()).all()):
                return name
    return None


def check_finite_state_dict(state_dict: Mapping[str, Any], source: str) -> None:
    """Raise :class:`NonFiniteError` naming ``source`` and the first key whose tensor is not finite
    (for a loaded teacher / checkpoint / state dict; not collective)."""
    bad = first_nonfinite(state_dict.items())
    if bad is not None:
        raise NonFiniteError(f"weight {bad!r}", source=source)


def check_finite_module(module: nn.Module, network: str, *, iteration: int | None = None,
                        process_group: dist.ProcessGroup | None = None) -> None:
    """Raise :class:`NonFiniteError` if a parameter or buffer of ``module`` is not finite. Collective under a
    process group (ranks agree through one all-reduce, so all raise or none does)."""
    bad = first_nonfinite(list(module.named_parameters()) + list(module.named_buffers()))
    if dist.is_initialized():
        flag = torch.tensor([0.0 if bad is None else 1.0],
                            device="cuda" if dist.get_backend(process_group) == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=process_group)
        if flag.item() and bad is None:
            bad = "a parameter on another rank"
    if bad is not None:
        raise NonFiniteError(f"parameter {bad!r}" if "rank" not in bad else bad, network=network,
                             iteration=iteration)


# ------------------------------------------------------------------------------------------ safe loading
_PLAIN = (int, float, bool, str, type(None))


def is_plain(value: Any) -> bool:
    """Numbers, strings, bools, None, tensors, and lists / tuples / dicts of them."""
    if isinstance(value, _PLAIN + (Tensor,)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and is_plain(v) for k, v in value.items())
    return False


class SafeFileSystemReader(_SafeReader):
    """rcm-kernels' safe DCP reader raising this module's errors (:class:`UnsafeCheckpointError` for a pickled
    object, :class:`CheckpointError` for unreadable metadata, both naming the file)."""

    unsafe_error = UnsafeCheckpointError
    read_error = CheckpointError


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP load planner reading non-tensor items with ``weights_only=True`` and accepting plain values only."""

    def __init__(self, checkpoint: str | pathlib.Path = "", **kwargs: Any):
        super().__init__(**kwargs)
        self.checkpoint = str(checkpoint)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:  # what weights_only raises for anything but plain data
            raise UnsafeCheckpointError(f"checkpoint {self.checkpoint}: item {fqn!r} is not a plain value "
                                        f"(a pickled object?): refused ({type(e).__name__}: {e})") from None
        except Exception as e:  # truncated / corrupt bytes
            raise CheckpointError(f"checkpoint {self.checkpoint} is unreadable (truncated or corrupt?): item "
                                  f"{fqn!r} ({type(e).__name__}: {e})") from None
        if not is_plain(obj):
            raise UnsafeCheckpointError(f"checkpoint {self.checkpoint}: item {fqn!r} is a "
                                        f"{type(obj).__name__}, not a plain value: refused")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
