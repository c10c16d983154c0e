"""The body of ``recipes/causal_distill.py``: networks per stage, staged schedule, streaming samples, exports.

Reuses ``distill_run``'s pieces (teacher reading, build-on-meta + parallelize + load, device data, shard
expansion). Each stage is one ``rcm_train.train`` call with its own checkpoint directory (a rerun resumes the
stage in progress and skips finished ones). The network a stage trains is always called ``student`` inside
the trainer; a ``flow`` stage's result becomes the run's causal teacher, any other stage's result the
student of the next stage with ``init=previous``.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rcm_losses.causal import FrameBlocks
from rcm_pipelines.components import DiTSpec, dit_config, load_embedding, load_vae
from rcm_pipelines.streaming import stream_generate
from rcm_pipelines.video import grid_video
from rcm_train.checkpoint import Checkpointer, load_part
from rcm_train.data import ShardLoader
from rcm_train.logging import LoggerConfig, MetricsLogger
from rcm_train.trainer import TrainConfig, TrainParts, build_optimizer, build_scheduler, train

from .causal_training import CausalRCMObjective, block_layout, video_kv_cache
from .config import write_config
from .distill_run import DeviceData, build_network, expand_shards, first_samples, make_mesh, read_teacher
from .runtime import (
    DTYPES,
    decode_preview,
    export_finished,
    finish_stage,
    is_rank0,
    print0,
    process_group,
    train_device,
)

__all__ = ["run", "CausalSampleHook", "frame_blocks"]


def frame_blocks(cfg) -> FrameBlocks:
    """The run's block layout over ``data.num_frames`` latent frames."""
    if cfg.data.num_frames is None:
        raise ValueError("causal training needs data.num_frames (a whole number of blocks)")
    b = cfg.blocks
    return FrameBlocks(cfg.data.num_frames, b.frames_per_block, b.first_block_frames)


# ------------------------------------------------------------------------------------------ samples
class CausalSampleHook:
    """``(iteration, models) -> {"samples": video}``: the student (and its EMA) streamed block by block with
    ``rcm_nets.wan.causal.stream_generate`` (KV cache, context refresh) on fixed prompts and noise.

    Rows: networks, columns: prompts. Latents are decoded with the VAE if one is configured, else shown as
    channels 0-2 (min-max scaled, 8x nearest).
    """

    def __init__(
        self,
        cfg,
        samples: Mapping[str, Any],
        blocks: FrameBlocks,
        *,
        device: torch.device,
        times,
        context_noise: float,
        i2v: bool,
        kv_dtype: str,
    ):
        self.cfg, self.blocks, self.device = cfg, blocks, device
        self.times, self.context_noise, self.kv_dtype = times, context_noise, kv_dtype
        self.context = samples["embed"].to(device)
        self.initial = samples["latent"][:, :, : blocks.first].to(device) if i2v else None
        self.shape = samples["latent"].shape
        self.vae = (
            load_vae(cfg.vae, device, torch.float32, field="sample.vae.path")
            if cfg.vae is not None and is_rank0()
            else None
        )

    def _stream(self, net: nn.Module) -> Tensor:
        n, c, t, h, w = self.shape
        cache = video_kv_cache(net, self.blocks, self.shape, self.kv_dtype, self.device)
        g = torch.Generator(device=self.device).manual_seed(self.cfg.seed)
        out = stream_generate(
            net,
            self.context,
            cache,
            num_frames=t,
            layout=block_layout(self.blocks),
            latent_shape=(n, c, h, w),
            generator=g,
            times=self.times,
            context_noise=self.context_noise,
            initial_latent=self.initial,
        )
        return torch.cat([blk.x0 for blk in out], dim=2)

    def __call__(self, iteration: int, models: Mapping[str, nn.Module]) -> dict[str, Tensor] | None:
        names = ["student"] + (["student_ema"] if self.cfg.ema and "student_ema" in models else [])
        rows = [self._stream(models[name]) for name in names]  # every rank: FSDP calls are collective
        if not is_rank0():
            return None
        print0(f"samples at iteration {iteration}: rows {names}, {self.blocks.num_blocks} blocks")
        return {"samples": grid_video(torch.stack([decode_preview(self.vae, x) for x in rows]))}


