"""rCM distillation of a Wan2.1 teacher: rCM (sCM + DMD), pure sCM, dCM, pure DMD, or a staged schedule.

    uv run recipes/distill.py --preset tiny-rcm --model.teacher_path=... --data.shards=...   # 1 CPU process
    torchrun --nproc-per-node 8 recipes/distill.py --preset 1.3B-rcm                           # N GPUs

A run is up to three *stages* (``stage1`` -> ``stage2`` -> ``stage3``; ``iterations=0`` skips one). Each
stage trains the student with its own objective (``RCMObjectiveConfig``: sCM or dCM weight ``loss_scale``,
DMD weight ``loss_scale_dmd``), student/critic schedule and optional fake score (critic), starting from the
previous stage's final student (the first from the teacher). Presets (``--preset``) give the methods for
the reference 1.3B / 14B experiments and a tiny CPU model (RCM_SPEC §6.5):

=========  ===============================================================================================
rcm        one stage: sCM (JVP) + DMD with a fake score, student every ``student_update_freq`` iterations
scm        one stage: sCM only (no fake score)
dcm        one stage: discrete-time CM only
dmd        one stage: DMD only (``loss_scale=0``, fixed backward-simulation times)
staged     dCM -> sCM -> rCM (DMD + sCM), 10% / 20% / 70% of the iterations
=========  ===============================================================================================

Parallelism comes from the config (``parallel``: FSDP2 shard size, Ulysses context parallel size, per
network activation checkpointing / mixed precision) through ``rcm_train.parallel``; one CPU process runs
the same code on a world of one. The teacher loads from an official ``.pth`` / ``.safetensors`` / DCP
checkpoint (``net.`` prefixes stripped). Outputs under ``output_dir``: ``config.yaml``, per stage
``checkpoints/<stage>/`` (DCP, resumed automatically), ``logs/<stage>/metrics.jsonl`` and
``logs/<stage>/media/samples_<iteration>.mp4`` (rows: student / EMA at 1, 2, 4 steps, columns: prompts),
``<stage>/student.safetensors`` + ``student_ema.safetensors``, and the last stage's copies at the top.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from rcm_pipelines.components import MissingFileError, VAESpec
from rcm_recipes.config import RecipeConfig, parse_config
from rcm_recipes.distill_run import run
from rcm_train.data import DataConfig
from rcm_train.objectives import RCMObjectiveConfig
from rcm_train.parallel import ParallelConfig
from rcm_train.trainer import OptimizerConfig, ScheduleConfig


class ModelConfig(RecipeConfig):
    """The network and the teacher weights (student and fake score start as copies of the teacher)."""

    config: str = "t2v-1.3B"
    """Named WanDiT config (t2v-1.3B, t2v-14B, tiny, ...) or an official config.json path."""
    overrides: dict[str, Any] = {}
    """WanConfig fields replacing those of `config`; JSON on the command line."""
    teacher_path: str = "checkpoints/Wan2.1-T2V-1.3B.pth"
    """Teacher weights: official .pth / .safetensors, sharded safetensors dir or DCP dir (net. prefix ok)."""
    teacher_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Storage (= compute) dtype of the frozen teacher. Trained networks are stored float32."""


class StageConfig(RecipeConfig):
    """One training stage: objective, student/critic schedule and length."""

    name: str = "rcm"
    """Stage name: checkpoint / log sub-directory."""
    iterations: int = 0
    """Raw iterations (student and critic together) of this stage; 0 skips it."""
    fake_score: bool = True
    """Train a fake score (critic) and add the DMD loss (rCM, DMD); False: consistency loss only."""
    objective: RCMObjectiveConfig = RCMObjectiveConfig()
    """The rCM objective of this stage (cm_type, loss weights, time distributions, ...)."""
    schedule: ScheduleConfig = ScheduleConfig()
    """Student / critic alternation (tangent_warmup, student_update_freq)."""

    @model_validator(mode="after")
    def _check(self) -> StageConfig:
        if self.iterations < 0:
            raise ValueError(f"stage {self.name!r}: iterations must be >= 0")
        o = self.objective
        if o.loss_scale == 0 and not self.fake_score:
            raise ValueError(f"stage {self.name!r} trains nothing: loss_scale=0 and fake_score=false")
        if o.loss_scale == 0 and self.schedule.tangent_warmup != 0:
            raise ValueError(f"stage {self.name!r}: pure DMD (loss_scale=0) needs schedule.tangent_warmup=0")
        if self.fake_score and o.loss_scale_dmd <= 0:
            raise ValueError(f"stage {self.name!r}: a fake score needs objective.loss_scale_dmd > 0 "
                             "(set fake_score=false for a consistency-only stage)")
        return self


