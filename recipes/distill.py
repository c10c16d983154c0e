"""rCM distillation of a Wan2.1 teacher: rCM (sCM + DMD), pure sCM, dCM, pure DMD, or a staged schedule.

    uv run recipes/distill.py --preset tiny-rcm --model.path=... --data.shards=...   # 1 CPU process
    torchrun --nproc-per-node 8 recipes/distill.py --preset 1.3B-rcm                           # N GPUs

A run is up to three *stages* (``stage1`` -> ``stage2`` -> ``stage3``; ``iterations=0`` skips one). Each
stage trains the student with its own objective (``RCMObjectiveConfig``: sCM or dCM weight ``loss_scale``,
DMD weight ``loss_scale_dmd``), student/critic schedule and optional fake score (critic), starting from the
previous stage's final student (the first from the teacher). Presets (``--preset``) give the methods for
the reference 1.3B / 14B experiments and a tiny CPU model (docs/recipes_distill_generate.md):

=========  ===============================================================================================
rcm        one stage: sCM (JVP) + DMD with a fake score, student every ``student_update_freq`` iterations
scm        one stage: sCM only (no fake score)
dcm        one stage: discrete-time CM only
dmd        one stage: DMD only (``loss_scale=0``, fixed backward-simulation times)
staged     dCM -> sCM -> rCM (DMD + sCM), 10% / 20% / 70% of the iterations
=========  ===============================================================================================

The config nests the packages' own configs: ``model`` (``rcm_pipelines`` DiT spec: architecture and the
teacher weights), ``data`` / ``optimizer`` / ``run`` (``rcm_train``: loop, checkpoints, logger), ``parallel``
(``rcm_train.parallel``: mesh, per-network FSDP2 / activation checkpointing / mixed precision), ``sample``
(``rcm_pipelines.hooks``). Every stage is one ``rcm_train.stages.run_stage`` call; one CPU process runs the
same code on a world of one. The teacher loads from an official ``.pth`` / ``.safetensors`` / DCP checkpoint
(``net.`` prefixes stripped). Outputs under ``output_dir``: ``config.yaml`` (+ ``attempts/<n>.yaml``), per stage
``checkpoints/<stage>/`` (DCP, resumed automatically), ``logs/<stage>/metrics.jsonl`` and
``logs/<stage>/media/samples_<iteration>.mp4`` (rows: student / EMA at 1, 2, 4 steps, columns: prompts),
``<stage>/student.safetensors`` + ``student_ema.safetensors``, and the last stage's copies at the top.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import model_validator
from torch import Tensor, nn

from rcm_kernels.devices import parse_dtype, resolve_device
from rcm_nets.wan import MeanFlowWanDiT, WanConfig, WanDiT, meanflow_student_state_dict
from rcm_pipelines.components import DiTSpec, dit_config, load_embedding, read_dit_state_dict
from rcm_pipelines.hooks import MeanFlowSampleHook, SampleConfig, SampleHook
from rcm_recipes.config import RecipeConfig, load_presets, parse_config, run_main
from rcm_recipes.rundir import open_run
from rcm_train.data import DataConfig, DeviceData, ShardLoader, first_samples, resolve_shards
from rcm_train.objectives import DistillStageConfig
from rcm_train.parallel import MeshConfig, ParallelConfig
from rcm_train.parallel.mesh import ParallelMesh
from rcm_train.runtime import is_rank0, print0, process_group
from rcm_train.safety import check_finite_state_dict
from rcm_train.stages import (
    Stage,
    StagedRunConfig,
    StageSetup,
    build_network,
    load_stage_student,
    publish,
    run_stage,
)
from rcm_train.trainer import OptimizerConfig, TrainParts, build_optimizer, build_scheduler


class ParallelismConfig(RecipeConfig):
    """Device mesh and how each network is parallelized (rcm_train.parallel)."""

    mesh: MeshConfig = MeshConfig()
    """FSDP shard-group size and Ulysses context-parallel size."""
    student: ParallelConfig = ParallelConfig(sac="block_wise")
    """Student (and its EMA copy)."""
    fake_score: ParallelConfig = ParallelConfig(sac="mm_only")
    """Fake score (critic)."""
    teacher: ParallelConfig = ParallelConfig(param_dtype=None)
    """Frozen teacher (no gradients: activation checkpointing does nothing)."""


class DistillConfig(RecipeConfig):
    """rCM distillation (sCM / dCM / DMD / staged) of a Wan2.1 DiT teacher on webdataset latent shards."""

    output_dir: str = "outputs/distill/1.3B-rcm"
    """Run directory (config, checkpoints, logs, samples, exported weights); rerunning resumes."""
    model: DiTSpec = DiTSpec(path="checkpoints/Wan2.1-T2V-1.3B.pth")
    """Architecture and the teacher weights (student and fake score start as copies of the teacher)."""
    teacher_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Storage (= compute) dtype of the frozen teacher. Trained networks are stored float32."""
    data: DataConfig = DataConfig(
        shards="datasets/Wan2.1_14B_480p_16:9_Euler-step100_shift-3.0_cfg-5.0_seed-0_250K/shard*.tar",
        num_workers=4, num_frames=20)
    """Training shards (recipes/build_dataset.py writes them)."""
    negative_embed_path: str | None = "checkpoints/umT5_wan_negative_emb.pt"
    """Negative-prompt embedding [L, D] for the teacher's CFG (None: CFG is a no-op, as in the reference)."""
    stage1: DistillStageConfig = DistillStageConfig(name="rcm", iterations=100_000)
    """First stage."""
    stage2: DistillStageConfig = DistillStageConfig(name="stage2")
    """Second stage (from stage1's final student); iterations=0 skips it."""
    stage3: DistillStageConfig = DistillStageConfig(name="stage3")
    """Third stage; iterations=0 skips it."""
    optimizer: OptimizerConfig = OptimizerConfig(lr=2e-6)
    """Student AdamW (betas (0, 0.999), wd 0.01, 100-step warmup)."""
    fake_score_optimizer: OptimizerConfig = OptimizerConfig(lr=4e-7)
    """Fake-score AdamW."""
    run: StagedRunConfig = StagedRunConfig()
    """Loop, checkpoint and logging settings shared by all stages."""
    parallel: ParallelismConfig = ParallelismConfig()
    """Mesh and per-network parallelism."""
    sample: SampleConfig = SampleConfig()
    """Periodic samples."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    allow_config_change: bool = False
    """Continue a run directory made with another config (its optimizer and data can never change)."""

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        active = self.stages()
        if not active:
            raise ValueError("no stage to run: set stage1.iterations (or stage2/stage3) > 0")
        names = [s.name for s in active]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must differ (they name checkpoint directories), got {names}")
        if self.model.low_noise_path is not None:
            raise ValueError("model.low_noise_path: two-expert teachers are not supported by distill.py")
        return self

    def stages(self) -> list[DistillStageConfig]:
        """The stages to run, in order."""
        return [s for s in (self.stage1, self.stage2, self.stage3) if s.iterations > 0]


# ------------------------------------------------------------------------------------------ presets
PRESETS: dict[str, DistillConfig] = load_presets(DistillConfig, "distill")
"""``configs/distill/<name>.yaml``: <experiment>-<method> for the 1.3B / 14B reference experiments and the tiny
CPU model (docs/recipes_distill_generate.md)."""


# ------------------------------------------------------------------------------------------ run
_FROZEN = ("optimizer", "fake_score_optimizer", "data")
"""Held by a run's checkpoints (optimizer states, data position, shard layout): never changed on resume."""
_FREE = ("allow_config_change", "output_dir", "device", "run.logger", "sample.every")
"""May differ between attempts freely."""

