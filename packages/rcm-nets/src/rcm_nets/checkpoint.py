"""Strict checkpoint loading for the official Wan2.1 files and our own exports.

Formats: PyTorch ``.pth``/``.pt``/``.bin`` (read with ``weights_only=True``, memory-mapped when possible),
``.safetensors`` (one file, or a directory of shards with or without a ``*.safetensors.index.json``), and
``torch.distributed.checkpoint`` (DCP) directories (read without a process group). Nested dicts are
flattened with dots, as DCP does; non-tensor entries are dropped.

Loading is strict by default: one error lists every missing key, unexpected key and shape mismatch
before anything is copied (no silent partial load). A wrapper prefix such as ``net.`` / ``net_ema.`` (rCM
checkpoints) is detected against the module's own keys, stripped, and reported. A diffusers
``WanTransformer3DModel`` state dict is renamed to the official keys (``rcm_nets.wan.diffusers_format``). Models built on ``meta``
are loaded with ``assign=True`` (no second copy of the weights); tensors are cast to the module's dtypes
(or to ``dtype``). Typical use::

    with torch.device("meta"):
        net = WanDiT.from_config("t2v-1.3B", dtype=torch.bfloat16)
    report = load_checkpoint(net, "Wan2.1-T2V-1.3B/", device="cuda")
    print(report)
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "LoadReport", "read_state_dict", "read_dcp_part", "load_checkpoint", "check_state_dict"]

_PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose keys/shapes do not match the module."""


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    source: str
    format: str
    prefix: str = ""
    """Prefix stripped from the file's keys ('' = none)."""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    """Entries outside the chosen prefix, or not tensors; never loaded."""
    cast: int = 0
    """Number of tensors converted to another dtype."""

    def __str__(self) -> str:
        parts = [f"loaded {self.source} ({self.format})"]
        if self.prefix:
            parts.append(f"stripped prefix {self.prefix!r}")
        for name in ("missing", "unexpected", "ignored"):
            if getattr(self, name):
                parts.append(f"{len(getattr(self, name))} {name}")
        if self.cast:
            parts.append(f"{self.cast} tensors cast")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------- reading
def _flatten(obj, prefix: str, out: dict[str, Tensor], dropped: list[str]) -> None:
    if isinstance(obj, Tensor):
        out[prefix[:-1]] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out, dropped)
    else:
        dropped.append(prefix[:-1])


def _corrupt(path: Path, kind: str, err: Exception) -> CheckpointError:
    return CheckpointError(f"cannot read {path} as {kind}: the file may be truncated or corrupt "
                           f"({type(err).__name__}: {err})")


def _read_pth(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # legacy (non-zip) files cannot be memory-mapped: retry below
            raise _corrupt(path, "a PyTorch checkpoint", err) from err
    except Exception as err:  # noqa: BLE001 - any failure to unpickle is reported with its cause
        raise _corrupt(path, "a PyTorch checkpoint (weights_only=True)", err) from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise _corrupt(path, "a PyTorch checkpoint (weights_only=True)", err) from err


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise _corrupt(path, "safetensors", err) from err


def _read_safetensors_dir(path: Path) -> dict[str, Tensor]:
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        try:
            files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as err:
            raise _corrupt(index[0], "a safetensors index", err) from err
        paths = [path / f for f in files]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent:
            raise CheckpointError(f"{index[0]} names shards that are absent: {absent}")
    else:
        paths = sorted(path.glob("*.safetensors"))
    sd: dict[str, Tensor] = {}
    for p in paths:
        part = _read_safetensors(p)
        dup = sorted(set(part) & set(sd))
        if dup:
            raise CheckpointError(f"{p} repeats keys of another shard: {dup[:_MAX_LISTED]}")
        sd.update(part)
    return sd


def read_dcp_part(path: str | Path, part: str) -> dict[str, Tensor]:
    """The tensors of one part (e.g. ``student_ema``) of a DCP training checkpoint, with the ``part.`` prefix
    removed; only that part is read. (``rcm_train.checkpoint.load_part`` is the trainer's twin: rcm-train
    does not depend on rcm-nets.)"""
    sd = _read_dcp(Path(path), prefix=part + ".")
    if not sd:
        from rcm_kernels.safe_dcp import SafeFileSystemReader

        keys = SafeFileSystemReader(str(path)).read_metadata().state_dict_metadata
        raise CheckpointError(f"checkpoint {path} has no part {part!r}; parts: {sorted({k.split('.', 1)[0] for k in keys})}")
    return {k[len(part) + 1:]: v for k, v in sd.items()}


def _read_dcp(path: Path, prefix: str = "") -> dict[str, Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from rcm_kernels.safe_dcp import SafeFileSystemReader, UnsafeCheckpointError

    try:
        reader = SafeFileSystemReader(str(path))  # its metadata unpickler refuses anything but DCP's classes
        meta = reader.read_metadata()
        sd = {k: torch.empty(m.size, dtype=m.properties.dtype)
              for k, m in meta.state_dict_metadata.items()
              if isinstance(m, TensorStorageMetadata) and k.startswith(prefix)}
        if not sd:
            return sd
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no process group, loading without one" is the intent here
            dcp.load(sd, storage_reader=reader, no_dist=True)
    except UnsafeCheckpointError as err:
        raise CheckpointError(str(err)) from None
    except Exception as err:  # noqa: BLE001
        raise _corrupt(path, "a DCP checkpoint", err) from err
    return sd


def read_state_dict(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """Read every tensor of a checkpoint into a flat ``{key: tensor}`` dict (on CPU) and name its format.

    Raises :class:`CheckpointError` naming the file when it is absent, truncated or corrupt.
    """
    p = Path(path)
    if p.is_dir():
        if (p / ".metadata").is_file():
            return _read_dcp(p), "dcp"
        if any(p.glob("*.safetensors")):
            return _read_safetensors_dir(p), "safetensors (sharded)"
        raise CheckpointError(f"{p} is a directory with neither DCP '.metadata' nor '*.safetensors' files")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if p.suffix == ".safetensors":
        return _read_safetensors(p), "safetensors"
    if p.suffix in _PTH_SUFFIXES:
        obj, dropped = _read_pth(p), []
        sd: dict[str, Tensor] = {}
        _flatten(obj, "", sd, dropped)
        return sd, "pth"
    raise CheckpointError(f"unknown checkpoint format {p.suffix!r} of {p}: use .pth/.pt/.safetensors or a DCP dir")


# ------------------------------------------------------------------------------------------ checking
def _detect_prefix(keys: list[str], expected: set[str]) -> str:
    """The prefix P such that stripping it from the file's keys matches the most module keys."""
    if expected <= set(keys):
        return ""
    votes: dict[str, int] = {}
    for k in keys:
        for i, ch in enumerate(k):
            if ch == "." and k[i + 1:] in expected:
                votes[k[: i + 1]] = votes.get(k[: i + 1], 0) + 1
    if not votes:
        return ""
    best = max(votes.values())
    if best <= sum(k in expected for k in keys):
        return ""
    winners = sorted(p for p, n in votes.items() if n == best)
    if len(winners) > 1:
        raise CheckpointError(f"the checkpoint holds several copies of the model under prefixes {winners}; "
                              f"pass prefix= one of them (e.g. prefix={winners[0]!r})")
    return winners[0]


def _listing(title: str, items: list[str]) -> str:
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {title} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{more}"


def check_state_dict(expected: dict[str, torch.Size], sd: dict[str, Tensor], *, strict: bool = True,
                     source: str = "state dict") -> tuple[list[str], list[str]]:
    """Compare keys/shapes; returns ``(missing, unexpected)``.

    Raises :class:`CheckpointError` listing every problem when shapes differ, or when ``strict`` and any key
    is missing or unexpected.
    """
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    bad = sorted(f"{k}: file {list(sd[k].shape)} vs model {list(expected[k])}"
                 for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k]))
    if bad or (strict and (missing or unexpected)):
        lines = [f"{source} does not match the model:"]
        lines += [_listing(t, v) for t, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                               ("shape mismatches", bad)) if v]
        raise CheckpointError("\n".join(lines))
    return missing, unexpected


