"""The staged-training driver every distillation recipe uses: a run is a sequence of stages, each one
:func:`rcm_train.trainer.train` call with its own checkpoint directory.

* A rerun resumes the stage in progress and skips finished ones (their exports are re-written from the last
  checkpoint if missing).
* Networks are built on ``meta``, parallelized (``rcm_train.parallel.parallelize``), materialized on the
  device and filled from a full state dict (:func:`build_network`) — the same path on one CPU process and on
  N GPUs. The driver never names a network class: a recipe passes a module factory.
* What a stage trains is built by the recipe's ``setup`` callable only when the stage runs
  (:class:`StageSetup`: networks, optimizers, EMA copies, the objective, an optional sample hook).
* At the end of a stage: last samples, then ``<output_dir>/<stage>/student.safetensors`` and
  ``student_ema.safetensors`` (:func:`stage_exports`); :func:`load_stage_student` gives the next stage its
  start, :func:`publish` copies a run's final weights to the top of the run directory.

Layout of a run directory: ``config.yaml``, ``checkpoints/<stage>/`` (DCP), ``logs/<stage>/metrics.jsonl`` and
``media/``, ``<stage>/student*.safetensors``. docs/train.md describes the loop and the checkpoints.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from .checkpoint import CheckpointConfig, export_module, export_part, load_part
from .logging import LoggerConfig, MetricsLogger
from .parallel import ParallelConfig, parallelize
from .parallel.mesh import ParallelMesh
from .runtime import is_rank0, print0
from .trainer import Objective, ScheduleConfig, TrainConfig, TrainParts, train

__all__ = ["StagedRunConfig", "Stage", "StageSetup", "StageResult", "SampleHook", "build_network", "run_stage",
           "stage_exports", "load_stage_student", "publish"]

SampleHook = Callable[[int, Mapping[str, nn.Module]], "dict[str, Tensor] | None"]
"""``(iteration, models) -> {"samples": video [3, T, H, W]}`` on rank 0 (None elsewhere); every rank calls it
(FSDP / context-parallel network calls are collective)."""

_PER_STAGE = {"max_iter": "stageN.iterations", "schedule": "stageN.schedule", "student_models": "the recipe",
              "critic_models": "the recipe", "sample_every": "sample.every"}


class StagedRunConfig(BaseModel):
    """Settings shared by every stage of a run (nested by the distillation recipes as ``run``)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    train: TrainConfig = TrainConfig(checkpoint_every=500)
    """The loop (grad_accum, clip_norm, seed, EMA rate and shift, checkpoint_every). Its per-stage fields
    (max_iter, schedule, student_models, critic_models, sample_every) are set by the stages and refused here."""
    checkpoint: CheckpointConfig = CheckpointConfig(keep_last=3)
    """keep_last and async_save of every stage's checkpoints (the directory is ``checkpoints/<stage>``)."""
    logger: LoggerConfig = LoggerConfig(every=50)
    """Metrics every N iterations, console, wandb (dir, run name and job type are set per stage; the group
    defaults to the run directory's name)."""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Dtype of the exported student / EMA weights."""

    @model_validator(mode="after")
    def _check(self) -> StagedRunConfig:
        # A value here would be ignored: refuse it (the defaults pass, so a dumped config.yaml reads back).
        default = TrainConfig()
        for name in sorted(_PER_STAGE):
            if getattr(self.train, name) != getattr(default, name):
                raise ValueError(f"run.train.{name} is set per stage: use {_PER_STAGE[name]}")
        if self.checkpoint.dir != CheckpointConfig().dir:
            raise ValueError("run.checkpoint.dir is set per stage (<output_dir>/checkpoints/<stage>)")
        if self.logger.dir != LoggerConfig().dir or self.logger.wandb_name is not None or \
                self.logger.wandb_job_type is not None:
            raise ValueError("run.logger.dir, wandb_name and wandb_job_type are set per stage")
        return self


@dataclass
class StageSetup:
    """What one stage trains: the networks (trained ones with optimizers / schedulers, frozen ones without),
    EMA copies, the objective binding them, and an optional periodic sample hook."""

    parts: TrainParts
    objective: Objective
    sample_hook: SampleHook | None = None


@dataclass
class Stage:
    """One stage of a run. ``setup`` is called only when the stage has iterations left."""

    name: str
    iterations: int
    setup: Callable[[], StageSetup]
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    critic_models: list[str] = field(default_factory=list)
    describe: str = ""


@dataclass
class StageResult:
    """A finished stage: last iteration, its last checkpoint directory and the exported weights."""

    iteration: int
    checkpoint: Path
    exports: dict[str, Path]


def build_network(factory: Callable[[], nn.Module], state_dict: Mapping[str, Tensor], *, mesh: ParallelMesh | None,
                  parallel: ParallelConfig, device: torch.device, trainable: bool) -> nn.Module:
    """``factory()`` built on meta, parallelized, materialized on ``device`` and loaded (strictly) from the
    full ``state_dict`` (every rank passes the whole dict; FSDP keeps its shard). The factory fixes the
    parameter dtype; ``mesh=None`` (one process, no group) applies activation checkpointing only. Missing or
    unexpected keys raise a ValueError naming them, and so do non-persistent buffers (nothing would fill them)."""
    with torch.device("meta"):
        net = factory()
    # DCP's full-state-dict load reports no missing key (torch 2.x): check the names here, before any work
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(f"state dict does not match {type(net).__name__}: {len(missing)} missing "
                         f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    transient = sorted(name for name, _ in net.named_buffers() if name not in expected)
    if transient:  # to_empty would leave them uninitialized and nothing loads them
        raise ValueError(f"{type(net).__name__} has non-persistent buffers {transient[:3]}: build_network "
                         "cannot fill them from a state dict")
    parallelize(net, mesh, parallel)
    net.to_empty(device=device)
    set_model_state_dict(net, dict(state_dict), options=StateDictOptions(full_state_dict=True, strict=True))
    return net.requires_grad_(trainable)


def stage_exports(stage_dir: Path) -> dict[str, Path]:
    """Where a stage's ``student`` and ``student_ema`` weights are exported."""
    return {"student": stage_dir / "student.safetensors", "student_ema": stage_dir / "student_ema.safetensors"}


