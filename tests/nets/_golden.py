"""Loading the Wan2.1 golden fixtures (shared by every nets golden test).

The fixture directory comes from the env var ``WAN21_GOLDEN_DIR`` (default: ``tests/fixtures/wan21/golden``
of this checkout), so the same tests run unchanged on another golden set. A set ``<name>`` is three files:
``<name>.json`` (constructor kwargs, call semantics, input/output keys and shapes, tolerances),
``<name>.weights.safetensors`` (official state-dict keys, stored bf16: upcast to float32 here) and
``<name>.io.safetensors`` (``in.*`` inputs, ``out.*`` outputs, optional ``debug.*``). Tests read every config,
key list and shape from the JSON; nothing about a particular set is written in code.

Usage::

    from _golden import golden_names, load_golden
    @pytest.mark.parametrize("name", golden_names("WanModel"))
    def test_x(name):
        g = load_golden(name)          # skips when the set is absent
        g.meta["constructor_kwargs"], g.weights, g.io["in.t"], g.tensors(g.meta["inputs"]["x"]["keys"])
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

__all__ = ["Golden", "golden_dir", "golden_names", "load_golden", "manifest_dir", "tolerance"]

_DEFAULT = Path(__file__).resolve().parents[1] / "fixtures" / "wan21" / "golden"


def golden_dir() -> Path:
    """The golden directory: ``$WAN21_GOLDEN_DIR`` or this checkout's ``tests/fixtures/wan21/golden``."""
    return Path(os.environ.get("WAN21_GOLDEN_DIR", str(_DEFAULT)))


def manifest_dir() -> Path:
    """State-dict manifests: ``$WAN21_MANIFEST_DIR``, else ``manifests/`` next to the golden dir, else ours."""
    if "WAN21_MANIFEST_DIR" in os.environ:
        return Path(os.environ["WAN21_MANIFEST_DIR"])
    sibling = golden_dir().parent / "manifests"
    return sibling if sibling.is_dir() else _DEFAULT.parent / "manifests"


def golden_names(module_contains: str) -> list[str]:
    """Names of every set in the golden dir whose JSON ``module`` field contains ``module_contains``.

    E.g. ``"WanModel"`` (DiT), ``"WanVAE_"``, ``"T5Encoder"``, ``"VisionTransformer"`` / ``"clip"``. Returns a
    sorted list; an empty list (no such sets) still yields a skipped test through ``_NONE``.
    """
    d = golden_dir()
    names = []
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            try:
                meta = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if module_contains.lower() in str(meta.get("module", "")).lower():
                names.append(p.name[: -len(".json")])
    return names or [_NONE]


_NONE = "<no-golden-set>"


@dataclass
class Golden:
    """One golden set: ``meta`` (the JSON), ``weights`` (float32 state dict), ``io`` (tensors as stored)."""

    name: str
    meta: dict
    weights: dict[str, torch.Tensor] = field(repr=False)
    io: dict[str, torch.Tensor] = field(repr=False)

    def tensors(self, keys: list[str]) -> list[torch.Tensor]:
        """The io tensors for a list of keys, in order (missing keys raise KeyError naming the key)."""
        missing = [k for k in keys if k not in self.io]
        if missing:
            raise KeyError(f"{self.name}.io.safetensors lacks {missing}")
        return [self.io[k] for k in keys]


def load_golden(name: str, *, weights: bool = True) -> Golden:
    """Load ``<name>.json``, its weights (upcast to float32) and io tensors; ``pytest.skip`` if absent."""
    d = golden_dir()
    meta_path = d / f"{name}.json"
    if name == _NONE or not meta_path.is_file():
        pytest.skip(f"golden set {name!r} not found in {d} (set WAN21_GOLDEN_DIR)")
    meta = json.loads(meta_path.read_text())
    sd: dict[str, torch.Tensor] = {}
    if weights:
        wfile = meta.get("state_dict", {}).get("file", f"{name}.weights.safetensors")
        sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(d / wfile)).items()}
    io = load_file(str(d / f"{name}.io.safetensors"))
    return Golden(name, meta, sd, io)


def tolerance(meta: dict, default: float = 1e-4) -> dict[str, float]:
    """``{"atol", "rtol"}`` for float32 comparisons: the JSON's suggested values, else ``default``.

    The issue fixes 1e-4 for float32; a set may only tighten it (we never loosen beyond ``default``).
    """
    sug = meta.get("tolerance", {}).get("suggested", {})
    return {"atol": min(float(sug.get("atol", default)), default), "rtol": min(float(sug.get("rtol", default)), default)}