class ParallelismConfig(RecipeConfig):
    """Device mesh and how each network is parallelized (rcm_train.parallel)."""

    fsdp_shard_size: int = -1
    """Ranks per FSDP shard group (HSDP replicates across groups); -1: all ranks of the world / cp."""
    cp: int = 1
    """Ulysses context-parallel size (consecutive ranks share samples; must divide the head count)."""
    student: ParallelConfig = ParallelConfig(sac="block_wise")
    """Student (and its EMA copy)."""
    fake_score: ParallelConfig = ParallelConfig(sac="mm_only")
    """Fake score (critic)."""
    teacher: ParallelConfig = ParallelConfig(param_dtype=None)
    """Frozen teacher (no gradients: activation checkpointing does nothing)."""


class LoopConfig(RecipeConfig):
    """Training-loop settings shared by the stages."""

    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    clip_norm: float | None = None
    """Clip the gradient norm (None: compute and log it only, as the reference)."""
    seed: int = 0
    """Seed of every random draw of the steps (reproducible across resumes)."""
    ema_rate: float | None = 0.1
    """Power-EMA rate of the student's EMA (None: no EMA updates)."""
    ema_iteration_shift: int = 0
    """Added to the effective iteration in the EMA decay."""
    checkpoint_every: int = 500
    """Save a DCP checkpoint every this many iterations (and at the end of each stage)."""
    keep_last: int | None = 3
    """Keep only this many complete checkpoints per stage (None: all)."""
    async_save: bool = False
    """Save checkpoints in the background."""
    log_every: int = 50
    """Average and report metrics every this many iterations."""
    wandb_mode: Literal["disabled", "offline", "online"] = "disabled"
    """Weights & Biases logging (needs the wandb extra)."""
    wandb_project: str = "rcm"
    """wandb project."""


class SampleConfig(RecipeConfig):
    """Periodic few-step samples of the student (and its EMA) written as mp4."""

    every: int = 500
    """Sample every this many iterations (also before the first one); 0 disables sampling."""
    num_prompts: int = 4
    """Prompts (the first samples of the data: embeddings, prompts and latent shape) per video."""
    steps: list[int] = [1, 2, 4]
    """Student step counts to draw."""
    ema: bool = True
    """Also draw the EMA student."""
    teacher_steps: int = 0
    """Also draw the teacher with this many UniPC steps and CFG (0: no teacher row)."""
    sigma_max: float = 80.0
    """Initial noise level of the few-step sampler (1.3B 80, 14B 200)."""
    mid_t: list[float] = [1.5, 1.4, 1.0]
    """Intermediate TrigFlow times of the 2-4 step samplers."""
    seed: int = 1
    """Noise seed of the samples (fixed, so videos are comparable over training)."""
    vae: VAESpec | None = VAESpec()
    """VAE that decodes the samples; None: show latent channels 0-2 instead."""
    fps: int = 16
    """Frame rate of the sample videos."""


