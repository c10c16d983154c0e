"""Causal-rCM: distill a bidirectional Wan2.1 teacher into a block-causal streaming student (CAUSAL_SPEC §4).

    uv run recipes/causal_distill.py --preset tiny-causal-rcm --data.shards=... --model.teacher_path=...
    torchrun --nproc-per-node 8 recipes/causal_distill.py --preset 1.3B-causal-rcm      # N GPUs

A run is up to four *stages* (``stage1`` .. ``stage4``; ``iterations=0`` skips one), each one
``rcm_train.train`` call with its objective (``rcm_recipes.causal_training.CausalObjectiveConfig``) and the
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

from typing import Any, Literal

from pydantic import model_validator

from rcm_pipelines.components import VAESpec
from rcm_recipes.causal_run import run
from rcm_recipes.causal_training import CausalObjectiveConfig
from rcm_recipes.config import RecipeConfig, parse_config
from rcm_train.data import DataConfig
from rcm_train.parallel import ParallelConfig
from rcm_train.trainer import OptimizerConfig, ScheduleConfig


class ModelConfig(RecipeConfig):
    """Architecture and weights (every trained network starts from one of these)."""

    config: str = "t2v-1.3B"
    """Named WanDiT config (t2v-1.3B, t2v-14B, tiny, ...) or an official config.json path."""
    overrides: dict[str, Any] = {}
    """WanConfig fields replacing those of `config`; JSON on the command line."""
    teacher_path: str = "checkpoints/Wan2.1-T2V-1.3B.pth"
    """The bidirectional teacher (DMD real score, ODE trajectories, fake-score init, causal-teacher init)."""
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


class LoopConfig(RecipeConfig):
    """Training-loop settings shared by the stages."""

    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    clip_norm: float | None = None
    """Clip the gradient norm (None: compute and log it only)."""
    seed: int = 0
    """Seed of every random draw (step noise, times, exit steps)."""
    ema_rate: float | None = 0.1
    """Power-EMA rate of the trained network's EMA (None: none)."""
    checkpoint_every: int = 250
    """Save a DCP checkpoint every this many iterations (and at the end of each stage)."""
    keep_last: int | None = 3
    """Complete checkpoints kept per stage (None: all)."""
    async_save: bool = False
    """Save checkpoints in the background."""
    log_every: int = 25
    """Average and report metrics every this many iterations."""
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"
    """Weights & Biases logging (needs the wandb extra)."""
    wandb_project: str = "rcm"
    """wandb project."""


class ParallelismConfig(RecipeConfig):
    """FSDP mesh and per-network parallelism (no context parallel: the cached block pass refuses it)."""

    fsdp_shard_size: int = -1
    """Ranks per FSDP shard group (HSDP across groups); -1: the whole world."""
    student: ParallelConfig = ParallelConfig(sac="block_wise", forward_methods=["forward_block"])
    """The trained network and its EMA (forward_block must gather FSDP parameters like forward)."""
    fake_score: ParallelConfig = ParallelConfig(sac="mm_only")
    """Fake score (bidirectional critic)."""
    teacher: ParallelConfig = ParallelConfig(param_dtype=None)
    """Frozen teachers."""


class SampleConfig(RecipeConfig):
    """Streaming samples of the trained network and its EMA, written as mp4."""

    every: int = 250
    """Sample every this many iterations (and before the first and after the last); 0 disables."""
    num_prompts: int = 2
    """Prompts (the first samples of the data) per video."""
    ema: bool = True
    """Also stream the EMA."""
    teacher_steps: int = 8
    """Steps per block when sampling a causal teacher (flow stages; uniform RF times)."""
    seed: int = 1
    """Noise seed (fixed: videos comparable over training)."""
    vae: VAESpec | None = None
    """VAE decoding the samples; None shows latent channels 0-2."""
    fps: int = 16
    """Frame rate of the sample videos."""


# ------------------------------------------------------------------------------------------ presets
_WAN = dict(frames=21, fpb=3, iters=(4000, 2000, 2000, 600), save=250, dtype="bfloat16")
_SIZES = {
    "1.3B": dict(_WAN, config="t2v-1.3B", teacher="checkpoints/Wan2.1-T2V-1.3B.pth"),
    "14B": dict(_WAN, config="t2v-14B", teacher="checkpoints/Wan2.1-T2V-14B.pth"),
    # CPU-sized: the tiny network, 5 latent frames as c1-2 blocks, a few iterations per stage
    "tiny": dict(
        config="tiny",
        teacher="outputs/tiny_assets/dit_t2v.pth",
        frames=5,
        fpb=2,
        first=1,
        iters=(2, 1, 1, 3),
        save=100,
        dtype="float32",
    ),
}


def _objective(size: dict, **kw) -> CausalObjectiveConfig:
    if size["dtype"] == "float32":
        kw.update(input_dtype="float32", kv_dtype="fp32")
    if size["config"] == "tiny":
        kw.update(dcm_total_steps=8, ode_steps=4, sf_schedule=[1.0, 5 / 6])
    return CausalObjectiveConfig(**kw)


