"""The body of ``recipes/distill.py``: mesh, networks, stages, periodic samples, exports.

Every network is built on ``meta``, parallelized (``rcm_train.parallel.parallelize``: CP seams, activation
checkpointing, FSDP2), materialized on the device and filled from a full state dict (the teacher file, or
the previous stage's student) with ``set_model_state_dict`` — the same path on one CPU process (a world
of one) and on N GPUs. Each stage is one ``rcm_train.train`` call with its own checkpoint directory, so a
rerun resumes the stage in progress and skips finished ones.
"""

from __future__ import annotations

import itertools
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from rcm_nets.checkpoint import load_checkpoint, read_state_dict
from rcm_nets.wan import WanDiT
from rcm_nets.wan.configs import WanConfig
from rcm_pipelines.components import DiTSpec, dit_config, load_embedding, load_vae, require_file
from rcm_pipelines.generation import rcm_generate, teacher_generate, velocity_fn
from rcm_pipelines.video import grid_video
from rcm_train.checkpoint import Checkpointer, load_part
from rcm_train.data import ShardLoader
from rcm_train.data import expand_shards as data_shards
from rcm_train.logging import LoggerConfig, MetricsLogger
from rcm_train.objectives import RCMObjective
from rcm_train.parallel import ParallelConfig, build_mesh, parallelize
from rcm_train.parallel.mesh import ParallelMesh
from rcm_train.trainer import TrainConfig, TrainParts, build_optimizer, build_scheduler, train

from .config import write_config
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

__all__ = ["run", "DeviceData", "SampleHook", "build_network", "read_teacher", "first_samples", "make_mesh"]


