"""rcm_nets: the Wan2.1 networks (:mod:`rcm_nets.wan`) and strict checkpoint loading (:mod:`rcm_nets.checkpoint`).

Submodules and names are imported lazily, so ``import rcm_nets`` stays cheap.
"""

from importlib import import_module

_EXPORTS = {"load_checkpoint": ".checkpoint", "read_state_dict": ".checkpoint", "CheckpointError": ".checkpoint"}
_SUBMODULES = ("wan", "checkpoint")

__all__ = [*_SUBMODULES, *_EXPORTS]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