def _stages(size_name: str, schedule: str) -> list[StageConfig]:
    """The four stage slots of ``<size>-<schedule>`` (unused slots have 0 iterations)."""
    size = _SIZES[size_name]
    tiny = size_name == "tiny"
    n_teacher, n_dcm, n_scm, n_dmd = size["iters"]
    dmd = StageConfig(
        name="sf_dmd",
        iterations=n_dmd,
        init="previous",
        objective=_objective(size, dmd=True),
        schedule=ScheduleConfig(tangent_warmup=0, student_update_freq=2 if tiny else 6),
    )
    if schedule == "ode-init":
        stages = [
            StageConfig(
                name="ode",
                iterations=n_dcm,
                init="teacher",
                objective=_objective(size, ode=True),
                schedule=ScheduleConfig(),
            ),
            dmd,
        ]
    else:
        flow = "df" if schedule == "causal-rcm-df" else "tf"
        stages = [
            StageConfig(
                name=f"teacher_{flow}",
                iterations=n_teacher,
                init="teacher",
                objective=_objective(size, flow=flow),
                schedule=ScheduleConfig(),
            ),
            StageConfig(
                name="tf_dcm",
                iterations=n_dcm,
                init="causal_teacher",
                objective=_objective(size, cm="dcm"),
                schedule=ScheduleConfig(),
            ),
            StageConfig(
                name="tf_scm",
                iterations=n_scm,
                init="previous",
                objective=_objective(size, cm="scm"),
                schedule=ScheduleConfig(tangent_warmup=2 if tiny else 1000),
            ),
            dmd,
        ]
    return stages + [StageConfig(name=f"stage{i + 1}") for i in range(len(stages), 4)]


_DEFAULT = _stages("1.3B", "causal-rcm")
_SHARDS = "datasets/Wan2.1_14B_480p_16:9_Euler-step100_shift-3.0_cfg-5.0_seed-0_250K/shard*.tar"
_NEGATIVE = "checkpoints/umT5_wan_negative_emb.pt"


class CausalDistillConfig(RecipeConfig):
    """Causal-rCM distillation (teacher forcing + self forcing, staged) of a Wan2.1 DiT on latent shards."""

    output_dir: str = "outputs/causal_distill/1.3B-causal-rcm"
    """Run directory; rerunning resumes."""
    model: ModelConfig = ModelConfig()
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
    train: LoopConfig = LoopConfig()
    """Loop settings."""
    parallel: ParallelismConfig = ParallelismConfig()
    """Mesh and per-network parallelism."""
    sample: SampleConfig = SampleConfig()
    """Streaming samples."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Dtype of the exported weights."""

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
                raise ValueError(
                    f"stage {s.name!r}: a flow stage trains the causal teacher; init it from "
                    "'teacher' (or 'previous')"
                )
        return self

    def stages(self) -> list[StageConfig]:
        """The stages to run, in order."""
        return [s for s in (self.stage1, self.stage2, self.stage3, self.stage4) if s.iterations > 0]


def make_preset(
    size_name: str, schedule: Literal["causal-rcm", "causal-rcm-df", "ode-init"]
) -> CausalDistillConfig:
    """The preset ``<size>-<schedule>`` (module docstring)."""
    size = _SIZES[size_name]
    tiny = size_name == "tiny"
    stages = _stages(size_name, schedule)
    pdtype = size["dtype"]
    return CausalDistillConfig(
        output_dir=f"outputs/causal_distill/{size_name}-{schedule}",
        model=ModelConfig(config=size["config"], teacher_path=size["teacher"], teacher_dtype=pdtype),
        blocks=BlocksConfig(frames_per_block=size["fpb"], first_block_frames=size.get("first")),
        data=DataConfig(
            shards="outputs/tiny_dataset/shard_*.tar" if tiny else _SHARDS,
            num_workers=0 if tiny else 4,
            shuffle_buffer=16 if tiny else 1000,
            num_frames=size["frames"],
        ),
        negative_embed_path="outputs/tiny_dataset/negative_embed.pt" if tiny else _NEGATIVE,
        stage1=stages[0],
        stage2=stages[1],
        stage3=stages[2],
        stage4=stages[3],
        optimizer=OptimizerConfig(lr=1e-4 if tiny else 2e-6, warmup_steps=2 if tiny else 100),
        fake_score_optimizer=OptimizerConfig(lr=1e-4 if tiny else 4e-7, warmup_steps=2 if tiny else 100),
        train=LoopConfig(checkpoint_every=size["save"], log_every=1 if tiny else 25),
        parallel=ParallelismConfig(
            student=ParallelConfig(
                sac="none" if tiny else "block_wise", param_dtype=pdtype, forward_methods=["forward_block"]
            ),
            fake_score=ParallelConfig(sac="none" if tiny else "mm_only", param_dtype=pdtype),
            teacher=ParallelConfig(param_dtype=None),
        ),
        sample=SampleConfig(every=100 if tiny else 250, teacher_steps=2 if tiny else 8),
        device="cpu" if tiny else "auto",
    )


PRESETS: dict[str, CausalDistillConfig] = {
    f"{s}-{k}": make_preset(s, k) for s in _SIZES for k in ("causal-rcm", "causal-rcm-df", "ode-init")
}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(CausalDistillConfig, argv, presets=PRESETS, prog="causal_distill.py")
    return run(cfg)


if __name__ == "__main__":
    main()
