"""rcm_train: FSDP2 + Ulysses context parallel + activation checkpointing applied from outside, crash-safe
DCP checkpoints, webdataset data, and the rCM training loop (DESIGN.md, docs/train.md).

Submodules: ``parallel`` (mesh, parallelize), ``checkpoint``, ``data``, ``trainer``, ``objectives`` (rCM
closures over ``rcm_losses``), ``logging``. The names below are imported lazily (DCP and DTensor pull in
several seconds of torch imports that, e.g., a data-only user does not need).
"""

from importlib import import_module

_EXPORTS = {
    "MeshConfig": "parallel", "ParallelConfig": "parallel", "build_mesh": "parallel",
    "init_distributed": "parallel", "parallelize": "parallel",
    "CheckpointConfig": "checkpoint", "Checkpointer": "checkpoint", "export_module": "checkpoint",
    "export_part": "checkpoint",
    "DataConfig": "data", "ShardLoader": "data", "ShardWriter": "data",
    "OptimizerConfig": "trainer", "TrainConfig": "trainer", "TrainParts": "trainer", "build_optimizer": "trainer",
    "build_scheduler": "trainer", "train": "trainer",
    "RCMObjective": "objectives", "RCMObjectiveConfig": "objectives",
    "LoggerConfig": "logging", "MetricsLogger": "logging",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"rcm_train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rcm_train' has no attribute {name!r}")
