"""Distributed checkpoints (torch DCP) that survive crashes, and weight export with the module's own keys.

Layout under the checkpoint root::

    iter_000000500/        a complete DCP checkpoint (one top-level key per Stateful part)
    iter_000001000.partial a save in progress (or killed): never read, removed by the next save
    latest                 "iter_000000500": written (atomically) only after the directory is complete

A save writes into ``iter_X.partial``; when DCP returns (every rank's data and the metadata are on disk) rank
0 renames it to ``iter_X`` and then replaces ``latest``. A crash at any point leaves ``latest`` naming the
previous complete checkpoint. Parts are arbitrary named DCP ``Stateful`` objects: :class:`ModelState` and
:class:`OptimizerState` (FSDP-aware via ``torch.distributed.checkpoint.state_dict``), LR schedulers,
``TrainState`` (iteration + per-rank RNG), the data loader (per-rank position).

Reliability (``docs/reliability.md``): a checkpoint holds tensors and plain values only and is read without
unpickling objects (:mod:`rcm_train.safety`); a missing, incomplete or unreadable ``latest`` falls back to the
newest intact checkpoint with a warning naming the bad one; models with NaN/inf weights are never saved,
exported or accepted on load; a failed save (full disk included, named ENOSPC) raises
:class:`~rcm_train.safety.CheckpointError` naming the directory and leaves ``latest`` as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer

from rcm_train.safety import (
    CheckpointError,
    NonFiniteError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    check_finite_module,
    check_finite_state_dict,
)

__all__ = ["CheckpointConfig", "Checkpointer", "CheckpointError", "ModelState", "OptimizerState", "load_part",
           "save_weights", "export_module", "export_part"]

LATEST = "latest"
_PARTIAL = ".partial"


class CheckpointConfig(BaseModel):
    """Where and how training checkpoints are written."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    dir: str = "checkpoints"
    """Checkpoint root (iteration directories and the `latest` pointer)."""
    keep_last: int | None = Field(None, ge=1)
    """Delete older complete checkpoints beyond this many (None keeps all)."""
    async_save: bool = False
    """Write in a background thread after staging to CPU memory (finished at the next save or wait())."""

    def build(self, process_group: dist.ProcessGroup | None = None) -> Checkpointer:
        return Checkpointer(self.dir, keep_last=self.keep_last, async_save=self.async_save,
                            process_group=process_group)