def _export_finished(ckpt: Path, stage_dir: Path, dtype: torch.dtype) -> dict[str, Path]:
    """A finished stage's exports, written from checkpoint ``ckpt`` on rank 0 where missing (then a barrier)."""
    paths = stage_exports(stage_dir)
    if is_rank0():
        for name, path in paths.items():
            if not path.exists():
                export_part(ckpt, name, path, dtype=dtype)
    if dist.is_initialized():
        dist.barrier()
    return paths


def run_stage(stage: Stage, run: StagedRunConfig, *, output_dir: str | Path, data: Callable[[], Iterable[Any]],
              sample_every: int = 0, dp_rank: int = 0, device: torch.device | None = None,
              run_config: Mapping[str, Any] | None = None) -> StageResult:
    """Train ``stage`` (resuming from its last checkpoint; a finished stage only re-exports) and export
    ``student`` / ``student_ema``. ``data()`` builds the stage's batch iterable (a DCP Stateful position is
    saved with the checkpoints when it has ``state_dict``)."""
    out = Path(output_dir)
    stage_dir = out / stage.name
    ckpt = run.checkpoint.model_copy(update={"dir": str(out / "checkpoints" / stage.name)}).build()
    dtype = getattr(torch, run.export_dtype)
    done = ckpt.latest_iteration()
    if done is not None and done >= stage.iterations:
        print0(f"stage {stage.name}: complete ({done} iterations), skipped")
        return StageResult(done, ckpt.latest(), _export_finished(ckpt.latest(), stage_dir, dtype))
    setup = stage.setup()
    parts = setup.parts
    train_cfg = run.train.model_copy(update=dict(
        max_iter=stage.iterations, schedule=stage.schedule, student_models=["student"],
        critic_models=stage.critic_models, sample_every=sample_every if setup.sample_hook else 0))
    logger = MetricsLogger(run.logger.model_copy(update=dict(
        dir=str(out / "logs" / stage.name), wandb_name=f"{out.name}-{stage.name}",
        wandb_group=run.logger.wandb_group or out.name, wandb_job_type=stage.name)),
                           run_config=dict(run_config or {}))
    print0(f"stage {stage.name}: {stage.iterations} iterations, networks {sorted(parts.models)}"
           + (f", {stage.describe}" if stage.describe else "")
           + (f", resuming from iteration {done}" if done is not None else ""))
    state = train(parts, setup.objective, data(), train_cfg, checkpointer=ckpt, logger=logger,
                  sample_hook=setup.sample_hook, dp_rank=dp_rank, device=device)
    models = {**parts.models, "student_ema": parts.ema["student"]}
    if setup.sample_hook is not None:
        media = setup.sample_hook(state.iteration, models)
        if media:
            logger.log_media(state.iteration, media)
    paths = stage_exports(stage_dir)
    for name, path in paths.items():  # collective under FSDP: every rank calls
        export_module(models[name], path, dtype=dtype)
    return StageResult(state.iteration, ckpt.latest(), paths)


def load_stage_student(result: StageResult) -> dict[str, Tensor]:
    """The full ``student`` state dict of a finished stage's last checkpoint (CPU), to start the next stage."""
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
        warnings.simplefilter("ignore")
        return load_part(result.checkpoint, "student")


def publish(exports: Mapping[str, str | Path], output_dir: str | Path) -> dict[str, Path]:
    """A run's final weights: ``exports[name]`` copied to ``<output_dir>/<name>.safetensors`` on rank 0, then a
    barrier (every rank returns once the copies exist). Returns the copies' paths."""
    out = Path(output_dir)
    copies = {name: out / f"{name}.safetensors" for name in exports}
    if is_rank0():
        out.mkdir(parents=True, exist_ok=True)
        for name, src in exports.items():
            shutil.copyfile(src, copies[name])
        print0("exported " + ", ".join(str(p) for p in copies.values()))
    if dist.is_initialized():
        dist.barrier()
    return copies
