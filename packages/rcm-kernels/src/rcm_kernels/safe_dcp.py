"""Reading torch DCP checkpoint metadata without running anything pickled in it.

DCP stores a checkpoint's index (``.metadata``) with :mod:`pickle`, and its stock reader unpickles it with no
restriction: a crafted directory runs code on load. :class:`SafeFileSystemReader` reads it with an unpickler
that resolves only DCP's own metadata classes and the torch value types they hold, and refuses anything else
before it runs. It lives here, the one package that both the network loader (rcm-nets) and the trainer
(rcm-train) depend on, so both read checkpoints through the same guard; rcm-train adds a load planner for
non-tensor items on top (``rcm_train.safety``). See ``docs/reliability.md``.
"""

from __future__ import annotations

import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

__all__ = ["UnsafeCheckpointError", "SafeFileSystemReader"]


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holding something other than tensors and plain values (e.g. a pickled object)."""


_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only DCP's metadata classes and the torch value types they hold."""

    def find_class(self, module: str, name: str) -> Any:
        obj = None
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            obj = obj if isinstance(obj, type) or name == "_MEM_FORMAT_ENCODING" else None
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            obj = getattr(torch, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            obj = super().find_class(module, name)
        elif module == "pathlib" and name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath"):
            obj = getattr(pathlib, name)
        elif (module, name) == ("collections", "OrderedDict"):
            obj = super().find_class(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return obj


class SafeFileSystemReader(FileSystemReader):
    """A :class:`FileSystemReader` whose metadata unpickler refuses anything but DCP metadata classes.

    Errors name the metadata file: a pickled object raises :attr:`unsafe_error`, any other unreadable
    metadata :attr:`read_error` (subclasses set their own error types; a missing file stays
    :class:`FileNotFoundError`).
    """

    unsafe_error: type[Exception] = UnsafeCheckpointError
    read_error: type[Exception] = RuntimeError

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as e:
            raise self.unsafe_error(f"checkpoint metadata {path} holds a pickled object ({e}): refused") from e
        except FileNotFoundError:
            raise
        except Exception as e:
            raise self.read_error(f"checkpoint metadata {path} is unreadable ({type(e).__name__}: {e})") from e
        if not isinstance(metadata, Metadata):
            raise self.unsafe_error(f"checkpoint metadata {path} is a {type(metadata).__name__}: refused")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
