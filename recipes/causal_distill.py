"""Causal-rCM: distill a bidirectional Wan2.1 teacher into a block-causal streaming student (docs/causal_training.md).

    uv run recipes/causal_distill.py --preset tiny-causal-rcm --data.shards=... --model.path=...
    torchrun --nproc-per-node 8 recipes/causal_distill.py --preset 1.3B-causal-rcm      # N GPUs

A run is up to four *stages* (``stage1`` .. ``stage4``; ``iterations=0`` skips one), each one
``rcm_train.stages.run_stage`` call with its objective (``rcm_train.objectives.CausalObjectiveConfig``) and the
network it starts from (``init``: the bidirectional ``teacher``, the ``causal_teacher`` or the ``previous``
student). Presets (``--preset <size>-<schedule>``, sizes 1.3B / 14B / tiny):

==============  ==========================================================================================
causal-rcm      the staged Causal-rCM schedule: (1) causal teacher by teacher forcing (flow matching on
                ``[x0 ; x_t]``, from the bidirectional weights); (2) student by teacher-forcing dCM against it
                (CFG 3); (3) teacher-forcing sCM; (4) self-forcing DMD against the bidirectional teacher
                (CFG 5) with a fake score, 1 student : 5 critic iterations
causal-rcm-df   the same with a diffusion-forcing causal teacher (block-causal mask, per-block times)
ode-init        the alternative initialization: (1) regression onto the bidirectional teacher's ODE
                trajectories (block-causal student, per-block random trajectory step); (2) self-forcing DMD
==============  ==========================================================================================

``--blocks.i2v=true`` trains causal I2V (the first block is given as clean context: in the teacher-forcing
context, and committed to the cache before the rollout). ``--stageN.objective.replay=true`` replays the
self-forcing rollout one block at a time in backward (memory of one block). The number of iterations of the
1.3B / 14B presets are our choice (the public sources state Self-Forcing's 600 DMD iterations only).

Outputs under ``output_dir``: ``config.yaml``; per stage ``checkpoints/<stage>/`` (DCP, resumed),
``logs/<stage>/metrics.jsonl``, ``logs/<stage>/media/samples_<iteration>.mp4`` (the student and its EMA
streamed block by block with the KV cache) and ``<stage>/student[_ema].safetensors``; at the top
``causal_teacher.safetensors`` (if a flow stage ran) and ``student[_ema].safetensors`` of the last
student stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import model_validator
from torch import Tensor, nn

from rcm_kernels.blockmask import BlockLayout
from rcm_kernels.devices import parse_dtype, resolve_device
from rcm_losses.causal import FrameBlocks
from rcm_nets.wan import WanDiT
from rcm_nets.wan.causal import video_kv_cache
from rcm_pipelines.components import (
    DiTSpec,
    dit_config,
    load_embedding,
    read_dit_state_dict,
)
from rcm_pipelines.hooks import CausalSampleHook, SampleConfig
from rcm_recipes.config import RecipeConfig, load_presets, parse_config, run_main, write_config
from rcm_train.data import DataConfig, DeviceData, ShardLoader, first_samples, resolve_shards
from rcm_train.logging import LoggerConfig
from rcm_train.objectives import CausalObjectiveConfig, CausalRCMObjective
from rcm_train.parallel import MeshConfig, ParallelConfig
from rcm_train.runtime import is_rank0, print0, process_group
from rcm_train.safety import check_finite_state_dict
from rcm_train.stages import (
    Stage,
    StagedRunConfig,
    StageResult,
    StageSetup,
    build_network,
    load_stage_student,
    publish,
    run_stage,
)
from rcm_train.trainer import (
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    TrainParts,
    build_optimizer,
    build_scheduler,
)


class CausalModelConfig(RecipeConfig):
    """Architecture and weights (every trained network starts from one of these)."""

    teacher: DiTSpec = DiTSpec(path="checkpoints/Wan2.1-T2V-1.3B.pth")
    """The bidirectional teacher: architecture and weights (DMD real score, ODE trajectories, fake-score init,
    causal-teacher init)."""
    causal_teacher_path: str | None = None
    """A causal teacher trained before (then a run may skip the flow stage); None: this run's flow stage."""
    teacher_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Storage (= compute) dtype of the frozen teachers."""


class BlocksConfig(RecipeConfig):
    """Frame blocks of the causal model: ``[first_block_frames | frames_per_block | ...]`` latent frames."""

    frames_per_block: int = 3
    """Latent frames per block (c3-3: 3; c1-1: 1; c1-4: 4 with first_block_frames=1)."""
    first_block_frames: int | None = None
    """Frames of the first block (None: frames_per_block)."""
    i2v: bool = False
    """Causal I2V: the first block is given (the data's first block stands in for the image latent)."""


class StageConfig(RecipeConfig):
    """One training stage."""

    name: str = "stage"
    """Stage name (checkpoint / log sub-directory)."""
    iterations: int = 0
    """Raw iterations (student and critic together); 0 skips the stage."""
    init: Literal["teacher", "causal_teacher", "previous"] = "previous"
    """Where the trained network starts: the bidirectional teacher, the causal teacher, or the previous
    student stage's result."""
    objective: CausalObjectiveConfig = CausalObjectiveConfig(dmd=True)
    """What the stage trains (flow / cm / ode / dmd) and its hyper-parameters."""
    schedule: ScheduleConfig = ScheduleConfig(tangent_warmup=0, student_update_freq=6)
    """Student / critic alternation (DMD stages) and the sCM tangent warmup."""


class ParallelismConfig(RecipeConfig):
    """FSDP mesh and per-network parallelism (no context parallel: the cached block pass refuses it)."""

    mesh: MeshConfig = MeshConfig()
    """FSDP shard-group size (cp must stay 1)."""
    student: ParallelConfig = ParallelConfig(sac="block_wise", forward_methods=["forward_block"])
    """The trained network and its EMA (forward_block must gather FSDP parameters like forward)."""
    fake_score: ParallelConfig = ParallelConfig(sac="mm_only")
    """Fake score (bidirectional critic)."""
    teacher: ParallelConfig = ParallelConfig(param_dtype=None)
    """Frozen teachers."""


_SAMPLE = SampleConfig(every=250, num_prompts=2, teacher_steps=8, vae=None)


_DEFAULT = [  # the 1.3B staged Causal-rCM schedule (configs/causal_distill/1.3B-causal-rcm.yaml)
    StageConfig(name="teacher_tf", iterations=4000, init="teacher", objective=CausalObjectiveConfig(flow="tf"),
                schedule=ScheduleConfig()),
    StageConfig(name="tf_dcm", iterations=2000, init="causal_teacher", objective=CausalObjectiveConfig(cm="dcm"),
                schedule=ScheduleConfig()),
    StageConfig(name="tf_scm", iterations=2000, init="previous", objective=CausalObjectiveConfig(cm="scm"),
                schedule=ScheduleConfig(tangent_warmup=1000)),
    StageConfig(name="sf_dmd", iterations=600, init="previous", objective=CausalObjectiveConfig(dmd=True),
                schedule=ScheduleConfig(tangent_warmup=0, student_update_freq=6)),
]
_SHARDS = "datasets/Wan2.1_14B_480p_16:9_Euler-step100_shift-3.0_cfg-5.0_seed-0_250K/shard*.tar"
_NEGATIVE = "checkpoints/umT5_wan_negative_emb.pt"


class CausalDistillConfig(RecipeConfig):
    """Causal-rCM distillation (teacher forcing + self forcing, staged) of a Wan2.1 DiT on latent shards."""

    output_dir: str = "outputs/causal_distill/1.3B-causal-rcm"
    """Run directory; rerunning resumes."""
    model: CausalModelConfig = CausalModelConfig()
    """Architecture and weights."""
    blocks: BlocksConfig = BlocksConfig()
    """Frame blocks (data.num_frames must be a whole number of blocks)."""
    data: DataConfig = DataConfig(shards=_SHARDS, num_workers=4, num_frames=21)
    """Training shards (recipes/build_dataset.py writes them)."""
    negative_embed_path: str | None = _NEGATIVE
    """Negative-prompt embedding [L, D] for the teachers' CFG (None: CFG is a no-op)."""
    stage1: StageConfig = _DEFAULT[0]
    """First stage."""
    stage2: StageConfig = _DEFAULT[1]
    """Second stage."""
    stage3: StageConfig = _DEFAULT[2]
    """Third stage."""
    stage4: StageConfig = _DEFAULT[3]
    """Fourth stage."""
    optimizer: OptimizerConfig = OptimizerConfig(lr=2e-6)
    """AdamW of the trained network (Causal-rCM: 2e-6 students, 1e-5 causal teacher; set per run)."""
    fake_score_optimizer: OptimizerConfig = OptimizerConfig(lr=4e-7)
    """Fake-score AdamW."""
    run: StagedRunConfig = StagedRunConfig(train=TrainConfig(checkpoint_every=250), logger=LoggerConfig(every=25))
    """Loop, checkpoint and logging settings shared by the stages."""
    parallel: ParallelismConfig = ParallelismConfig()
    """Mesh and per-network parallelism."""
    sample: SampleConfig = _SAMPLE
    """Streaming samples of the trained network and its EMA."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda:LOCAL_RANK when CUDA is available, else cpu."""

    @model_validator(mode="after")
    def _check(self) -> CausalDistillConfig:
        active = self.stages()
        if not active:
            raise ValueError("no stage to run: set stage1.iterations (or stage2..4) > 0")
        names = [s.name for s in active]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must differ (they name checkpoint directories), got {names}")
        for s in active:
            if s.objective.trains_teacher and s.init == "causal_teacher":
                raise ValueError(f"stage {s.name!r}: a flow stage trains the causal teacher; init it from "
                                 "'teacher' (or 'previous')")
        if self.parallel.mesh.cp != 1:
            raise ValueError("parallel.mesh.cp must be 1: the cached self-forcing pass has no context parallel")
        if self.data.num_frames is None:
            raise ValueError("causal training needs data.num_frames (a whole number of blocks)")
        return self

    def stages(self) -> list[StageConfig]:
        """The stages to run, in order."""
        return [s for s in (self.stage1, self.stage2, self.stage3, self.stage4) if s.iterations > 0]

    def frame_blocks(self) -> FrameBlocks:
        """The run's block layout over ``data.num_frames`` latent frames."""
        return FrameBlocks(self.data.num_frames, self.blocks.frames_per_block, self.blocks.first_block_frames)


PRESETS: dict[str, CausalDistillConfig] = load_presets(CausalDistillConfig, "causal_distill")
"""``configs/causal_distill/<size>-<schedule>.yaml`` (module docstring)."""


# ------------------------------------------------------------------------------------------ run
class _Run:
    """The run's shared pieces: mesh, architecture, teacher weights, frozen networks (built once per state dict)."""

    def __init__(self, cfg: CausalDistillConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.mesh = cfg.parallel.mesh.build()
        self.net_cfg = dit_config(cfg.model.teacher)
        self.blocks = cfg.frame_blocks()
        self.layout = BlockLayout(self.blocks.frames_per_block, self.blocks.first)
        read = lambda path, field: self._read(path, field)
        self.teacher_sd = read(cfg.model.teacher.path, "model.teacher.path")
        self.causal_teacher_sd = read(cfg.model.causal_teacher_path, "model.causal_teacher_path") \
            if cfg.model.causal_teacher_path else None
        self.negative = None if cfg.negative_embed_path is None else load_embedding(
            cfg.negative_embed_path, "negative_embed_path", text_len=self.net_cfg.text_len).to(device)
        self.samples = first_samples(cfg.data, cfg.sample.num_prompts) if cfg.sample.every else None
        self._frozen: dict[str, tuple[int, nn.Module]] = {}

    def _read(self, path: str, field: str) -> dict[str, Tensor]:
        sd = read_dit_state_dict(self.net_cfg, path, field=field, log=print0)
        check_finite_state_dict(sd, path)  # a NaN in a teacher file stops here, named
        return sd

    def network(self, sd: Mapping[str, Tensor], par: ParallelConfig, *, trainable: bool, precision: str,
                dtype: torch.dtype = torch.float32) -> nn.Module:
        factory = partial(WanDiT, self.net_cfg.model_copy(update={"precision": precision}), dtype=dtype)
        return build_network(factory, sd, mesh=self.mesh, parallel=par, device=self.device, trainable=trainable)

    def frozen(self, name: str, sd: Mapping[str, Tensor]) -> nn.Module:
        """A frozen teacher, rebuilt only when its weights change (a flow stage makes a new causal teacher)."""
        if name not in self._frozen or self._frozen[name][0] != id(sd):
            self._frozen[name] = (id(sd), self.network(sd, self.cfg.parallel.teacher, trainable=False,
                                                       precision="teacher",
                                                       dtype=parse_dtype(self.cfg.model.teacher_dtype)))
        return self._frozen[name][1]


def _hook(r: _Run, obj: CausalObjectiveConfig) -> CausalSampleHook | None:
    cfg = r.cfg
    if not cfg.sample.every:
        return None
    n = cfg.sample.teacher_steps
    times = [1.0 - k / n for k in range(n)] if obj.trains_teacher else obj.sf_schedule
    return CausalSampleHook(cfg.sample, r.samples, r.layout, device=r.device, times=times,
                            context_noise=obj.context_noise, i2v=cfg.blocks.i2v, kv_dtype=obj.kv_dtype)


def _stage(r: _Run, sc: StageConfig, init: Mapping[str, Tensor]) -> Stage:
    cfg, obj, p = r.cfg, sc.objective, r.cfg.parallel

    def setup() -> StageSetup:
        models = {"student": r.network(init, p.student, trainable=True, precision="student")}
        optimizers = {"student": build_optimizer(models["student"], cfg.optimizer)}
        if obj.cm != "none":
            if r.causal_teacher_sd is None:
                raise ValueError(f"stage {sc.name}: objective.cm needs a causal teacher (a flow stage before it, "
                                 "or model.causal_teacher_path)")
            models["causal_teacher"] = r.frozen("causal_teacher", r.causal_teacher_sd)
        if obj.ode or obj.dmd:
            models["teacher"] = r.frozen("teacher", r.teacher_sd)
        if obj.dmd:
            models["fake_score"] = r.network(r.teacher_sd, p.fake_score, trainable=True, precision="teacher")
            optimizers["fake_score"] = build_optimizer(models["fake_score"], cfg.fake_score_optimizer)
        opt_cfg = {"student": cfg.optimizer, "fake_score": cfg.fake_score_optimizer}
        parts = TrainParts(models=models, optimizers=optimizers,
                           schedulers={k: build_scheduler(o, opt_cfg[k]) for k, o in optimizers.items()},
                           ema={"student": r.network(init, p.student, trainable=False, precision="student")})
        objective = CausalRCMObjective(
            obj, r.blocks, given_blocks=int(cfg.blocks.i2v), negative_embed=r.negative,
            make_cache=partial(video_kv_cache, layout=r.layout, kv_dtype=obj.kv_dtype),
            seed=cfg.run.train.seed, grad_accum=cfg.run.train.grad_accum)
        return StageSetup(parts, objective, _hook(r, obj))

    return Stage(sc.name, sc.iterations, setup, schedule=sc.schedule,
                 critic_models=["fake_score"] if obj.dmd else [], describe=f"blocks {r.blocks.sizes}")


def _initial(r: _Run, sc: StageConfig, student_sd: Mapping[str, Tensor] | None) -> Mapping[str, Tensor]:
    init = {"teacher": r.teacher_sd, "causal_teacher": r.causal_teacher_sd, "previous": student_sd}[sc.init]
    if init is None:
        raise ValueError(f"stage {sc.name}: init={sc.init!r} but no such network exists yet (a student stage must "
                         "come before 'previous', a flow stage or model.causal_teacher_path before 'causal_teacher')")
    return init


def _finals(cfg: CausalDistillConfig, results: Mapping[str, StageResult]) -> dict[str, Path]:
    """The last causal teacher (if a flow stage ran) and the last student (+ EMA): what the run publishes."""
    final: dict[str, Path] = {}
    for sc in reversed(cfg.stages()):
        exports = results[sc.name].exports
        if sc.objective.trains_teacher:
            final.setdefault("causal_teacher", exports["student"])
        elif "student" not in final:
            final.update(student=exports["student"], student_ema=exports["student_ema"])
    return final


def run(cfg: CausalDistillConfig) -> dict[str, Any]:
    """Run every stage; returns ``{"stages": {name: StageResult}, "student", "student_ema", ...}``."""
    device = resolve_device(cfg.device)
    with process_group(device):
        out = Path(cfg.output_dir)
        if is_rank0():
            write_config(cfg, out / "config.yaml")
        cfg = cfg.model_copy(update={"data": resolve_shards(cfg.data)})
        r = _Run(cfg, device)
        print0(f"causal_distill: world {dist.get_world_size()} on {device.type}, blocks {r.blocks.sizes}, stages "
               f"{[(s.name, s.iterations) for s in cfg.stages()]}")
        data = lambda: DeviceData(ShardLoader(cfg.data, rank=r.mesh.dp_rank, world_size=r.mesh.dp_size), device)
        results, student_sd = {}, None
        for sc in cfg.stages():
            results[sc.name] = res = run_stage(_stage(r, sc, _initial(r, sc, student_sd)), cfg.run, output_dir=out,
                                               data=data, sample_every=cfg.sample.every, dp_rank=r.mesh.dp_rank,
                                               device=device, run_config=cfg.model_dump(mode="json"))
            sd = load_stage_student(res)
            if sc.objective.trains_teacher:
                r.causal_teacher_sd = sd
            else:
                student_sd = sd
        return {"stages": results, **publish(_finals(cfg, results), out)}


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(CausalDistillConfig, argv, presets=PRESETS, prog="causal_distill.py"))


if __name__ == "__main__":
    run_main(main)
