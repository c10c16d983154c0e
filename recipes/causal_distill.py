"""Causal-rCM: distill Wan2.1 teachers into a block-causal streaming student (docs/causal_training.md).

    uv run recipes/causal_distill.py --preset tiny-causal-rcm --data.shards=... --model.teacher.path=...
    torchrun --nproc-per-node 8 recipes/causal_distill.py --preset causal-14B-to-1.3B      # N GPUs

Up to four stages (``stage1`` .. ``stage4``; ``iterations=0`` skips one) run by ``rcm_train.objectives.causal.
run_causal_stages`` over four networks with their own architecture and weights (``model.<role>``: student,
causal_teacher, teacher, fake_score). Presets (``configs/causal_distill/``): ``<size>-causal-rcm``,
``<size>-causal-rcm-df``, ``<size>-ode-init``, ``causal-14B-to-1.3B`` (14B teachers and fake score, 1.3B
student) and its CPU twin ``causal-tiny-sizes``. ``--parallel.mesh.cp=N``: Ulysses context parallel.
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import model_validator

from rcm_kernels.blockmask import BlockLayout
from rcm_kernels.devices import parse_dtype, resolve_device
from rcm_nets.wan import WanDiT
from rcm_nets.wan.causal import video_kv_cache
from rcm_pipelines.components import DiTSpec, dit_config, load_embedding, read_dit_state_dict, require_file
from rcm_pipelines.hooks import CausalSampleHook, SampleConfig
from rcm_recipes.config import RecipeConfig, load_presets, parse_config, run_main
from rcm_recipes.rundir import open_run
from rcm_train.data import DataConfig, DeviceData, ShardLoader, first_samples, resolve_shards
from rcm_train.logging import LoggerConfig
from rcm_train.objectives import causal
from rcm_train.objectives.causal import CausalBlocksConfig, CausalObjectiveConfig, CausalStageConfig
from rcm_train.parallel import MeshConfig, ParallelConfig
from rcm_train.runtime import is_rank0, print0, process_group
from rcm_train.safety import check_finite_state_dict
from rcm_train.stages import StagedRunConfig, build_network
from rcm_train.trainer import OptimizerConfig, ScheduleConfig, TrainConfig


class CausalModelConfig(RecipeConfig):
    """The four networks: architecture and first weights each (None: the teacher's)."""

    teacher: DiTSpec = DiTSpec(path="checkpoints/Wan2.1-T2V-1.3B.pth")
    """The bidirectional teacher (DMD real score, ODE trajectories)."""
    causal_teacher: DiTSpec | None = None
    """The causal teacher; its weights are read only if a stage needs them before a flow stage trained it
    (None: the teacher's architecture, weights only from a flow stage)."""
    student: DiTSpec | None = None
    """The student; its weights are read only by a stage with init='student'."""
    fake_score: DiTSpec | None = None
    """The fake score (DMD critic), initialized from these weights."""
    teacher_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Storage (= compute) dtype of the frozen teachers."""

    def spec(self, role: str) -> DiTSpec:
        return getattr(self, role) or self.teacher

    def field(self, role: str) -> str:
        return f"model.{role if getattr(self, role) else 'teacher'}.path"


class ParallelismConfig(RecipeConfig):
    """Mesh and per-network parallelism."""

    mesh: MeshConfig = MeshConfig()
    """FSDP shard-group size and Ulysses CP size (cp must divide every network's head count)."""
    student: ParallelConfig = ParallelConfig(sac="block_wise", forward_methods=["forward_block"])
    """The trained student / causal teacher and its EMA (forward_block must gather FSDP parameters)."""
    fake_score: ParallelConfig = ParallelConfig(sac="mm_only")
    """Fake score (bidirectional critic)."""
    teacher: ParallelConfig = ParallelConfig(param_dtype=None)
    """Frozen teachers."""


_S = CausalStageConfig
_DEFAULT = [  # the 1.3B staged Causal-rCM schedule (configs/causal_distill/1.3B-causal-rcm.yaml)
    _S(name="teacher_tf", iterations=4000, init="teacher", objective=CausalObjectiveConfig(flow="tf"),
       schedule=ScheduleConfig()),
    _S(name="tf_dcm", iterations=2000, init="causal_teacher", objective=CausalObjectiveConfig(cm="dcm"),
       schedule=ScheduleConfig()),
    _S(name="tf_scm", iterations=2000, objective=CausalObjectiveConfig(cm="scm"),
       schedule=ScheduleConfig(tangent_warmup=1000)),
    _S(name="sf_dmd", iterations=600, objective=CausalObjectiveConfig(dmd=True)),  # 1 student : 5 critic
]
_SHARDS = "datasets/Wan2.1_14B_480p_16:9_Euler-step100_shift-3.0_cfg-5.0_seed-0_250K/shard*.tar"


class CausalDistillConfig(RecipeConfig):
    """Causal-rCM distillation (teacher forcing + self forcing, staged) of Wan2.1 DiTs on latent shards."""

    output_dir: str = "outputs/causal_distill/1.3B-causal-rcm"
    """Run directory; rerunning resumes."""
    model: CausalModelConfig = CausalModelConfig()
    """Architecture and weights of each network."""
    blocks: CausalBlocksConfig = CausalBlocksConfig()
    """Frame blocks (data.num_frames must be a whole number of blocks)."""
    data: DataConfig = DataConfig(shards=_SHARDS, num_workers=4, num_frames=21)
    """Training shards (recipes/build_dataset.py writes them)."""
    negative_embed_path: str | None = "checkpoints/umT5_wan_negative_emb.pt"
    """Negative-prompt embedding [L, D] for the teachers' CFG (None: CFG is a no-op)."""
    stage1: CausalStageConfig = _DEFAULT[0]
    """First stage."""
    stage2: CausalStageConfig = _DEFAULT[1]
    """Second stage."""
    stage3: CausalStageConfig = _DEFAULT[2]
    """Third stage."""
    stage4: CausalStageConfig = _DEFAULT[3]
    """Fourth stage."""
    optimizer: OptimizerConfig = OptimizerConfig(lr=2e-6)
    """AdamW of the student (Causal-rCM: 2e-6, betas (0, 0.999))."""
    causal_teacher_optimizer: OptimizerConfig = OptimizerConfig(lr=1e-5, betas=(0.9, 0.999))
    """AdamW of the causal teacher in flow stages (Causal-rCM: 1e-5, betas (0.9, 0.999))."""
    fake_score_optimizer: OptimizerConfig = OptimizerConfig(lr=4e-7)
    """Fake-score AdamW."""
    run: StagedRunConfig = StagedRunConfig(train=TrainConfig(checkpoint_every=250), logger=LoggerConfig(every=25))
    """Loop, checkpoint and logging settings shared by the stages."""
    parallel: ParallelismConfig = ParallelismConfig()
    """Mesh and per-network parallelism."""
    sample: SampleConfig = SampleConfig(every=250, num_prompts=2, teacher_steps=8, vae=None)
    """Streaming samples of the trained network and its EMA."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    allow_config_change: bool = False
    """Continue a run directory made with another config (its optimizers and data can never change)."""

    @model_validator(mode="after")
    def _check(self) -> CausalDistillConfig:
        arch = {role: dit_config(self.model.spec(role)) for role in causal.ROLES}
        causal.check_causal_stages(self.stages(), arch, cp=self.parallel.mesh.cp)
        if self.model.causal_teacher is None and "causal_teacher" in causal.first_weights_needed(self.stages()):
            raise ValueError("a stage needs the causal teacher before any flow stage trains it: run a flow stage "
                             "first or set model.causal_teacher (its architecture and weights)")
        if self.data.num_frames is None:
            raise ValueError("causal training needs data.num_frames (a whole number of blocks)")
        return self

    def stages(self) -> list[CausalStageConfig]:
        """The stages to run, in order."""
        return [s for s in (self.stage1, self.stage2, self.stage3, self.stage4) if s.iterations > 0]


PRESETS: dict[str, CausalDistillConfig] = load_presets(CausalDistillConfig, "causal_distill")
"""``configs/causal_distill/*.yaml`` (module docstring)."""


def _networks(cfg: CausalDistillConfig, mesh, device: torch.device, layout: BlockLayout) -> causal.CausalNetworks:
    """WanDiT per role (its spec's architecture), weights read once on first use, KV cache, sample hook."""
    p, read = cfg.parallel, {}
    by_kind = {"frozen": (p.teacher, "teacher", parse_dtype(cfg.model.teacher_dtype)),
               "ema": (p.student, "student", torch.float32), "trained": (p.student, "student", torch.float32)}

    def build(role, sd, kind):
        critic = (role, kind) == ("fake_score", "trained")
        par, precision, dtype = (p.fake_score, "teacher", torch.float32) if critic else by_kind[kind]
        arch = dit_config(cfg.model.spec(role)).model_copy(update={"precision": precision})
        return build_network(partial(WanDiT, arch, dtype=dtype), sd, mesh=mesh, parallel=par, device=device,
                             trainable=kind == "trained")

    def weights(role):  # one read per distinct spec (teacher and fake score usually share theirs)
        spec, field = cfg.model.spec(role), cfg.model.field(role)
        key = spec.model_dump_json()
        if key not in read:
            read[key] = read_dit_state_dict(dit_config(spec), spec.path, field=field, log=print0)
            check_finite_state_dict(read[key], spec.path)  # a NaN in a weights file stops here, named
        return read[key]

    samples = first_samples(cfg.data, cfg.sample.num_prompts) if cfg.sample.every else None

    def hook(obj: CausalObjectiveConfig):
        n = cfg.sample.teacher_steps
        times = [1.0 - k / n for k in range(n)] if obj.trains_teacher else obj.sf_schedule
        return CausalSampleHook(cfg.sample, samples, layout, device=device, times=times, i2v=cfg.blocks.i2v,
                                context_noise=obj.context_noise, kv_dtype=obj.kv_dtype) if samples is not None else None

    return causal.CausalNetworks(build, weights, partial(video_kv_cache, layout=layout), hook)


_FREE = ("allow_config_change", "output_dir", "device", "run.logger", "sample.every")
"""May differ between attempts of one run directory (docs/reliability.md)."""


def run(cfg: CausalDistillConfig) -> dict:
    """Run every stage; returns ``{"stages": {name: StageResult}, "student", "student_ema", ...}``."""
    device = resolve_device(cfg.device)
    with process_group(device):
        for role in causal.first_weights_needed(cfg.stages()):  # before anything is written: missing files, named
            require_file(cfg.model.spec(role).path, cfg.model.field(role), "DiT weights")
        check_run = partial(open_run, cfg.output_dir, cfg, allow_changes=cfg.allow_config_change, ignore=_FREE,
                            frozen=("optimizer", "causal_teacher_optimizer", "fake_score_optimizer", "data"))
        check_run(write=False)  # a mismatched run directory is refused before anything loads
        cfg = cfg.model_copy(update={"data": resolve_shards(cfg.data)})
        mesh = cfg.parallel.mesh.build()
        blocks = cfg.blocks.frame_blocks(cfg.data.num_frames)
        negative = None if cfg.negative_embed_path is None else load_embedding(
            cfg.negative_embed_path, "negative_embed_path", text_len=dit_config(cfg.model.teacher).text_len).to(device)
        check_run(write=is_rank0())
        stages = [(s.name, s.iterations) for s in cfg.stages()]
        print0(f"causal_distill: world {dist.get_world_size()} on {device.type}, blocks {blocks.sizes}, mesh "
               f"(replicate, shard, cp) {tuple(mesh.world.shape)}, stages {stages}")
        return causal.run_causal_stages(
            cfg.stages(), _networks(cfg, mesh, device, BlockLayout(blocks.frames_per_block, blocks.first)),
            blocks=blocks, given_blocks=int(cfg.blocks.i2v), negative_embed=negative,
            optimizers={"student": cfg.optimizer, "causal_teacher": cfg.causal_teacher_optimizer,
                        "fake_score": cfg.fake_score_optimizer},
            run=cfg.run, output_dir=cfg.output_dir, sample_every=cfg.sample.every, dp_rank=mesh.dp_rank,
            data=lambda: DeviceData(ShardLoader(cfg.data, rank=mesh.dp_rank, world_size=mesh.dp_size), device),
            device=device, run_config=cfg.model_dump(mode="json"))


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(CausalDistillConfig, argv, presets=PRESETS, prog="causal_distill.py"))


if __name__ == "__main__":
    run_main(main)