def make_mesh(fsdp_shard_size: int, cp: int) -> ParallelMesh:
    """``(replicate, shard, cp)`` from the reference's knobs: parameters are sharded over
    ``fsdp_shard_size`` ranks (CP ranks included; at most the world), replicated across such groups."""
    world = dist.get_world_size()
    shard = world if fsdp_shard_size == -1 else min(fsdp_shard_size, world)
    if world % cp or shard % cp or world % shard:
        raise ValueError(f"parallel: world size {world}, fsdp_shard_size {shard} and cp {cp} must nest "
                         "(cp divides fsdp_shard_size, which divides the world size)")
    return build_mesh(world // shard, shard // cp, cp)


# ------------------------------------------------------------------------------------------ networks
def read_teacher(net_cfg: WanConfig, path: str) -> dict[str, Tensor]:
    """The teacher's full state dict (module keys, the file's dtype, CPU; memory-mapped for ``.pth``),
    strictly checked against ``net_cfg`` (a ``net.`` / ``net_ema.`` prefix is stripped)."""
    sd, fmt = read_state_dict(require_file(path, "model.teacher_path", "teacher weights"))
    dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    with torch.device("meta"):
        net = WanDiT(net_cfg, dtype=dtype)
    report = load_checkpoint(net, sd)
    prefix = f", stripped prefix {report.prefix!r}" if report.prefix else ""
    print0(f"teacher: {path} ({fmt}, {len(sd)} tensors, {dtype}{prefix})")
    return net.state_dict()


def build_network(net_cfg: WanConfig, state_dict: Mapping[str, Tensor], *, mesh: ParallelMesh,
                  parallel: ParallelConfig, device: torch.device, dtype: torch.dtype, trainable: bool,
                  precision: str = "teacher") -> WanDiT:
    """A WanDiT built on meta, parallelized, materialized on ``device`` in ``dtype`` and loaded from the
    full ``state_dict`` (every rank passes the whole dict; FSDP keeps its shard)."""
    with torch.device("meta"):
        net = WanDiT(net_cfg.model_copy(update={"precision": precision}), dtype=dtype)
    parallelize(net, mesh, parallel)
    net.to_empty(device=device)
    set_model_state_dict(net, dict(state_dict), options=StateDictOptions(full_state_dict=True, strict=True))
    return net.requires_grad_(trainable)


# ------------------------------------------------------------------------------------------ data
class DeviceData:
    """Batches of a `ShardLoader` moved to ``device``; forwards the loader's (DCP Stateful) position."""

    def __init__(self, loader: ShardLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state)


def expand_shards(data_cfg):
    """``data_cfg`` with ``shards`` as an explicit sorted file list (the command line turns even a single
    pattern into a one-element list; every entry is expanded). Raises naming the patterns if none match."""
    files = sorted(set(data_shards(data_cfg.shards)))
    if not files:
        raise FileNotFoundError(f"no shard file matches data.shards={data_cfg.shards} (build them with "
                                "recipes/build_dataset.py)")
    return data_cfg.model_copy(update={"shards": files})


def first_samples(data_cfg, n: int) -> dict[str, Any]:
    """The first ``n`` samples of the data (fixed order): ``embed [n, L, D]``, ``prompt`` (n strings) and
    ``latent [n, C, T, H, W]`` (CPU)."""
    one = data_cfg.model_copy(update=dict(batch_size=1, num_workers=0, shuffle_buffer=1, max_epochs=1))
    samples = list(itertools.islice(ShardLoader(one, rank=0, world_size=1), n))
    if not samples:
        raise ValueError(f"no sample in {data_cfg.shards!r}")
    return {"embed": torch.cat([s["embed"] for s in samples]), "prompt": [s["prompt"][0] for s in samples],
            "latent": torch.cat([s["latent"] for s in samples])}


# ------------------------------------------------------------------------------------------ samples
class SampleHook:
    """``(iteration, models) -> {"samples": video [3, T, rows*H, prompts*W]}`` on rank 0 (None elsewhere).

    Rows: student (and EMA) at each of ``cfg.steps`` few-step samplings, then the teacher (UniPC + CFG) if
    ``cfg.teacher_steps``; columns: the fixed sample prompts; the same noise everywhere. Every rank runs
    the network calls (FSDP / CP are collective); rank 0 decodes with the VAE (or shows latent channels).
    """

    def __init__(self, cfg, samples: Mapping[str, Any], *, device: torch.device, input_dtype: torch.dtype,
                 negative: Tensor | None, guidance: float):
        self.cfg, self.device, self.input_dtype = cfg, device, input_dtype
        self.context = samples["embed"].to(device)
        self.noise = torch.randn(samples["latent"].shape,
                                 generator=torch.Generator().manual_seed(cfg.seed)).to(device)
        self.negative, self.guidance = negative, guidance
        self.vae = load_vae(cfg.vae, device, torch.float32, field="sample.vae.path") \
            if cfg.vae is not None and is_rank0() else None

    def _rows(self, models: Mapping[str, nn.Module]) -> tuple[list[str], list[Tensor]]:
        cfg, labels, rows = self.cfg, [], []
        names = ["student"] + (["student_ema"] if cfg.ema and "student_ema" in models else [])
        for name in names:
            vel = velocity_fn(models[name])
            for steps in cfg.steps:
                g = torch.Generator().manual_seed(cfg.seed + 1)
                rows.append(rcm_generate(vel, self.noise, self.context, generator=g, num_steps=steps,
                                         sigma_max=cfg.sigma_max, mid_t=cfg.mid_t, input_dtype=self.input_dtype))
                labels.append(f"{name} {steps} step")
        if cfg.teacher_steps:
            unc = None if self.negative is None else self.negative[None].expand(len(self.noise), -1, -1)
            rows.append(teacher_generate(velocity_fn(models["teacher"]), self.noise, self.context, unc,
                                         sampler="unipc", num_steps=cfg.teacher_steps, guidance=self.guidance,
                                         sigma_max=cfg.sigma_max, input_dtype=self.input_dtype))
            labels.append(f"teacher {cfg.teacher_steps} step")
        return labels, rows

    def __call__(self, iteration: int, models: Mapping[str, nn.Module]) -> dict[str, Tensor] | None:
        labels, rows = self._rows(models)
        if not is_rank0():
            return None
        print0(f"samples at iteration {iteration}: rows {labels}")
        return {"samples": grid_video(torch.stack([decode_preview(self.vae, x) for x in rows]))}


# ------------------------------------------------------------------------------------------ stages
def _run_stage(cfg, stage, ctx: dict[str, Any], init_sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Train one stage (resuming if it has a checkpoint); returns its exports and last iteration."""
    mesh, device, net_cfg = ctx["mesh"], ctx["device"], ctx["net_cfg"]
    stage_dir = Path(cfg.output_dir) / stage.name
    ckpt = Checkpointer(Path(cfg.output_dir) / "checkpoints" / stage.name, keep_last=cfg.train.keep_last,
                        async_save=cfg.train.async_save)
    done = ckpt.latest_iteration()
    if done is not None and done >= stage.iterations:
        print0(f"stage {stage.name}: complete ({done} iterations), skipped")
        return {"iteration": done, "checkpoint": ckpt.latest(), **export_finished(ckpt.latest(), stage_dir,
                                                                                   DTYPES[cfg.export_dtype])}
    p = cfg.parallel
    build = lambda sd, par, trainable, prec: build_network(net_cfg, sd, mesh=mesh, parallel=par, device=device,
                                                           dtype=torch.float32, trainable=trainable, precision=prec)
    models = {"student": build(init_sd, p.student, True, "student"), "teacher": ctx["teacher"]}
    ema = build(init_sd, p.student, False, "student")
    optimizers = {"student": build_optimizer(models["student"], cfg.optimizer)}
    schedulers = {"student": build_scheduler(optimizers["student"], cfg.optimizer)}
    if stage.fake_score:
        models["fake_score"] = build(ctx["teacher_sd"], p.fake_score, True, "teacher")
        optimizers["fake_score"] = build_optimizer(models["fake_score"], cfg.fake_score_optimizer)
        schedulers["fake_score"] = build_scheduler(optimizers["fake_score"], cfg.fake_score_optimizer)
    parts = TrainParts(models=models, optimizers=optimizers, schedulers=schedulers, ema={"student": ema})
    loop = cfg.train
    train_cfg = TrainConfig(max_iter=stage.iterations, grad_accum=loop.grad_accum, clip_norm=loop.clip_norm,
                            seed=loop.seed, ema_rate=loop.ema_rate, ema_iteration_shift=loop.ema_iteration_shift,
                            schedule=stage.schedule, student_models=["student"],
                            critic_models=["fake_score"] if stage.fake_score else [],
                            checkpoint_every=loop.checkpoint_every, sample_every=cfg.sample.every)
    logger = MetricsLogger(LoggerConfig(dir=str(Path(cfg.output_dir) / "logs" / stage.name), every=loop.log_every,
                                        wandb_mode=loop.wandb_mode, wandb_project=loop.wandb_project,
                                        wandb_name=f"{Path(cfg.output_dir).name}-{stage.name}",
                                        video_fps=cfg.sample.fps), run_config=cfg.model_dump(mode="json"))
    hook = None
    if cfg.sample.every:
        hook = SampleHook(cfg.sample, ctx["samples"], device=device, negative=ctx["negative"],
                          input_dtype=_input_dtype(stage), guidance=stage.objective.guidance)
    data = DeviceData(ShardLoader(cfg.data, rank=mesh.dp_rank, world_size=mesh.dp_size), device)
    objective = RCMObjective(stage.objective, negative_embed=ctx["negative"])
    print0(f"stage {stage.name}: {stage.iterations} iterations, networks {sorted(models)}"
           + (f", resuming from iteration {done}" if done is not None else ""))
    state = train(parts, objective, data, train_cfg, checkpointer=ckpt, logger=logger, sample_hook=hook,
                  dp_rank=mesh.dp_rank, device=device)
    return finish_stage(state.iteration, {**models, "student_ema": ema}, hook=hook, logger=logger, ckpt=ckpt,
                        stage_dir=stage_dir, dtype=DTYPES[cfg.export_dtype])


def _input_dtype(stage) -> torch.dtype:
    name = stage.objective.input_dtype
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}[name] if name \
        else torch.float64


def run(cfg) -> dict[str, Any]:
    """Run every stage of a resolved ``DistillConfig``; returns ``{"stages": {name: info}, "student", ...}``.

    Initializes the process group from torchrun's environment (or a world of one) and tears it down at
    the end if it created it.
    """
    device = train_device(cfg.device)
    with process_group(device):
        return _run(cfg, device)


def _run(cfg, device: torch.device) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    if is_rank0():
        write_config(cfg, out / "config.yaml")
    cfg = cfg.model_copy(update={"data": expand_shards(cfg.data)})
    mesh = make_mesh(cfg.parallel.fsdp_shard_size, cfg.parallel.cp)
    print0(f"distill: world {dist.get_world_size()} on {device.type}, mesh (replicate, shard, cp) = {mesh.shape}, "
           f"stages {[(s.name, s.iterations) for s in cfg.stages()]}")
    net_cfg = dit_config(DiTSpec(config=cfg.model.config, overrides=cfg.model.overrides))
    teacher_sd = read_teacher(net_cfg, cfg.model.teacher_path)
    negative = None
    if cfg.negative_embed_path is not None:
        negative = load_embedding(cfg.negative_embed_path, "negative_embed_path", text_len=net_cfg.text_len)
        negative = negative.to(device)
    teacher = build_network(net_cfg, teacher_sd, mesh=mesh, parallel=cfg.parallel.teacher, device=device,
                            dtype=DTYPES[cfg.model.teacher_dtype], trainable=False)
    ctx = {"mesh": mesh, "device": device, "net_cfg": net_cfg, "teacher": teacher, "teacher_sd": teacher_sd,
           "negative": negative,
           "samples": first_samples(cfg.data, cfg.sample.num_prompts) if cfg.sample.every else None}
    results, init_sd = {}, teacher_sd
    for stage in cfg.stages():
        results[stage.name] = info = _run_stage(cfg, stage, ctx, init_sd)
        with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
            warnings.simplefilter("ignore")
            init_sd = load_part(info["checkpoint"], "student")
    last = results[cfg.stages()[-1].name]
    final = {"student": out / "student.safetensors", "student_ema": out / "student_ema.safetensors"}
    if is_rank0():
        for name, path in final.items():
            shutil.copyfile(last[name], path)
        print0(f"exported {final['student']} and {final['student_ema']}")
    if dist.is_initialized():
        dist.barrier()
    return {"stages": results, **final}
