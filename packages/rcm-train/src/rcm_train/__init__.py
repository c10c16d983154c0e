"""rcm_train: FSDP2 + Ulysses context parallel + activation checkpointing applied from outside, crash-safe
DCP checkpoints, webdataset data, and the rCM training loop (DESIGN.md, docs/train.md).

Submodules: ``parallel`` (mesh, parallelize), ``checkpoint``, ``data``, ``trainer``, ``objectives`` (rCM
closures over ``rcm_losses``), ``logging``.
"""

from rcm_train.checkpoint import CheckpointConfig, Checkpointer, export_module, export_part
from rcm_train.data import DataConfig, ShardLoader, ShardWriter
from rcm_train.logging import LoggerConfig, MetricsLogger
from rcm_train.parallel import MeshConfig, ParallelConfig, build_mesh, init_distributed, parallelize
from rcm_train.trainer import (
    OptimizerConfig,
    TrainConfig,
    TrainParts,
    build_optimizer,
    build_scheduler,
    train,
)

__all__ = [
    "MeshConfig", "ParallelConfig", "build_mesh", "init_distributed", "parallelize",
    "CheckpointConfig", "Checkpointer", "export_module", "export_part",
    "DataConfig", "ShardLoader", "ShardWriter",
    "OptimizerConfig", "TrainConfig", "TrainParts", "build_optimizer", "build_scheduler", "train",
    "LoggerConfig", "MetricsLogger",
]
