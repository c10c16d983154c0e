"""Causal-rCM training objectives for ``rcm_train``: a causal video DiT bound to ``rcm_losses.causal``.

One :class:`CausalRCMObjective` covers every stage of the Causal-rCM schedule (docs/causal_training.md); the stage's
:class:`CausalObjectiveConfig` switches the closures on:

========  =========================================================================================
flow      causal teacher by teacher forcing (``tf``: packed ``[x0 ; x_t]``, one time per sample, bell
          weight) or diffusion forcing (``df``: block-causal mask, independent time per block)
cm        student by teacher-forcing dCM / sCM / both (``dscm``) against the frozen causal teacher (CFG)
ode       student by regression onto ODE trajectories of the bidirectional teacher (CFG), block-causal
dmd       student by self-forcing DMD against the bidirectional teacher (CFG) + a fake score (critic
          iterations); combinable with ``cm`` as sCM + DMD are combined in rCM
========  =========================================================================================

Networks (``models``): ``student`` (trained: the causal teacher in a ``flow`` stage), ``causal_teacher``
(frozen, ``cm``), ``teacher`` (frozen bidirectional Wan: ``ode``, ``dmd``), ``fake_score`` (bidirectional,
trained in critic iterations). The network bindings are small: :func:`tf_velocity` (packed teacher-forcing
pass, ``WanDiT.forward`` with the teacher-forcing mask and repeated RoPE positions), :func:`df_velocity`
(block-causal mask) and :class:`CachedBlocks` (``WanDiT.forward_block`` over a ``KVCache``: the
self-forcing rollout exactly as inference runs it).

The networks are used through a call contract, never a class (``rcm_nets.wan.WanDiT`` implements it):
``net(x, t, context, block_mask=, frame_pos=)``, ``net.forward_jvp(x, t, context, tangent_x, tangent_t, ...)``
with the same keywords, ``net.forward_block(x, t, context, cache=, block=, write=)`` over a ``KVCache`` and
``net.config.patch_size``; the KV cache comes from the ``make_cache`` factory the recipe passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from rcm_kernels import blockmask
from rcm_kernels.blockmask import teacher_forcing_positions
from rcm_kernels.devices import parse_dtype
from rcm_kernels.kv_cache import KVCache
from rcm_losses import TrigFlowAdapter, dmd_objective, fake_score_objective, flow_euler_sample
from rcm_losses.causal import (
    FrameBlocks,
    cycled_exit_steps,
    flow_matching_objective,
    network_input,
    ode_regression_objective,
    replay_backward,
    sample_block_dcm_times,
    sample_block_times,
    sample_exit_steps,
    self_forcing_rollout,
    teacher_forcing_velocity,
    tf_dcm_objective,
    tf_scm_objective,
)
from rcm_losses.consistency import tangent_warmup_ratio
from rcm_losses.parameterization import rf_to_trig
from rcm_losses.sampling import flow_sigmas
from rcm_losses.schedules import block_schedules
from rcm_losses.timesteps import LogNormal, UniformShift

from ..stages import (
    SampleHook,
    Stage,
    StagedRunConfig,
    StageResult,
    StageSetup,
    load_stage_student,
    publish,
    run_stage,
)
from ..trainer import (
    Closure,
    OptimizerConfig,
    ScheduleConfig,
    StepContext,
    TrainParts,
    build_optimizer,
    build_scheduler,
    seeded_generator,
)

CacheFactory = Callable[[nn.Module, tuple[int, ...], torch.device], KVCache]
"""``(net, video shape (B, C, T, H, W), device) -> KVCache``: an empty non-rolling cache of ``net`` holding a
whole latent video (the recipe binds the block layout and the storage dtype)."""


__all__ = [
    "CausalObjectiveConfig",
    "CausalRCMObjective",
    "CachedBlocks",
    "tf_velocity",
    "df_velocity",
    "CacheFactory",
    "CausalBlocksConfig",
    "CausalStageConfig",
    "CausalNetworks",
    "ROLES",
    "check_causal_stages",
    "first_weights_needed",
    "run_causal_stages",
]

_SHARED_STREAM = 0x5E1F  # seed stream of the rank-independent exit-step generator
SF_SCHEDULE = [1.0, 15 / 16, 5 / 6, 5 / 8]
"""RF times of the self-forcing rollout (Causal-rCM / Self-Forcing's warped [1000, 750, 500, 250])."""


class CausalObjectiveConfig(BaseModel):
    """What a causal stage trains and how (defaults: the Causal-rCM values, docs/causal_training.md)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    flow: Literal["none", "tf", "df"] = "none"
    """Causal-teacher training by flow matching: teacher forcing (tf) or diffusion forcing (df)."""
    cm: Literal["none", "dcm", "scm", "dscm"] = "none"
    """Teacher-forcing consistency distillation against models['causal_teacher'] (dscm: dCM then sCM)."""
    ode: bool = False
    """ODE-pair initialization: regress onto trajectories of the bidirectional teacher."""
    dmd: bool = False
    """Self-forcing DMD against the bidirectional teacher with a fake score (critic iterations)."""
    loss_scale: float = 100.0
    """Weight of the flow-matching and sCM/dCM losses (sums over elements, as rcm)."""
    loss_scale_dmd: float = 1.0
    """Weight of the DMD loss."""
    loss_scale_ode: float = 1.0
    """Weight of the ODE regression loss."""
    cm_guidance: float = 3.0
    """CFG of the causal teacher in sCM/dCM (Causal-rCM: 3)."""
    dmd_guidance: float = 5.0
    """CFG of the bidirectional teacher's real score in DMD (Causal-rCM: 5)."""
    block_times: Literal["random", "same"] = "random"
    """Per-block times of df / sCM / dCM: independent per block, or one per sample."""
    p_g_mean: float = -0.8
    """tf_scm times LogNormal(mean, std) in log-sigma (Causal-rCM: -0.8, 1.6)."""
    p_g_std: float = 1.6
    """tf_scm log-sigma std."""
    p_d_shift: float = 5.0
    """DMD / critic / flow-matching times UniformShift(shift)."""
    dcm_total_steps: int = 48
    """dCM grid size N."""
    dcm_skip_steps: int = 1
    """dCM teacher steps per target."""
    dcm_shift: float = 3.0
    """dCM RF time shift (Causal-rCM tf_dcm: 3)."""
    context_noise: float = 0.0
    """RF time of the student's context (0 = clean; > 0 = Causal-rCM's noisy context, same in TF and SF)."""
    sf_schedule: list[float] | list[list[float]] = SF_SCHEDULE
    """RF times of each block's few-step chain (one list, or one per block with the last repeated)."""
    sf_exit: Literal["random", "cycle"] = "random"
    """Exit step of each block: uniform random (Self-Forcing) or cycling with the iteration (rcm)."""
    sf_same_exit: bool = True
    """One exit step for all blocks (capped by each block's schedule); False draws one per block."""
    replay: bool = False
    """Replayed backprop of the rollout: recompute one block at a time (memory of one block)."""
    kv_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """Storage of the self-forcing KV cache (the networks' compute dtype)."""
    ode_steps: int = 48
    """Euler steps of the teacher ODE trajectories (Self-Forcing: 48)."""
    ode_shift: float = 8.0
    """RF time shift of the ODE trajectories (Self-Forcing: 8)."""
    ode_guidance: float = 6.0
    """CFG of the ODE trajectories (Self-Forcing: 6)."""
    ode_keep: list[int] | None = None
    """Trajectory steps kept as regression inputs (None: 0, n/4, n/2, 3n/4 as Self-Forcing's 0/12/24/36)."""
    input_dtype: Literal["bfloat16", "float32", "float64"] | None = "bfloat16"
    """Dtype of the network input (None: float64 as computed)."""
    timestep_dtype: Literal["bfloat16", "float32"] | None = "bfloat16"
    """Round Wan's timestep through this dtype (rcm: bf16); None keeps it exact."""

    @model_validator(mode="after")
    def _check(self) -> CausalObjectiveConfig:
        student = self.cm != "none" or self.dmd or self.ode
        if self.flow != "none" and student:
            raise ValueError(
                "objective.flow trains a causal teacher: it cannot be combined with cm / ode / dmd"
            )
        if self.flow == "none" and not student:
            raise ValueError("the objective trains nothing: set flow, cm, ode or dmd")
        if self.ode and (self.cm != "none" or self.dmd):
            raise ValueError("objective.ode is an initialization stage: run cm / dmd in a later stage")
        if not 0 <= self.context_noise < 1:
            raise ValueError(
                f"objective.context_noise must be an RF time in [0, 1), got {self.context_noise}"
            )
        nested = isinstance(self.sf_schedule[0], list) if self.sf_schedule else False
        block_schedules(self.sf_schedule, len(self.sf_schedule) if nested else 1, low=0.0, high=1.0,
                        what="objective.sf_schedule (RF times)")
        return self

    @property
    def trains_teacher(self) -> bool:
        return self.flow != "none"


# ------------------------------------------------------------------------------------------ bindings
def _tokens_per_frame(net: nn.Module, x: Tensor) -> int:
    _, ph, pw = net.config.patch_size
    return (x.shape[3] // ph) * (x.shape[4] // pw)


def tf_velocity(net: nn.Module, blocks: FrameBlocks, like: Tensor):
    """``(velocity, velocity_jvp)`` of the packed teacher-forcing pass over ``[context ; noisy]``: the
    teacher-forcing mask of ``blocks`` and RoPE positions ``0..T-1`` for both halves (``like``: the video)."""
    mask = blockmask.teacher_forcing(
        blocks.num_blocks,
        blocks.frames_per_block,
        _tokens_per_frame(net, like),
        first_block_frames=blocks.first,
    )
    pos = teacher_forcing_positions(blocks.num_frames, like.device)
    vel = lambda x, ts, c: net(x, ts, c, block_mask=mask, frame_pos=pos)
    jvp = lambda x, ts, c, tx, tt: net.forward_jvp(x, ts, c, tx, tt, block_mask=mask, frame_pos=pos)
    return vel, jvp


def df_velocity(net: nn.Module, blocks: FrameBlocks, like: Tensor):
    """The block-causal full-sequence pass (diffusion forcing, ODE regression) as a velocity."""
    mask = blockmask.block_causal(
        blocks.num_blocks,
        blocks.frames_per_block,
        _tokens_per_frame(net, like),
        first_block_frames=blocks.first,
    )
    return lambda x, ts, c: net(x, ts, c, block_mask=mask)


class CachedBlocks:
    """``denoise`` / ``commit`` / ``reset`` of a causal WanDiT over a ``KVCache`` (self-forcing rollout).

    ``denoise(x_t, t, i)``: ``WanDiT.forward_block`` of block i reading the cache (grad as the caller's mode);
    ``commit(x, t, i)``: the same pass at the context time writing the block's k/v (detached), then commit.
    """

    def __init__(
        self,
        net: nn.Module,
        cache: KVCache,
        cond: Tensor,
        blocks: FrameBlocks,
        *,
        input_dtype: torch.dtype | None,
        timestep_dtype: torch.dtype | None,
    ):
        self.net, self.cache, self.cond, self.blocks = net, cache, cond, blocks
        self.dtypes = dict(input_dtype=input_dtype, timestep_dtype=timestep_dtype)
        self.reset()

    def reset(self) -> None:
        self.cache.reset()
        self._pending: tuple[int, Any] | None = None

    def _block(self, i: int):
        if self._pending is None or self._pending[0] != i:
            self._pending = (i, self.cache.begin_block(self.blocks.sizes[i]))
        return self._pending[1]

    def denoise(self, x: Tensor, t: Tensor, i: int):
        blk = self._block(i)
        vel = lambda xs, ts, c: self.net.forward_block(xs, ts, c, cache=self.cache, block=blk)
        return TrigFlowAdapter(vel, **self.dtypes)(x, t, self.cond)

    def commit(self, x: Tensor, t: Tensor, i: int) -> None:
        blk = self._block(i)
        x_in, ts = network_input(x, t, **self.dtypes)
        self.net.forward_block(x_in, ts, self.cond, cache=self.cache, block=blk, write=True)
        self.cache.commit(blk)
        self._pending = None


# ------------------------------------------------------------------------------------------ objective
class CausalRCMObjective:
    """``closures(models, batch, ctx)`` of a causal stage (see the module docstring).

    ``batch``: ``{"latent": x0 [B, C, T, H, W], "embed": [B, L, D]}``; ``blocks`` must cover T frames.
    ``given_blocks``: leading blocks given as clean context (causal I2V: 1, the data's first block stands in
    for the image latent). ``negative_embed`` ``[L, D]``: unconditional context of the CFG teachers.
    ``seed``: the exit steps come from a generator seeded without the rank (identical on all ranks: they decide
    how many network calls each rank makes, which must match across FSDP / data-parallel ranks); every other random
    number from the step generator. ``grad_accum``: the trainer's micro-batches per step (the replay mode runs
    its own backward passes and applies the trainer's ``1 / grad_accum`` itself).
    """

    def __init__(
        self,
        config: CausalObjectiveConfig,
        blocks: FrameBlocks,
        *,
        given_blocks: int = 0,
        negative_embed: Tensor | None = None,
        make_cache: CacheFactory,
        seed: int = 0,
        grad_accum: int = 1,
    ):
        if not 0 <= given_blocks < blocks.num_blocks:
            raise ValueError(f"given_blocks must be in [0, {blocks.num_blocks}), got {given_blocks}")
        if config.ode and given_blocks:
            raise ValueError(
                "ODE initialization is T2V only (the bidirectional teacher cannot take a given "
                "block): set blocks.i2v=false for the ode stage"
            )
        self.cfg, self.blocks, self.seed, self.grad_accum = config, blocks, seed, grad_accum
        self.make_cache = make_cache
        self.given = sum(blocks.sizes[:given_blocks])
        self.negative_embed = negative_embed
        self.p_g, self.p_d = LogNormal(config.p_g_mean, config.p_g_std), UniformShift(config.p_d_shift)
        d = lambda name: parse_dtype(name) if name else None
        self.dtypes = dict(input_dtype=d(config.input_dtype), timestep_dtype=d(config.timestep_dtype))
        scheds = [
            [float(rf_to_trig(torch.tensor(v, dtype=torch.float64))) for v in s]
            for s in (config.sf_schedule if isinstance(config.sf_schedule[0], list) else [config.sf_schedule])
        ]
        self.schedule = scheds if isinstance(config.sf_schedule[0], list) else scheds[0]
        self.lengths = [len(scheds[min(i, len(scheds) - 1)]) for i in range(blocks.num_blocks)]
        self.t_c = float(rf_to_trig(torch.tensor(config.context_noise, dtype=torch.float64)))
        self._caches: dict[tuple, KVCache] = {}

    # ---------------------------------------------------------------------------------- pieces
    def _bidir(self, net: nn.Module) -> TrigFlowAdapter:
        return TrigFlowAdapter(lambda x, ts, c: net(x, ts, c), **self.dtypes)

    def _context_time(self, x0: Tensor) -> Tensor:
        t = torch.full((x0.shape[0], x0.shape[2]), self.t_c, dtype=torch.float64, device=x0.device)
        t[:, : self.given] = 0.0  # a given (I2V) block is clean context at inference too
        return t

    def _cache(self, net: nn.Module, x0: Tensor) -> KVCache:
        b, _, t, h, w = x0.shape
        key = (id(net), b, t, h, w, str(x0.device))
        if key not in self._caches:
            self._caches.clear()  # one cache alive at a time (storage is allocated once per shape)
            self._caches[key] = self.make_cache(net, tuple(x0.shape), x0.device)
        return self._caches[key]

    def exit_steps(self, ctx: StepContext) -> tuple[int, ...]:
        if self.cfg.sf_exit == "cycle":
            return cycled_exit_steps(ctx.effective_iteration, self.lengths)
        g = seeded_generator(self.seed, ctx.iteration, ctx.micro_step, _SHARED_STREAM)
        return sample_exit_steps(self.lengths, generator=g, same_across_blocks=self.cfg.sf_same_exit)

    def rollout(self, net: nn.Module, x0: Tensor, cond: Tensor, ctx: StepContext, *, with_grad: bool):
        """The student's self-forcing rollout (grad through each block's exit step when ``with_grad``) and
        its cache binding."""
        binding = CachedBlocks(net, self._cache(net, x0), cond, self.blocks, **self.dtypes)
        given = x0[:, :, : self.given] if self.given else None
        out = self_forcing_rollout(
            binding.denoise,
            binding.commit,
            x0.shape,
            self.blocks,
            self.schedule,
            generator=ctx.generator,
            exit_steps=self.exit_steps(ctx),
            given=given,
            context_time=self.t_c,
            with_grad=with_grad,
        )
        return out, binding

    def sf_dmd(
        self,
        models: Mapping[str, nn.Module],
        x0: Tensor,
        cond: Tensor,
        uncond: Tensor | None,
        ctx: StepContext,
        noise,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Self-forcing DMD (docs/causal_training.md); with ``replay`` the rollout runs without grad and each block's
        exit step is recomputed and backpropagated here, one block at a time."""
        cfg, g, b = self.cfg, ctx.generator, x0.shape[0]
        out, binding = self.rollout(models["student"], x0, cond, ctx, with_grad=not cfg.replay)
        G = out.x0.detach().requires_grad_() if cfg.replay else out.x0
        loss, diag = dmd_objective(
            G,
            self.p_d(b, generator=g).to(x0.device),
            noise(),
            self._bidir(models["fake_score"]),
            self._bidir(models["teacher"]),
            cond,
            uncond,
            guidance=cfg.dmd_guidance,
            loss_scale=cfg.loss_scale_dmd,
        )
        if cfg.replay:  # the trainer's own backward then reaches only the leaf G (no parameters)
            (grad_g,) = torch.autograd.grad(loss.sum() / self.grad_accum, G, retain_graph=True)
            replay_backward(out, binding.denoise, binding.commit, self.blocks, grad_g, reset=binding.reset)
        return loss, diag

    def ode_trajectory(self, teacher: nn.Module, noise: Tensor, cond: Tensor, uncond: Tensor | None):
        """``(trajectory [K+1, B, C, T, H, W], times [K+1, B])`` in TrigFlow: the teacher's CFG Euler ODE
        from pure noise, states at ``ode_keep`` plus the endpoint (``t = 0``)."""
        cfg = self.cfg
        keep = (
            cfg.ode_keep
            if cfg.ode_keep is not None
            else [0, cfg.ode_steps // 4, cfg.ode_steps // 2, 3 * cfg.ode_steps // 4]
        )
        states = [noise.to(torch.float64)]
        x_end = flow_euler_sample(
            lambda x, ts, c: teacher(x, ts, c),
            noise,
            cond,
            uncond,
            guidance=cfg.ode_guidance,
            num_steps=cfg.ode_steps,
            shift=cfg.ode_shift,
            sigma_max=None,
            callback=lambda d: states.append(d["x"]),
            **self.dtypes,
        )
        s = flow_sigmas(cfg.ode_steps, shift=cfg.ode_shift, sigma_max=None).to(torch.float64)
        if any(not 0 <= k < cfg.ode_steps for k in keep):
            raise ValueError(f"objective.ode_keep {keep} must index the {cfg.ode_steps} ODE steps")
        idx = sorted(set(keep))
        t = rf_to_trig(s[idx + [cfg.ode_steps]])
        scale = torch.cos(t) + torch.sin(t)  # RF sample -> TrigFlow sample
        traj = torch.stack([states[k] * scale[j] for j, k in enumerate(idx)] + [x_end.to(torch.float64)])
        return traj, t[:, None].expand(-1, noise.shape[0]).to(noise.device)

    # ---------------------------------------------------------------------------------- closures
    def closures(
        self, models: Mapping[str, nn.Module], batch: Mapping[str, Any], ctx: StepContext
    ) -> dict[str, Closure]:
        cfg, g, blocks, given = self.cfg, ctx.generator, self.blocks, self.given
        x0 = batch["latent"].float()
        cond = batch["embed"]
        b = x0.shape[0]
        if x0.shape[2] != blocks.num_frames:
            raise ValueError(
                f"batch latents have {x0.shape[2]} frames; the blocks cover {blocks.num_frames} "
                "(set data.num_frames)"
            )
        uncond = None
        if self.negative_embed is not None:
            uncond = self.negative_embed.to(cond)[None].expand(b, *self.negative_embed.shape)
        student = models["student"]
        noise = lambda: torch.randn(x0.shape, generator=g, device=g.device, dtype=torch.float32).to(x0.device)
        out: dict[str, Closure] = {}
        if ctx.phase == "critic":
            fake = self._bidir(models["fake_score"])

            def critic():
                with torch.no_grad():
                    G = self.rollout(student, x0, cond, ctx, with_grad=False)[0].x0
                return fake_score_objective(G, self.p_d(b, generator=g).to(x0.device), noise(), fake, cond)

            return {"critic": critic}
        dev = lambda t: t.to(x0.device)
        if cfg.flow != "none":

            def flow():
                tf = cfg.flow == "tf"
                t = dev(
                    sample_block_times(
                        self.p_d, b, blocks, generator=g, strategy="same" if tf else cfg.block_times
                    )
                )
                t[:, :given] = 0.0  # given frames: clean, no loss
                if tf:
                    vel = teacher_forcing_velocity(
                        tf_velocity(student, blocks, x0)[0], x0, given_frames=given, **self.dtypes
                    )
                    return flow_matching_objective(
                        vel,
                        x0[:, :, given:],
                        noise()[:, :, given:],
                        t[:, given:],
                        cond,
                        weighting="bell",
                        loss_scale=cfg.loss_scale,
                        **self.dtypes,
                    )
                return flow_matching_objective(
                    df_velocity(student, blocks, x0),
                    x0,
                    noise(),
                    t,
                    cond,
                    weighting="none",
                    loss_scale=cfg.loss_scale,
                    **self.dtypes,
                )

            out["flow"] = flow
        if cfg.cm in ("dcm", "dscm"):

            def tf_dcm():
                times = dev(
                    sample_block_dcm_times(
                        b,
                        blocks,
                        generator=g,
                        total_steps=cfg.dcm_total_steps,
                        skip_steps=cfg.dcm_skip_steps,
                        shift=cfg.dcm_shift,
                        strategy=cfg.block_times,
                    )
                )
                eps = noise()
                return tf_dcm_objective(
                    tf_velocity(student, blocks, x0)[0],
                    tf_velocity(models["causal_teacher"], blocks, x0)[0],
                    x0,
                    eps,
                    times,
                    cond,
                    uncond,
                    student_context_time=self._context_time(x0),
                    context_eps=noise(),  # fresh, as the rollout's context noise
                    given_frames=given,
                    guidance=cfg.cm_guidance,
                    loss_scale=cfg.loss_scale,
                    **self.dtypes,
                )

            out["tf_dcm"] = tf_dcm
        if cfg.cm in ("scm", "dscm"):

            def tf_scm():
                t = dev(sample_block_times(self.p_g, b, blocks, generator=g, strategy=cfg.block_times))
                eps = noise()
                vel, jvp = tf_velocity(student, blocks, x0)
                return tf_scm_objective(
                    vel,
                    tf_velocity(models["causal_teacher"], blocks, x0)[0],
                    x0,
                    eps,
                    t,
                    cond,
                    uncond,
                    student_packed_jvp=jvp,
                    student_context_time=self._context_time(x0),
                    context_eps=noise(),  # fresh, as the rollout's context noise
                    given_frames=given,
                    guidance=cfg.cm_guidance,
                    r=tangent_warmup_ratio(ctx.iteration, ctx.schedule.tangent_warmup),
                    loss_scale=cfg.loss_scale,
                    **self.dtypes,
                )

            out["tf_scm"] = tf_scm
        if cfg.ode:

            def ode():
                with torch.no_grad():
                    traj, times = self.ode_trajectory(models["teacher"], noise(), cond, uncond)
                den = TrigFlowAdapter(df_velocity(student, blocks, x0), **self.dtypes)
                return ode_regression_objective(
                    den, traj, times, cond, blocks, generator=g, loss_scale=cfg.loss_scale_ode
                )

            out["ode"] = ode
        if (
            cfg.dmd
            and "fake_score" in models
            and ctx.has_critic
            and ctx.iteration >= ctx.schedule.tangent_warmup
        ):

            def sf_dmd():
                return self.sf_dmd(models, x0, cond, uncond, ctx, noise)

            out["sf_dmd"] = sf_dmd
        return out


# ------------------------------------------------------------------------------------------ staged driver
ROLES = ("student", "causal_teacher", "teacher", "fake_score")
"""The networks of a causal run; each has its own architecture and first weights (docs/causal_training.md):
``student`` (trained by cm / ode / dmd stages), ``causal_teacher`` (trained by flow stages, frozen in cm
stages), ``teacher`` (the frozen bidirectional teacher: DMD real score, ODE trajectories), ``fake_score``
(the DMD critic, trained in critic iterations)."""

NetworkKind = Literal["trained", "ema", "frozen"]


class CausalBlocksConfig(BaseModel):
    """Frame blocks of the causal model: ``[first_block_frames | frames_per_block | ...]`` latent frames."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    frames_per_block: int = Field(3, ge=1)
    """Latent frames per block (c3-3: 3; c1-1: 1; c1-4: 4 with first_block_frames=1)."""
    first_block_frames: int | None = Field(None, ge=1)
    """Frames of the first block (None: frames_per_block)."""
    i2v: bool = False
    """Causal I2V: the first block is given (the data's first block stands in for the image latent)."""

    def frame_blocks(self, num_frames: int) -> FrameBlocks:
        """The block layout over ``num_frames`` latent frames (raises unless they are whole blocks)."""
        return FrameBlocks(num_frames, self.frames_per_block, self.first_block_frames)


class CausalStageConfig(BaseModel):
    """One stage of a causal run: a :func:`rcm_train.stages.run_stage` call with a :class:`CausalRCMObjective`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = Field("stage", min_length=1)
    """Stage name (checkpoint / log sub-directory)."""
    iterations: int = Field(0, ge=0)
    """Raw iterations (student and critic together); 0 skips the stage."""
    init: Literal["teacher", "causal_teacher", "student", "previous"] = "previous"
    """Where the trained network starts: the first weights of the teacher, the causal teacher or the student
    (model.<role>), or ``previous``: the last earlier stage's result for the same network (a flow stage's
    causal teacher, a student stage's student). The source's architecture must be the trained network's."""
    objective: CausalObjectiveConfig = CausalObjectiveConfig(dmd=True)
    """What the stage trains (flow / cm / ode / dmd) and its hyper-parameters."""
    schedule: ScheduleConfig = ScheduleConfig(tangent_warmup=0, student_update_freq=6)
    """Student / critic alternation (DMD stages) and the sCM tangent warmup."""

    @property
    def trained(self) -> str:
        """Role of the network the stage trains: ``causal_teacher`` for flow stages, else ``student``."""
        return "causal_teacher" if self.objective.trains_teacher else "student"

    def frozen(self) -> list[str]:
        """Roles of the frozen networks the stage reads."""
        obj = self.objective
        return (["causal_teacher"] if obj.cm != "none" else []) + (["teacher"] if obj.ode or obj.dmd else [])


def check_causal_stages(stages: list[CausalStageConfig], arch: Mapping[str, Any], *, cp: int = 1) -> None:
    """Refuse a run that cannot work, with one line naming the stage or ``model.<role>``: no stage, repeated
    names, an ``init`` whose architecture is not the trained network's, ``previous`` before any stage trained
    that network, networks that disagree on the latent / text interface, or a context-parallel size ``cp``
    that does not divide some network's heads (Ulysses splits heads; tokens are padded, so frames do not
    matter). ``arch[role]``: the network config of each of :data:`ROLES` (compared with ``==``; fields
    ``num_heads``, ``in_dim``, ``out_dim``, ``patch_size``, ``text_dim``, ``text_len``)."""
    io = lambda a: (a.in_dim, a.out_dim, tuple(a.patch_size), a.text_dim, a.text_len)
    for role in ROLES:
        if arch[role].num_heads % cp:
            raise ValueError(f"parallel.mesh.cp={cp} must divide the {arch[role].num_heads} attention heads of "
                             f"model.{role} (Ulysses splits heads)")
        if io(arch[role]) != io(arch["teacher"]):
            raise ValueError(f"model.{role}: latent channels, patch, text_dim and text_len must be model.teacher's")
    if not stages:
        raise ValueError("no stage to run: set stage1.iterations (or stage2..4) > 0")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must differ (they name checkpoint directories), got {names}")
    trained: set[str] = set()
    for s in stages:
        if s.init == "previous" and s.trained not in trained:
            raise ValueError(f"stage {s.name!r}: init='previous' but no earlier stage trains the {s.trained}")
        if s.init != "previous" and arch[s.init] != arch[s.trained]:
            raise ValueError(f"stage {s.name!r} trains the {s.trained} but init={s.init!r} has another "
                             f"architecture (model.{s.init} vs model.{s.trained}): start it from a network of "
                             "the same size")
        trained.add(s.trained)


def first_weights_needed(stages: list[CausalStageConfig]) -> list[str]:
    """The roles whose first weights (``model.<role>``) a run of ``stages`` reads, in :data:`ROLES` order: a
    recipe checks their files before training (the driver reads each lazily, when a stage first needs it)."""
    needed, trained = set(), set()
    for s in stages:
        if s.init != "previous" and s.init not in trained:
            needed.add(s.init)
        needed.update(r for r in s.frozen() if r not in trained)
        if s.objective.dmd:
            needed.add("fake_score")
        trained.add(s.trained)
    return [r for r in ROLES if r in needed]


@dataclass
class CausalNetworks:
    """What the causal driver needs from the recipe about networks (it never names a network class).

    ``build(role, state_dict, kind)``: a network of ``role``'s architecture filled from the full state dict,
    parallelized on the run's device; ``kind`` is ``trained``, ``ema`` (the trained network's EMA copy) or
    ``frozen``. ``weights(role)``: the role's first weights (read once; errors name the config field).
    ``make_cache(net, shape, device, kv_dtype=)``: the self-forcing KV cache (a :data:`CacheFactory` once the
    stage's ``kv_dtype`` is bound). ``sample_hook(objective)``: the stage's periodic sample hook (or None)."""

    build: Callable[[str, Mapping[str, Tensor], NetworkKind], nn.Module]
    weights: Callable[[str], Mapping[str, Tensor]]
    make_cache: Callable[..., KVCache]
    sample_hook: Callable[[CausalObjectiveConfig], SampleHook | None] = lambda objective: None


class _CausalRun:
    """The driver's state across stages: the latest trained weights per role and the frozen networks."""

    def __init__(self, nets: CausalNetworks, optimizers: Mapping[str, OptimizerConfig], objective_args):
        self.nets, self.optimizers, self.objective_args = nets, optimizers, objective_args
        self.latest: dict[str, Mapping[str, Tensor]] = {}  # role -> weights of its last finished stage
        self._frozen: dict[str, tuple[int, nn.Module]] = {}

    def weights(self, role: str) -> Mapping[str, Tensor]:
        return self.latest[role] if role in self.latest else self.nets.weights(role)

    def frozen(self, role: str) -> nn.Module:
        """A frozen network, rebuilt only when its weights change (a flow stage makes a new causal teacher)."""
        sd = self.weights(role)
        if role not in self._frozen or self._frozen[role][0] != id(sd):
            self._frozen.pop(role, None)  # free the old one first
            self._frozen[role] = (id(sd), self.nets.build(role, sd, "frozen"))
        return self._frozen[role][1]

    def stage(self, sc: CausalStageConfig) -> Stage:
        obj, role = sc.objective, sc.trained

        def setup() -> StageSetup:
            for r in [r for r in self._frozen if r not in sc.frozen()]:
                del self._frozen[r]  # a frozen network this stage does not read: free it
            init = self.latest[role] if sc.init == "previous" else self.weights(sc.init)
            models = {"student": self.nets.build(role, init, "trained")}
            opts = {"student": self.optimizers[role]}
            models.update({r: self.frozen(r) for r in sc.frozen()})
            if obj.dmd:
                models["fake_score"] = self.nets.build("fake_score", self.nets.weights("fake_score"), "trained")
                opts["fake_score"] = self.optimizers["fake_score"]
            optimizers = {k: build_optimizer(models[k], o) for k, o in opts.items()}
            parts = TrainParts(models=models, optimizers=optimizers,
                               schedulers={k: build_scheduler(o, opts[k]) for k, o in optimizers.items()},
                               ema={"student": self.nets.build(role, init, "ema")})
            objective = CausalRCMObjective(obj, make_cache=partial(self.nets.make_cache, kv_dtype=obj.kv_dtype),
                                           **self.objective_args)
            return StageSetup(parts, objective, self.nets.sample_hook(obj))

        blocks = self.objective_args["blocks"]
        return Stage(sc.name, sc.iterations, setup, schedule=sc.schedule,
                     critic_models=["fake_score"] if obj.dmd else [], describe=f"{role}, blocks {blocks.sizes}")


def run_causal_stages(stages: list[CausalStageConfig], nets: CausalNetworks, *, blocks: FrameBlocks,
                      optimizers: Mapping[str, OptimizerConfig], run: StagedRunConfig, output_dir: str | Path,
                      data: Callable[[], Iterable[Any]], given_blocks: int = 0,
                      negative_embed: Tensor | None = None, sample_every: int = 0, dp_rank: int = 0,
                      device: torch.device | None = None, run_config: Mapping[str, Any] | None = None) -> dict:
    """Run ``stages`` in order (each resumes or is skipped when finished), each starting from its ``init``;
    a stage's result becomes the ``previous`` of its network (and the frozen causal teacher of later cm
    stages). ``optimizers``: AdamW of the ``student``, ``causal_teacher`` and ``fake_score``.

    Returns ``{"stages": {name: StageResult}, "student", "student_ema", "causal_teacher"}``: the last student
    stage's exports and the last flow stage's causal teacher, published at the top of ``output_dir``."""
    state = _CausalRun(nets, optimizers, dict(blocks=blocks, given_blocks=given_blocks,
                                               negative_embed=negative_embed, seed=run.train.seed,
                                               grad_accum=run.train.grad_accum))
    results: dict[str, StageResult] = {}
    for sc in stages:
        results[sc.name] = res = run_stage(state.stage(sc), run, output_dir=output_dir, data=data,
                                           sample_every=sample_every, dp_rank=dp_rank, device=device,
                                           run_config=run_config)
        state.latest[sc.trained] = load_stage_student(res)
    final: dict[str, Path] = {}
    for sc in reversed(stages):
        exports = results[sc.name].exports
        if sc.trained == "causal_teacher":
            final.setdefault("causal_teacher", exports["student"])
        elif "student" not in final:
            final.update(student=exports["student"], student_ema=exports["student_ema"])
    return {"stages": results, **publish(final, output_dir)}