# ------------------------------------------------------------------------------------------ stages
def _frozen(ctx: dict[str, Any], name: str, sd: Mapping[str, Tensor]) -> nn.Module:
    """A frozen network built once per state dict (the causal teacher changes after a flow stage)."""
    key = (name, id(sd))
    if key not in ctx["frozen"]:
        ctx["frozen"] = {k: v for k, v in ctx["frozen"].items() if k[0] != name}
        ctx["frozen"][key] = build_network(
            ctx["net_cfg"],
            sd,
            mesh=ctx["mesh"],
            parallel=ctx["cfg"].parallel.teacher,
            device=ctx["device"],
            dtype=DTYPES[ctx["cfg"].model.teacher_dtype],
            trainable=False,
        )
    return ctx["frozen"][key]


def _run_stage(cfg, stage, ctx: dict[str, Any], init_sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Train one stage (resuming if it has a checkpoint); returns its exports and checkpoint."""
    mesh, device, net_cfg, obj = ctx["mesh"], ctx["device"], ctx["net_cfg"], stage.objective
    stage_dir = Path(cfg.output_dir) / stage.name
    ckpt = Checkpointer(
        Path(cfg.output_dir) / "checkpoints" / stage.name,
        keep_last=cfg.train.keep_last,
        async_save=cfg.train.async_save,
    )
    done = ckpt.latest_iteration()
    if done is not None and done >= stage.iterations:
        print0(f"stage {stage.name}: complete ({done} iterations), skipped")
        return {
            "iteration": done,
            "checkpoint": ckpt.latest(),
            **export_finished(ckpt.latest(), stage_dir, DTYPES[cfg.export_dtype]),
        }
    p = cfg.parallel
    build = lambda sd, par, trainable, prec: build_network(
        net_cfg,
        sd,
        mesh=mesh,
        parallel=par,
        device=device,
        dtype=torch.float32,
        trainable=trainable,
        precision=prec,
    )
    models = {"student": build(init_sd, p.student, True, "student")}
    ema = build(init_sd, p.student, False, "student")
    optimizers = {"student": build_optimizer(models["student"], cfg.optimizer)}
    schedulers = {"student": build_scheduler(optimizers["student"], cfg.optimizer)}
    if obj.cm != "none":
        if ctx["causal_teacher_sd"] is None:
            raise ValueError(
                f"stage {stage.name}: objective.cm needs a causal teacher (a flow stage before it, "
                "or model.causal_teacher_path)"
            )
        models["causal_teacher"] = _frozen(ctx, "causal_teacher", ctx["causal_teacher_sd"])
    if obj.ode or obj.dmd:
        models["teacher"] = _frozen(ctx, "teacher", ctx["teacher_sd"])
    if obj.dmd:
        models["fake_score"] = build(ctx["teacher_sd"], p.fake_score, True, "teacher")
        optimizers["fake_score"] = build_optimizer(models["fake_score"], cfg.fake_score_optimizer)
        schedulers["fake_score"] = build_scheduler(optimizers["fake_score"], cfg.fake_score_optimizer)
    parts = TrainParts(models=models, optimizers=optimizers, schedulers=schedulers, ema={"student": ema})
    loop = cfg.train
    train_cfg = TrainConfig(
        max_iter=stage.iterations,
        grad_accum=loop.grad_accum,
        clip_norm=loop.clip_norm,
        seed=loop.seed,
        ema_rate=loop.ema_rate,
        schedule=stage.schedule,
        student_models=["student"],
        critic_models=["fake_score"] if obj.dmd else [],
        checkpoint_every=loop.checkpoint_every,
        sample_every=cfg.sample.every,
    )
    logger = MetricsLogger(
        LoggerConfig(
            dir=str(Path(cfg.output_dir) / "logs" / stage.name),
            every=loop.log_every,
            wandb_mode=loop.wandb_mode,
            wandb_project=loop.wandb_project,
            wandb_name=f"{Path(cfg.output_dir).name}-{stage.name}",
            video_fps=cfg.sample.fps,
        ),
        run_config=cfg.model_dump(mode="json"),
    )
    blocks = ctx["blocks"]
    objective = CausalRCMObjective(
        obj,
        blocks,
        given_blocks=int(cfg.blocks.i2v),
        negative_embed=ctx["negative"],
        seed=loop.seed,
        grad_accum=loop.grad_accum,
    )
    hook = None
    if cfg.sample.every:
        times = (
            obj.sf_schedule
            if not obj.trains_teacher
            else [1.0 - k / cfg.sample.teacher_steps for k in range(cfg.sample.teacher_steps)]
        )
        hook = CausalSampleHook(
            cfg.sample,
            ctx["samples"],
            blocks,
            device=device,
            times=times,
            context_noise=obj.context_noise,
            i2v=cfg.blocks.i2v,
            kv_dtype=obj.kv_dtype,
        )
    data = DeviceData(ShardLoader(cfg.data, rank=mesh.dp_rank, world_size=mesh.dp_size), device)
    print0(
        f"stage {stage.name}: {stage.iterations} iterations, networks {sorted(models)}, blocks "
        f"{blocks.sizes}" + (f", resuming from iteration {done}" if done is not None else "")
    )
    state = train(
        parts,
        objective,
        data,
        train_cfg,
        checkpointer=ckpt,
        logger=logger,
        sample_hook=hook,
        dp_rank=mesh.dp_rank,
        device=device,
    )
    return finish_stage(
        state.iteration,
        {**models, "student_ema": ema},
        hook=hook,
        logger=logger,
        ckpt=ckpt,
        stage_dir=stage_dir,
        dtype=DTYPES[cfg.export_dtype],
    )


def run(cfg) -> dict[str, Any]:
    """Run every stage of a resolved ``CausalDistillConfig``; returns ``{"stages": {...}, "student", ...}``.

    Initializes the process group from torchrun's environment (or a world of one); tears it down at the end
    if it created it.
    """
    device = train_device(cfg.device)
    with process_group(device):
        return _run(cfg, device)


def _run(cfg, device: torch.device) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    if is_rank0():
        write_config(cfg, out / "config.yaml")
    cfg = cfg.model_copy(update={"data": expand_shards(cfg.data)})
    world = dist.get_world_size()
    mesh = make_mesh(cfg.parallel.fsdp_shard_size, 1)  # no context parallel: the cached block pass refuses it
    net_cfg = dit_config(DiTSpec(config=cfg.model.config, overrides=cfg.model.overrides))
    blocks = frame_blocks(cfg)
    print0(
        f"causal_distill: world {world} on {device.type}, blocks {blocks.sizes}, stages "
        f"{[(s.name, s.iterations) for s in cfg.stages()]}"
    )
    negative = None
    if cfg.negative_embed_path is not None:
        negative = load_embedding(
            cfg.negative_embed_path, "negative_embed_path", text_len=net_cfg.text_len
        ).to(device)
    ctx = {
        "cfg": cfg,
        "mesh": mesh,
        "device": device,
        "net_cfg": net_cfg,
        "blocks": blocks,
        "negative": negative,
        "teacher_sd": read_teacher(net_cfg, cfg.model.teacher_path),
        "frozen": {},
        "causal_teacher_sd": read_teacher(net_cfg, cfg.model.causal_teacher_path)
        if cfg.model.causal_teacher_path
        else None,
        "samples": first_samples(cfg.data, cfg.sample.num_prompts) if cfg.sample.every else None,
    }
    results: dict[str, Any] = {}
    student_sd = None
    for stage in cfg.stages():
        init = {
            "teacher": ctx["teacher_sd"],
            "causal_teacher": ctx["causal_teacher_sd"],
            "previous": student_sd,
        }
        if init[stage.init] is None:
            raise ValueError(
                f"stage {stage.name}: init={stage.init!r} but no such network exists yet (a "
                "student stage must come before 'previous', a flow stage or model.causal_teacher_path "
                "before 'causal_teacher')"
            )
        results[stage.name] = info = _run_stage(cfg, stage, ctx, init[stage.init])
        sd = load_part(info["checkpoint"], "student")
        if stage.objective.trains_teacher:
            ctx["causal_teacher_sd"] = sd
        else:
            student_sd = sd
    final: dict[str, Path] = {}
    for stage in reversed(cfg.stages()):
        key = "causal_teacher" if stage.objective.trains_teacher else "student"
        if key not in final:
            final[key] = results[stage.name]["student"]
            if key == "student":
                final["student_ema"] = results[stage.name]["student_ema"]
    copies = {k: out / f"{k}.safetensors" for k in final}
    if is_rank0():
        for k, src in final.items():
            shutil.copyfile(src, copies[k])
        print0(f"exported {', '.join(str(p) for p in copies.values())}")
    if dist.is_initialized():
        dist.barrier()
    return {"stages": results, **copies}
