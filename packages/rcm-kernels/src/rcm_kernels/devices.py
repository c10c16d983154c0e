"""Device and dtype names as configs spell them: the one parser every rcm package uses.

It lives in rcm-kernels because that is the one package rcm-nets, rcm-train and rcm-pipelines all depend on.
Dtype names are torch's own (``"bfloat16"``, not ``"bf16"``).
"""

from __future__ import annotations

import os
from typing import Literal

import torch

__all__ = ["DTypeName", "parse_dtype", "resolve_device"]

DTypeName = Literal["float32", "bfloat16", "float16", "float64"]
"""A floating-point dtype by its torch name."""

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                   "float16": torch.float16, "float64": torch.float64}


def parse_dtype(name: str | torch.dtype, *, field: str = "dtype") -> torch.dtype:
    """``torch.<name>`` for a :data:`DTypeName` (a ``torch.dtype`` passes through); raises naming ``field``."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"{field}: unknown dtype {name!r} (one of {', '.join(_DTYPES)})") from None


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``cuda``: ``cuda:LOCAL_RANK`` (the
    process's GPU under torchrun, 0 otherwise); anything else as torch reads it (``cpu``, ``cuda:1``). Raises
    when CUDA is asked for but absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} but CUDA is not available (use --device=cpu or auto)")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev
