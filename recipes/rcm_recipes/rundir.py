"""A run directory that never lies about what made its contents.

:func:`open_run` is called once every input of a run has been checked (files exist, configs validate) and
before anything is written. It compares the resolved config with the one stored in the directory:

* a new directory: the config is recorded;
* the same config (a resume, a rerun of a finished run): the attempt is recorded;
* another config: refused, naming the fields that differ, unless the caller allows changes
  (``--allow_config_change=true``), and fields that can never change on resume (those the checkpoints
  or the outputs already hold: the optimizer, the data, the shapes of a dataset) are refused even then.

The stored config (``config.yaml``) is written atomically (a temporary file renamed over it) and every attempt
also gets its own ``attempts/<n>.yaml``, so the history of a resumed run stays readable. docs/reliability.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

__all__ = ["RunConfigMismatch", "config_changes", "open_run", "write_atomic"]

_MAX_LISTED = 6


class RunConfigMismatch(ValueError):
    """An existing run directory was made with another configuration."""


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: data}


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any],
                   ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """``(dotted field, old value, new value)`` for every leaf that differs (absent = None), skipping fields
    under the ``ignore`` prefixes; sorted by field."""
    a, b, ignore = _flatten(old), _flatten(new), tuple(ignore)
    # YAML reads a tuple back as a list: compare in the dumped (JSON) form on both sides
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if not _matches(k, ignore) and a.get(k) != b.get(k)]


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename (a crash leaves
    the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _describe(changes: list[tuple[str, Any, Any]]) -> str:
    shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes[:_MAX_LISTED])
    more = f" (and {len(changes) - _MAX_LISTED} more)" if len(changes) > _MAX_LISTED else ""
    return f"{len(changes)} field(s) differ: {shown}{more}"


def open_run(directory: str | Path, config: BaseModel, *, name: str = "config.yaml", allow_changes: bool = False,
             frozen: Iterable[str] = (), ignore: Iterable[str] = (), write: bool = True) -> list[tuple[str, Any, Any]]:
    """Check ``config`` against the one stored in ``directory/name`` and record this attempt.

    ``ignore``: fields that may differ freely (the output directory itself, the allow flag, logging).
    ``frozen``: fields that may never differ from a stored config (refused even with ``allow_changes``).
    ``write=False`` only checks (the other ranks of a job: rank 0 writes). Returns the changes accepted.
    Raises :class:`RunConfigMismatch` naming the directory and the fields. Nothing is written on refusal.
    """
    directory = Path(directory)
    stored_path = directory / name
    data = config.model_dump(mode="json")
    changes: list[tuple[str, Any, Any]] = []
    if stored_path.is_file():
        try:
            stored = yaml.safe_load(stored_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise RunConfigMismatch(f"{stored_path} is not readable YAML ({e}); move it away or choose a new "
                                    "output directory") from None
        changes = config_changes(stored, data, ignore)
        fixed = [c for c in changes if _matches(c[0], frozen)]
        if fixed:
            raise RunConfigMismatch(f"{directory} holds a run whose {', '.join(k for k, _, _ in fixed[:3])} "
                                    f"cannot change ({_describe(fixed)}): choose a new output directory")
        if changes and not allow_changes:
            raise RunConfigMismatch(f"{directory} holds a run made with another configuration ({_describe(changes)}): "
                                    "pass --allow_config_change=true to continue it with the new values, or choose "
                                    "a new output directory")
    if write:
        text = yaml.safe_dump(data, sort_keys=False)
        attempts = directory / "attempts"
        n = len(list(attempts.glob("*.yaml"))) if attempts.is_dir() else 0
        write_atomic(attempts / f"{n + 1:03d}.yaml", text)
        write_atomic(stored_path, text)
    return changes
