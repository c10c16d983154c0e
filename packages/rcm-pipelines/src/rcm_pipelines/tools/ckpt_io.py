"""Checkpoint reading / writing shared by the tools: every format, bit-exact, plus named module layouts.

Formats: PyTorch ``.pth`` / ``.pt`` (a flat ``{key: tensor}`` dict, ``torch.save``), ``.safetensors`` (one file),
and DCP directories (``torch.distributed.checkpoint``, written without a process group). Reading goes
through ``rcm_nets.checkpoint.read_state_dict`` (which also reads sharded safetensors directories). Nothing
is cast unless asked, so a conversion keeps every bit; writes go to a temporary name and are renamed.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from rcm_kernels.devices import DTypeName, parse_dtype
from rcm_nets.checkpoint import read_state_dict

__all__ = ["Format", "DTYPES", "WRAPPER_PREFIXES", "read", "write", "format_of", "cast", "strip_prefix",
           "detect_prefix", "named_module", "MODULE_NAMES", "bitwise_equal"]

Format = Literal["pth", "safetensors", "dcp"]
DTYPES = {name: parse_dtype(name) for name in get_args(DTypeName)}
WRAPPER_PREFIXES = ("net.", "net_ema.", "model.", "module.", "diffusion_model.")
"""Prefixes that training wrappers put in front of a module's keys."""


def format_of(path: str | Path, to: str | None = None) -> Format:
    """The output format: ``to`` if given, else from the suffix (``.safetensors``, ``.pth``/``.pt``; a
    ``.dcp`` suffix or no suffix is a DCP directory)."""
    if to is not None:
        if to not in ("pth", "safetensors", "dcp"):
            raise ValueError(f"unknown format {to!r}: use pth, safetensors or dcp")
        return to  # type: ignore[return-value]
    suffix = Path(path).suffix
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in (".pth", ".pt"):
        return "pth"
    if suffix in ("", ".dcp"):
        return "dcp"
    raise ValueError(f"cannot tell the format of {path} from its suffix {suffix!r}: use .pth, .pt, .safetensors, "
                     ".dcp (directory) or pass the format explicitly")


def read(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """Every tensor of a checkpoint as a flat dict (CPU) and its format name."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_state_dict(path)


def _safetensors_ready(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """safetensors refuses tensors sharing storage and non-contiguous ones: give each its own copy."""
    out, seen = {}, set()
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        shared = ptr is not None and ptr in seen
        if ptr is not None:
            seen.add(ptr)
        out[k] = v.contiguous().clone() if shared or not v.is_contiguous() else v
    return out


def write(sd: Mapping[str, Tensor], path: str | Path, fmt: Format | None = None,
          metadata: Mapping[str, str] | None = None) -> Path:
    """Write a flat state dict in ``fmt`` (default: from the suffix) atomically; values are not changed.

    ``metadata`` goes into the safetensors header (ignored by the other formats).
    """
    path = Path(path)
    fmt = fmt or format_of(path)
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"only tensors can be written, not {bad[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    cpu = {k: v.detach().cpu() for k, v in sd.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(_safetensors_ready(cpu), str(tmp), metadata=dict(metadata or {}))
    elif fmt == "pth":
        torch.save(cpu, tmp)
    else:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group: saving in a single process" is the intent
            dcp.save(cpu, checkpoint_id=str(tmp), no_dist=True)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.replace(tmp, path)
    return path


def cast(sd: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Floating tensors cast to ``dtype`` (None: unchanged); integer / bool tensors never change."""
    if dtype is None:
        return dict(sd)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def strip_prefix(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys with ``prefix`` removed; raises listing the keys that lack it."""
    lacking = [k for k in sd if not k.startswith(prefix)]
    if lacking:
        raise KeyError(f"{len(lacking)} keys do not start with {prefix!r}, e.g. {lacking[:5]}")
    return {k[len(prefix):]: v for k, v in sd.items()}


def detect_prefix(keys: list[str], expected: set[str]) -> str:
    """The prefix whose removal matches most of ``expected`` ('' when the keys match as they are)."""
    votes: dict[str, int] = {"": sum(k in expected for k in keys)}
    for k in keys:
        for i, ch in enumerate(k):
            if ch == "." and k[i + 1:] in expected:
                votes[k[: i + 1]] = votes.get(k[: i + 1], 0) + 1
    return max(votes, key=lambda p: (votes[p], p == ""))


# ------------------------------------------------------------------------------------------ layouts
MODULE_NAMES = ("t2v-1.3B", "t2v-14B", "i2v-14B", "i2v-A14B", "tiny", "tiny-i2v", "tiny-pixel", "vae", "umt5-xxl",
                "clip-vit-h-14")
"""Names :func:`named_module` builds: the WanDiT configs (plus Wan2.2's "i2v-A14B"), the Wan2.1 VAE, the
umT5-xxl encoder and the CLIP visual tower (whose file keys carry a ``visual.`` prefix)."""


def named_module(name: str) -> nn.Module:
    """The module of a named layout, built on ``meta`` (keys, shapes and dtypes only, no memory)."""
    from rcm_nets.wan import CLIPVisual, UMT5Encoder, WanDiT, WanVAE
    from rcm_nets.wan.configs import CONFIG_NAMES, get_config

    with torch.device("meta"):
        if name == "i2v-A14B":
            return WanDiT(get_config("t2v-14B", in_dim=36))
        if name in CONFIG_NAMES:
            return WanDiT(get_config(name))
        if name == "vae":
            return WanVAE()
        if name == "umt5-xxl":
            return UMT5Encoder()
        if name == "clip-vit-h-14":
            return CLIPVisual()
    raise KeyError(f"unknown layout {name!r}; choose one of {list(MODULE_NAMES)}")


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