@dataclass
class _Shared:
    """What every stage of a run shares: mesh, device, architecture, teacher (weights and frozen network),
    negative embedding, sample prompts."""

    mesh: ParallelMesh
    device: torch.device
    net_cfg: WanConfig
    teacher_sd: dict[str, Tensor]
    teacher: nn.Module
    negative: Tensor | None
    samples: dict[str, Any] | None

    @classmethod
    def load(cls, cfg: DistillConfig, device: torch.device) -> _Shared:
        mesh, net_cfg = cfg.parallel.mesh.build(), dit_config(cfg.model)
        teacher_sd = read_dit_state_dict(net_cfg, cfg.model.path, field="model.path", log=print0)
        check_finite_state_dict(teacher_sd, cfg.model.path)  # a NaN in the teacher file stops here, named
        negative = None if cfg.negative_embed_path is None else load_embedding(
            cfg.negative_embed_path, "negative_embed_path", text_len=net_cfg.text_len).to(device)
        teacher = build_network(partial(WanDiT, net_cfg, dtype=parse_dtype(cfg.teacher_dtype)), teacher_sd,
                                mesh=mesh, parallel=cfg.parallel.teacher, device=device, trainable=False)
        samples = first_samples(cfg.data, cfg.sample.num_prompts) if cfg.sample.every else None
        return cls(mesh, device, net_cfg, teacher_sd, teacher, negative, samples)

    def network(self, sd: Mapping[str, Tensor], par: ParallelConfig, *, trainable: bool, precision: str,
                cls: type[nn.Module] = WanDiT) -> nn.Module:
        """A float32 ``cls`` network of the run's architecture, parallelized and loaded from ``sd``."""
        factory = partial(cls, self.net_cfg.model_copy(update={"precision": precision}), dtype=torch.float32)
        return build_network(factory, sd, mesh=self.mesh, parallel=par, device=self.device, trainable=trainable)


