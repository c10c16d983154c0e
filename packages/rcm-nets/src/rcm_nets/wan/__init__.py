"""Wan2.1 networks: DiT (T2V/I2V, JVP and causal modes), VAE, umT5 encoder + tokenizer, CLIP visual tower.

Names are imported lazily so that each submodule loads only when used.
"""

from importlib import import_module

_EXPORTS = {
    "WanDiT": ".dit",
    "WanConfig": ".configs",
    "get_config": ".configs",
    "WanVAE": ".vae",
    "UMT5Encoder": ".t5",
    "Tokenizer": ".tokenizer",
    "CLIPVisual": ".clip",
    "MeanFlowWanDiT": ".meanflow",
    "meanflow_student_state_dict": ".meanflow",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