# ------------------------------------------------------------------------------------------- loading
def _from_foreign_layout(sd: dict[str, Tensor], expected: dict, fmt: str) -> tuple[dict[str, Tensor], str]:
    """A diffusers-layout Wan transformer (``WanTransformer3DModel`` keys) renamed to the official keys when
    the module has the official ones; any other state dict as it is."""
    from .wan.diffusers_format import is_diffusers_state_dict, state_dict_from_diffusers

    if is_diffusers_state_dict(sd) and not is_diffusers_state_dict(expected):
        return state_dict_from_diffusers(sd), f"{fmt}, diffusers layout"
    return sd, fmt


def _unflatten_conv_weights(sd: dict[str, Tensor], expected: dict) -> dict[str, Tensor]:
    """A convolution weight stored as the equivalent Linear weight ``[out, in * prod(kernel)]`` (rCM's released
    DiT checkpoints store ``patch_embedding.weight`` as ``[dim, 64]``: its patchify is a Linear over the
    ``(c, kt, kh, kw)``-flattened patch) viewed back to the module's ``[out, in, *kernel]`` shape. The order of
    the flattened axes is the convolution weight's own, so this is a pure reshape."""
    out = dict(sd)
    for k, v in sd.items():
        shape = expected.get(k)
        if (shape is not None and k.endswith("patch_embedding.weight") and v.dim() == 2 and len(shape) > 2
                and v.shape[0] == shape[0] and v.numel() == math.prod(shape)):
            out[k] = v.reshape(shape)
    return out


def load_checkpoint(module: nn.Module, checkpoint: str | Path | dict[str, Tensor], *, strict: bool = True,
                    prefix: str | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, assign: bool | None = None) -> LoadReport:
    """Load a checkpoint file/directory (or a state dict) into ``module``; returns a :class:`LoadReport`.

    Args:
        strict: every module key must be present and every file key used (after the prefix).
        prefix: key prefix to strip (``"net."``); ``None`` detects it against the module's keys.
        dtype: cast floating tensors to it; default: each to the dtype of the module's tensor.
        device: move tensors there before loading (e.g. meta-built module straight onto the GPU).
        assign: ``load_state_dict(assign=...)``; default True when the module has meta tensors.
    """
    if isinstance(checkpoint, dict):
        source, fmt, sd = "state dict", "dict", checkpoint
    else:
        source = str(checkpoint)
        sd, fmt = read_state_dict(checkpoint)
    target = module.state_dict()
    expected = {k: v.shape for k, v in target.items()}
    sd, fmt = _from_foreign_layout(sd, expected, fmt)
    if prefix is None:
        prefix = _detect_prefix(list(sd), set(expected))
    ignored = [k for k in sd if not k.startswith(prefix)]
    sd = _unflatten_conv_weights({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, expected)
    missing, unexpected = check_state_dict(expected, sd, strict=strict, source=source)
    report = LoadReport(source, fmt, prefix, missing, unexpected, ignored)
    if not strict and (missing or unexpected):
        warnings.warn(f"non-strict load of {source}: {len(missing)} missing, {len(unexpected)} unexpected keys",
                      stacklevel=2)
    out = {}
    for k, v in sd.items():
        if k not in target:
            continue
        want = (dtype or target[k].dtype) if v.is_floating_point() else v.dtype
        if v.dtype != want:
            report.cast += 1
        out[k] = v.to(device=device, dtype=want)
    if assign is None:
        assign = any(t.is_meta for t in target.values())
    if not assign and any(t.is_meta for t in target.values()):
        raise CheckpointError("the module has meta tensors: load with assign=True (or materialize it first)")
    module.load_state_dict(out, strict=strict, assign=assign)
    return report