class DistillConfig(RecipeConfig):
    """rCM distillation (sCM / dCM / DMD / staged) of a Wan2.1 DiT teacher on webdataset latent shards."""

    output_dir: str = "outputs/distill/1.3B-rcm"
    """Run directory (config, checkpoints, logs, samples, exported weights); rerunning resumes."""
    model: ModelConfig = ModelConfig()
    """Network architecture and teacher weights."""
    data: DataConfig = DataConfig(
        shards="datasets/Wan2.1_14B_480p_16:9_Euler-step100_shift-3.0_cfg-5.0_seed-0_250K/shard*.tar",
        num_workers=4, num_frames=20)
    """Training shards (recipes/build_dataset.py writes them)."""
    negative_embed_path: str | None = "checkpoints/umT5_wan_negative_emb.pt"
    """Negative-prompt embedding [L, D] for the teacher's CFG (None: CFG is a no-op, as in the reference)."""
    stage1: StageConfig = StageConfig(name="rcm", iterations=100_000)
    """First stage."""
    stage2: StageConfig = StageConfig(name="stage2")
    """Second stage (from stage1's final student); iterations=0 skips it."""
    stage3: StageConfig = StageConfig(name="stage3")
    """Third stage; iterations=0 skips it."""
    optimizer: OptimizerConfig = OptimizerConfig(lr=2e-6)
    """Student AdamW (betas (0, 0.999), wd 0.01, 100-step warmup)."""
    fake_score_optimizer: OptimizerConfig = OptimizerConfig(lr=4e-7)
    """Fake-score AdamW."""
    train: LoopConfig = LoopConfig()
    """Loop settings shared by all stages."""
    parallel: ParallelismConfig = ParallelismConfig()
    """Mesh and per-network parallelism."""
    sample: SampleConfig = SampleConfig()
    """Periodic samples."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Dtype of the exported student / EMA weights."""

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        active = self.stages()
        if not active:
            raise ValueError("no stage to run: set stage1.iterations (or stage2/stage3) > 0")
        names = [s.name for s in active]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must differ (they name checkpoint directories), got {names}")
        if self.parallel.cp < 1:
            raise ValueError(f"parallel.cp must be >= 1, got {self.parallel.cp}")
        return self

    def stages(self) -> list[StageConfig]:
        """The stages to run, in order."""
        return [s for s in (self.stage1, self.stage2, self.stage3) if s.iterations > 0]


# ------------------------------------------------------------------------------------------ presets
Method = Literal["rcm", "scm", "dcm", "dmd", "staged"]

_EXPERIMENTS = {
    # RCM_SPEC §6.5: wan2pt1_1pt3B_res480p_t2v_rCM / wan2pt1_14B_res480p_t2v_rCM
    "1.3B": dict(config="t2v-1.3B", teacher="checkpoints/Wan2.1-T2V-1.3B.pth", p_g=0.7, warmup=1000, freq=5,
                 lr=2e-6, fake_lr=4e-7, shard=4, cp=1, sac="block_wise", frames=20, iters=100_000, save=500,
                 sigma_max=80.0),
    "14B": dict(config="t2v-14B", teacher="checkpoints/Wan2.1-T2V-14B.pth", p_g=1.5, warmup=0, freq=10,
                lr=1e-6, fake_lr=1e-7, shard=32, cp=8, sac="mm_only", frames=21, iters=100_000, save=250,
                sigma_max=200.0),
    # a CPU-sized run on the tiny network (tests; rcm_pipelines.testing writes such a teacher)
    "tiny": dict(config="tiny", teacher="outputs/tiny_assets/dit_t2v.pth", p_g=0.7, warmup=4, freq=2,
                 lr=1e-4, fake_lr=1e-4, shard=-1, cp=1, sac="none", frames=None, iters=16, save=8,
                 sigma_max=80.0),
}


def _objective(exp: dict, method: str) -> RCMObjectiveConfig:
    kw = dict(p_g_mean=exp["p_g"])
    if exp["config"] == "tiny":
        kw["input_dtype"] = "float32"
    if method == "dcm":
        kw["cm_type"] = "dcm"
    if method == "dmd":
        kw.update(loss_scale=0.0, dmd_fix_timesteps=True)
    return RCMObjectiveConfig(**kw)