def _objective_and_hook(cfg: DistillConfig, sc: DistillStageConfig, r: _Shared) -> tuple[Any, SampleHook | None]:
    """The stage's objective (rCM or MeanFlow) and its periodic sample hook (None when sampling is off)."""
    objective, in_name, guidance = sc.objective_and_guidance(r.negative)
    if not cfg.sample.every:
        return objective, None
    hook_cls = MeanFlowSampleHook if sc.method == "meanflow" else SampleHook
    return objective, hook_cls(cfg.sample, r.samples, device=r.device, negative=r.negative, guidance=guidance,
                               input_dtype=parse_dtype(in_name) if in_name else torch.float64)


def _stage(cfg: DistillConfig, sc: DistillStageConfig, init: Mapping[str, Tensor], r: _Shared) -> Stage:
    """The driver's view of stage ``sc``: networks built (on demand) from ``init`` (the student's start)."""
    p, student_cls = cfg.parallel, WanDiT
    if sc.method == "meanflow":
        student_cls = MeanFlowWanDiT
        if not any(k.startswith("interval_embedding.") for k in init):
            init = meanflow_student_state_dict(init, generator=torch.Generator().manual_seed(cfg.run.train.seed))

    def setup() -> StageSetup:
        student = partial(r.network, init, p.student, precision="student", cls=student_cls)
        models = {"student": student(trainable=True), "teacher": r.teacher}
        optimizers = {"student": build_optimizer(models["student"], cfg.optimizer)}
        if sc.fake_score:
            models["fake_score"] = r.network(r.teacher_sd, p.fake_score, trainable=True, precision="teacher")
            optimizers["fake_score"] = build_optimizer(models["fake_score"], cfg.fake_score_optimizer)
        opt_cfg = {"student": cfg.optimizer, "fake_score": cfg.fake_score_optimizer}
        parts = TrainParts(models=models, optimizers=optimizers, ema={"student": student(trainable=False)},
                           schedulers={k: build_scheduler(o, opt_cfg[k]) for k, o in optimizers.items()})
        return StageSetup(parts, *_objective_and_hook(cfg, sc, r))

    return Stage(sc.name, sc.iterations, setup, schedule=sc.schedule, critic_models=sc.critic_models)


def run(cfg: DistillConfig) -> dict[str, Any]:
    """Run every stage; returns ``{"stages": {name: StageResult}, "student": path, "student_ema": path}``."""
    device = resolve_device(cfg.device)
    with process_group(device):
        out = Path(cfg.output_dir)
        check_run = partial(open_run, out, cfg, allow_changes=cfg.allow_config_change, frozen=_FROZEN, ignore=_FREE)
        check_run(write=False)  # a mismatched run directory is refused before the teacher loads
        cfg = cfg.model_copy(update={"data": resolve_shards(cfg.data)})
        r = _Shared.load(cfg, device)  # every input is checked before the run directory is touched
        check_run(write=is_rank0())
        print0(f"distill: world {dist.get_world_size()} on {device.type}, mesh (replicate, shard, cp) = "
               f"{r.mesh.shape}, stages {[(s.name, s.iterations) for s in cfg.stages()]}")
        data = lambda: DeviceData(ShardLoader(cfg.data, rank=r.mesh.dp_rank, world_size=r.mesh.dp_size), device)
        results, init = {}, r.teacher_sd
        for sc in cfg.stages():
            results[sc.name] = res = run_stage(_stage(cfg, sc, init, r), cfg.run, output_dir=out, data=data,
                                               sample_every=cfg.sample.every, dp_rank=r.mesh.dp_rank,
                                               device=device, run_config=cfg.model_dump(mode="json"))
            init = load_stage_student(res)
        return {"stages": results, **publish(res.exports, out)}


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(DistillConfig, argv, presets=PRESETS, prog="distill.py"))


if __name__ == "__main__":
    run_main(main)