class ModelState:
    """DCP Stateful for a module's parameters and buffers (sharded FSDP2 state as DTensors)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState:
    """DCP Stateful for an optimizer, keyed by parameter names (resharding-safe)."""

    def __init__(self, model: nn.Module, optimizer: Optimizer):
        self.model, self.optimizer = model, optimizer
        self._options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer, options=self._options)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state, options=self._options)


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Checkpointer:
    """Atomic DCP save / resume of named Stateful parts under ``root`` (see the module docstring).

    Every rank must call :meth:`save`, :meth:`wait` and :meth:`load` together (they are collective);
    the file system must be shared by all ranks.
    """

    def __init__(self, root: str | os.PathLike, *, keep_last: int | None = None, async_save: bool = False,
                 process_group: dist.ProcessGroup | None = None):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.group = process_group
        self._pending: tuple[Any, Path, Path] | None = None

    # ------------------------------------------------------------------------------------ queries
    def complete(self) -> list[Path]:
        """Complete checkpoint directories (with DCP metadata), newest first."""
        if not self.root.is_dir():
            return []
        done = [p for p in self.root.glob("iter_*") if p.is_dir() and not p.name.endswith(_PARTIAL)
                and (p / ".metadata").is_file()]
        return sorted(done, key=lambda p: p.name, reverse=True)

    def latest(self) -> Path | None:
        """The directory ``latest`` names, or None before the first complete save. When the pointer is
        missing or names a missing / incomplete directory, the newest complete checkpoint (with a warning
        naming the bad pointer)."""
        pointer = self.root / LATEST
        named = pointer.read_text().strip() if pointer.is_file() else None
        if named and (self.root / named / ".metadata").is_file():
            return self.root / named
        done = self.complete()
        if named is None and not done:
            return None
        why = f"{pointer} names {named}, which is not a complete checkpoint" if named else f"{pointer} is missing"
        if not done:
            raise CheckpointError(f"{why}, and no other complete checkpoint exists under {self.root}")
        warnings.warn(f"{why}: using {done[0]} instead", stacklevel=2)
        return done[0]

    def latest_iteration(self) -> int | None:
        path = self.latest()
        return None if path is None else _iteration(path)

    def path_for(self, iteration: int) -> Path:
        return self.root / f"iter_{iteration:09d}"

    # ------------------------------------------------------------------------------------ save
    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)

    def save(self, iteration: int, state: Mapping[str, Any]) -> Path:
        """Save ``state`` (``{part_name: Stateful | tensor | object}``) as iteration ``iteration``.

        Synchronous saves return when ``latest`` names the new checkpoint; async saves return after staging
        and are completed by the next :meth:`save` / :meth:`wait`.
        """
        self.wait()
        for name, part in state.items():  # never write NaN/inf weights (collective check)
            if isinstance(part, ModelState):
                check_finite_module(part.model, name, iteration=iteration, process_group=self.group)
        final = self.path_for(iteration)
        partial = final.with_name(final.name + _PARTIAL)
        try:
            if _rank0():
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)  # left by a crashed save
            self._barrier()
            kwargs = dict(checkpoint_id=partial, process_group=self.group, no_dist=not dist.is_initialized())
            with _single_process_is_intended():
                if self.async_save:
                    self._pending = (dcp.async_save(dict(state), **kwargs), partial, final)
                else:
                    dcp.save(dict(state), **kwargs)
                    self._finalize(partial, final)
        except (Exception, dcp.CheckpointException) as e:
            raise _save_error(e, partial) from e
        return final

    def wait(self) -> None:
        """Finish a pending async save (rename + ``latest``); no-op otherwise."""
        if self._pending is None:
            return
        pending, partial, final = self._pending
        self._pending = None
        try:
            # a Future, or (newer torch, custom stagers) a response whose upload_completion is the Future
            getattr(pending, "upload_completion", pending).result()
            self._finalize(partial, final)
        except (Exception, dcp.CheckpointException) as e:
            raise _save_error(e, partial) from e

    def interrupted(self) -> str:
        """After a Ctrl-C: finish a pending async save (a second Ctrl-C abandons it: its ``.partial`` directory
        is never read) and say which checkpoint a resume will use."""
        if self._pending is not None:
            try:
                self.wait()
            except KeyboardInterrupt:
                self._pending = None
        try:
            latest = self.latest()
        except CheckpointError:
            latest = None
        if latest is None:
            return f"no complete checkpoint under {self.root}: a resume starts from the beginning"
        return f"a resume will use {latest} (iteration {_iteration(latest)})"

    def _finalize(self, partial: Path, final: Path) -> None:
        if _rank0():
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.root)
            _write_atomic(self.root / LATEST, final.name)
            self._prune(keep=final)
        self._barrier()

    def _prune(self, keep: Path) -> None:
        if self.keep_last is None:
            return
        done = sorted(p for p in self.root.glob("iter_*") if p.is_dir() and not p.name.endswith(_PARTIAL))
        for old in done[: max(0, len(done) - self.keep_last)]:
            if old != keep:
                shutil.rmtree(old)

    # ------------------------------------------------------------------------------------ load
    def load(self, state: Mapping[str, Any], path: str | os.PathLike | None = None) -> Path:
        """Load the parts named in ``state`` in place from ``path`` (default: ``latest``); returns the path.

        Parts present in the checkpoint but absent from ``state`` are ignored; a part in ``state`` missing
        from the checkpoint raises.
        """
        if path is not None:
            path = Path(path)
            if path.name.endswith(_PARTIAL):
                raise ValueError(f"{path} is an incomplete save; load a complete iteration directory")
            self._load(state, path)
            return path
        first = self.latest()
        if first is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root} (no {LATEST} pointer)")
        candidates = [first] + [p for p in self.complete() if p.name < first.name]
        for i, candidate in enumerate(candidates):
            try:
                self._load(state, candidate)
                return candidate
            except (UnsafeCheckpointError, NonFiniteError):
                raise  # never silently step around a hostile or diverged checkpoint
            except CheckpointError as e:
                if i + 1 == len(candidates):
                    raise
                warnings.warn(f"{e}; falling back to {candidates[i + 1]}", stacklevel=2)
        raise AssertionError("unreachable")

    def _load(self, state: Mapping[str, Any], path: Path) -> None:
        _read(dict(state), path, process_group=self.group)
        for name, part in state.items():
            if isinstance(part, ModelState):
                check_finite_module(part.model, f"{name} loaded from {path}", process_group=self.group)


@contextlib.contextmanager
def _single_process_is_intended():
    """Silence DCP's "torch.distributed is disabled ... assuming the intent is to save/load in a single
    process" warning: without a process group, one process is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _iteration(path: Path) -> int:
    return int(path.name.removeprefix("iter_"))


