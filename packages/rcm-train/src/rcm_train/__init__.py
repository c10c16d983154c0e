"""rcm_train: FSDP2 + Ulysses context parallel + activation checkpointing applied from outside, crash-safe
DCP checkpoints, webdataset data, the training loop, the objectives and the staged driver (docs/train.md).

Submodules: ``parallel`` (mesh, parallelize), ``checkpoint``, ``data``, ``trainer`` (the loop), ``objectives``
(rCM, Causal-rCM and flow-matching closures over ``rcm_losses``), ``stages`` (the staged driver), ``runtime``
(rank / process group / mesh helpers), ``logging``. The names below are imported lazily (DCP and DTensor pull in
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
    "RCMObjective": "objectives", "RCMObjectiveConfig": "objectives", "CausalRCMObjective": "objectives",
    "CausalObjectiveConfig": "objectives", "FlowMatchingObjective": "objectives", "FlowMatchingConfig": "objectives",
    "StagedRunConfig": "stages", "Stage": "stages", "StageSetup": "stages", "run_stage": "stages",
    "build_network": "stages", "DeviceData": "data", "seeded_generator": "trainer",
    "LoggerConfig": "logging", "MetricsLogger": "logging",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"rcm_train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'rcm_train' has no attribute {name!r}")