def _stage(exp: dict, method: str, iterations: int, *, warmup: int | None = None) -> StageConfig:
    warmup = exp["warmup"] if warmup is None else warmup
    return StageConfig(name=method, iterations=iterations, fake_score=method in ("rcm", "dmd"),
                       objective=_objective(exp, method),
                       schedule=ScheduleConfig(tangent_warmup=0 if method in ("dmd", "dcm") else warmup,
                                               student_update_freq=exp["freq"]))


def make_preset(experiment: str, method: Method, *, debug: bool = False) -> DistillConfig:
    """The preset ``<experiment>-<method>``: experiment in {1.3B, 14B, tiny}, method as in the module doc.

    ``debug`` mirrors the reference ``..._debug`` variants: 25 iterations, log every 2, save every 10,
    sample every 6, tangent warmup 8.
    """
    exp = dict(_EXPERIMENTS[experiment])
    if debug:
        exp.update(iters=25, save=10, warmup=8)
    n = exp["iters"]
    if method == "staged":
        stages = [_stage(exp, "dcm", n // 10), _stage(exp, "scm", n // 5), _stage(exp, "rcm", n - n // 10 - n // 5,
                                                                               warmup=0)]
    else:
        stages = [_stage(exp, method, n)]
    stages += [StageConfig(name=f"stage{i + 1}") for i in range(len(stages), 3)]
    tiny = experiment == "tiny"
    pdtype = "float32" if tiny else "bfloat16"
    data = DataConfig(shards="outputs/tiny_dataset/shard_*.tar" if tiny else DistillConfig().data.shards,
                      num_workers=0 if tiny else 4, shuffle_buffer=16 if tiny else 1000, num_frames=exp["frames"])
    sample_every = 6 if debug else (8 if tiny else exp["save"])
    return DistillConfig(
        output_dir=f"outputs/distill/{experiment}-{method}" + ("-debug" if debug else ""),
        model=ModelConfig(config=exp["config"], teacher_path=exp["teacher"],
                          teacher_dtype="float32" if tiny else "bfloat16"),
        data=data,
        negative_embed_path="outputs/tiny_dataset/negative_embed.pt" if tiny else DistillConfig().negative_embed_path,
        stage1=stages[0], stage2=stages[1], stage3=stages[2],
        optimizer=OptimizerConfig(lr=exp["lr"], warmup_steps=2 if tiny else 100),
        fake_score_optimizer=OptimizerConfig(lr=exp["fake_lr"], warmup_steps=2 if tiny else 100),
        train=LoopConfig(checkpoint_every=exp["save"], log_every=2 if (debug or tiny) else 50),
        parallel=ParallelismConfig(
            fsdp_shard_size=exp["shard"], cp=exp["cp"],
            student=ParallelConfig(sac=exp["sac"], param_dtype=pdtype),
            fake_score=ParallelConfig(sac="none" if tiny else "mm_only", param_dtype=pdtype),
            teacher=ParallelConfig(param_dtype=None)),
        sample=SampleConfig(every=sample_every, num_prompts=2 if tiny else 4, sigma_max=exp["sigma_max"],
                            vae=VAESpec(path="outputs/tiny_assets/Wan2.1_VAE.pth", arch={"dim": 4}) if tiny
                            else VAESpec()),
        device="cpu" if tiny else "auto",
    )


PRESETS: dict[str, DistillConfig] = {
    f"{e}-{m}": make_preset(e, m) for e in _EXPERIMENTS for m in ("rcm", "scm", "dcm", "dmd", "staged")
}
PRESETS |= {f"{e}-rcm-debug": make_preset(e, "rcm", debug=True) for e in ("1.3B", "14B")}


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(DistillConfig, argv, presets=PRESETS, prog="distill.py")
    return run(cfg)


if __name__ == "__main__":
    try:
        main()
    except MissingFileError as err:  # a file the config names is absent: say which field to set, no traceback
        raise SystemExit(f"distill.py: error: {err}") from None