def _read(state: dict[str, Any], path: Path, *, process_group: dist.ProcessGroup | None = None,
          single_process: bool = False) -> None:
    """``dcp.load`` through the safe reader and planner (collective unless ``single_process``); any failure
    names the checkpoint directory."""
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {path / '.metadata'})")
    SafeFileSystemReader(path).read_metadata()  # raises UnsafeCheckpointError itself (DCP would reword it)
    try:
        with _single_process_is_intended():
            dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(path),
                     process_group=process_group, no_dist=single_process or not dist.is_initialized())
    except (Exception, dcp.CheckpointException) as e:
        inner = _inner_errors(e)
        if any(isinstance(x, KeyboardInterrupt) for x in inner):
            raise KeyboardInterrupt() from None
        named = [x for x in inner if isinstance(x, UnsafeCheckpointError)] or \
            [x for x in inner if isinstance(x, CheckpointError)]
        if named:
            raise named[0] from None
        detail = "; ".join(f"{type(x).__name__}: {x}" for x in inner[:1]) or f"{type(e).__name__}: {e}"
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {detail}") from e


def _inner_errors(e: BaseException) -> list[BaseException]:
    """The original exceptions inside a DCP CheckpointException (or ``[e]``), causes included."""
    found: list[BaseException] = []
    todo = [e]
    while todo:
        x = todo.pop(0)
        if isinstance(x, dcp.CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in x.failures.values()]
            continue
        found.append(x)
        if x.__cause__ is not None and x.__cause__ not in found:
            todo.append(x.__cause__)
    return found


def _save_error(e: BaseException, partial: Path) -> BaseException:
    """A :class:`CheckpointError` naming the directory (and ENOSPC / a read-only target) for a failed save."""
    if isinstance(e, (CheckpointError, NonFiniteError)):
        return e
    inner = _inner_errors(e)
    if any(isinstance(x, KeyboardInterrupt) for x in inner):
        return KeyboardInterrupt()  # Ctrl-C inside DCP (which wraps it): the save is abandoned, latest unchanged
    first = inner[0] if inner else e
    os_errors = [x for x in inner if isinstance(x, OSError)]
    try:
        free = shutil.disk_usage(partial.parent if partial.parent.exists() else partial.parent.parent).free
    except OSError:
        free = None
    if any(x.errno == errno.ENOSPC for x in os_errors) or (free is not None and free < 1 << 20):
        return CheckpointError(f"no space left on device (ENOSPC) while writing checkpoint {partial}"
                               f"{'' if free is None else f' ({free} bytes free)'}; the previous checkpoint "
                               f"is intact ({type(first).__name__}: {first})")
    for x in os_errors:
        if x.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return CheckpointError(f"cannot write checkpoint {partial}: {os.strerror(x.errno)} "
                                   f"({x.filename or partial.parent})")
    return CheckpointError(f"saving checkpoint {partial} failed; the previous checkpoint is intact "
                           f"({type(first).__name__}: {first})")


# ------------------------------------------------------------------------------------------ export
def load_part(checkpoint: str | os.PathLike, part: str) -> dict[str, Tensor]:
    """Read one part's tensors (e.g. ``student_ema``) from a DCP checkpoint directory, in one process without
    a process group; keys are the module's own names (the part prefix removed)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise CheckpointError(f"{checkpoint} is not a complete checkpoint (no {checkpoint / '.metadata'})")
    metadata = SafeFileSystemReader(checkpoint).read_metadata()
    prefix = part + "."
    template = {k: torch.empty(md.size, dtype=md.properties.dtype)
                for k, md in metadata.state_dict_metadata.items()
                if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)}
    if not template:
        parts = sorted({k.split(".", 1)[0] for k in metadata.state_dict_metadata})
        raise KeyError(f"checkpoint {checkpoint} has no part {part!r}; parts: {parts}")
    _read(template, checkpoint, single_process=True)
    out = {k[len(prefix):]: v for k, v in template.items()}
    check_finite_state_dict(out, f"part {part!r} of checkpoint {checkpoint}")
    return out


def save_weights(state_dict: Mapping[str, Tensor], path: str | os.PathLike, *,
                 dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Write a state dict to ``.safetensors`` or ``.pth``/``.pt`` (floating tensors cast to ``dtype``)."""
    path = Path(path)
    check_finite_state_dict(state_dict, f"weights to be written to {path}")
    out = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
           for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(out, tmp)
    elif path.suffix in (".pth", ".pt"):
        torch.save(out, tmp)
    else:
        raise ValueError(f"unknown weight file type {path.suffix!r}: use .safetensors, .pth or .pt")
    os.replace(tmp, path)


def export_module(module: nn.Module, path: str | os.PathLike, *, dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Gather a (possibly FSDP-sharded) module's full state dict and write it on rank 0 (collective)."""
    check_finite_module(module, f"export to {path}")
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank0():
        save_weights(sd, path, dtype=dtype)
    if dist.is_initialized():
        dist.barrier()


def export_part(checkpoint: str | os.PathLike, part: str, path: str | os.PathLike, *,
                dtype: torch.dtype | None = torch.bfloat16) -> None:
    """Export one part of a DCP checkpoint (e.g. the EMA ``student_ema``) as official-key weights."""
    save_weights(load_part(checkpoint, part), path, dtype=dtype)
