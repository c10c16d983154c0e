"""The distillation loop of docs/train.md, training loop as small functions.

* Phase schedule: raw iteration ``it`` decides student vs critic; the *effective* counters count the
  updates each phase has had and drive the EMA decay and the simulation-step cycle.
* :func:`train_step` is a function of ``(models, batches, optimizers, objective, ctx)``: the objective
  returns named closures, each closure runs its forward and the trainer its own backward (so the
  activations of two closures are never alive together), gradients accumulate over closures and
  micro-batches, then the losses and gradient norms are checked (``on_nonfinite``: stop with
  :class:`~rcm_train.safety.NonFiniteError`, or skip the update, at most ``max_skips`` times), optional
  clipping and one optimizer step.
* Optimizers are torch ``AdamW`` (fused on CUDA, foreach elsewhere) over float32 parameters: keep stored
  parameters float32 and compute in bf16 through FSDP2's ``MixedPrecisionPolicy`` (``parallelize``), so the
  stored parameters are the master weights and nothing has to be copied by hand.
* :func:`train` is the loop: iterations, LR schedulers, EMA, logging, sampling hook, checkpoints, resume.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from rcm_losses.ema import ema_beta, ema_update_
from rcm_train.safety import NonFiniteError, check_finite_module

log = logging.getLogger(__name__)

__all__ = [
    "ScheduleConfig", "OptimizerConfig", "TrainConfig", "StepContext", "Objective", "Closure", "TrainParts",
    "TrainState", "NonFiniteError", "TrainingInterrupted", "is_student_phase", "effective_iteration", "effective_iteration_critic", "build_optimizer",
    "build_scheduler", "seeded_generator", "step_generator", "sanitize_grads_", "update_ema_", "train_step", "run_iteration", "train",
    "check_parameters",
]

Phase = Literal["student", "critic"]
Closure = Callable[[], tuple[Tensor, Mapping[str, Tensor]]]
"""Runs one forward and returns ``(loss, diagnostics)``; the trainer backpropagates ``loss.sum()``."""


# ------------------------------------------------------------------------------------------ configs
class ScheduleConfig(BaseModel):
    """Student / critic alternation (docs/train.md, training loop)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    tangent_warmup: int = Field(0, ge=0)
    """Iterations of pure student (sCM) training before critic phases start (also the sCM tangent ramp)."""
    student_update_freq: int = Field(5, ge=1)
    """After the warmup, one student iteration every this many iterations; the others are critic ones."""


class OptimizerConfig(BaseModel):
    """AdamW and its linear LR warmup (one per trained network; docs/train.md, training loop)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    lr: float = Field(2e-6, gt=0, allow_inf_nan=False)
    """Peak learning rate (1.3B student 2e-6, fake score 4e-7)."""
    betas: tuple[float, float] = (0.0, 0.999)
    """Adam betas; beta1 = 0 (no momentum) as in the reference."""
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    """Decoupled weight decay, applied to every parameter (norms and biases included, as the reference)."""
    eps: float = Field(1e-8, gt=0, allow_inf_nan=False)
    """Adam epsilon."""
    warmup_steps: int = Field(100, ge=0)
    """Steps of this optimizer over which the LR multiplier rises linearly from warmup_start to 1."""
    warmup_start: float = Field(1e-6, ge=0, le=1)
    """LR multiplier at step 0."""
    implementation: Literal["auto", "fused", "foreach"] = "auto"
    """torch AdamW kernel: auto = fused when every parameter is on CUDA, foreach otherwise."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {v}")
        return v


class TrainConfig(BaseModel):
    """The training loop."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    max_iter: int = Field(100_000, ge=0)
    """Total (raw) iterations, student and critic together."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step (each closure's loss is divided by this)."""
    clip_norm: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Clip the gradient norm to this (None: only compute it for logging, as the reference default)."""
    seed: int = 0
    """Seed of the per-step noise generators (and of global RNGs, offset by rank)."""
    ema_rate: float | None = Field(0.1, ge=0, lt=1)
    """Power-EMA rate (EDM2 sigma_rel) of the EMA copies; None disables EMA updates."""
    ema_iteration_shift: int = 0
    """Added to the effective iteration before computing the EMA decay."""
    schedule: ScheduleConfig = ScheduleConfig()
    """Student / critic alternation."""
    student_models: list[str] = ["student"]
    """Networks stepped in student iterations (their optimizers, schedulers and EMAs)."""
    critic_models: list[str] = ["fake_score"]
    """Networks stepped in critic iterations; without them every iteration is a student one."""
    checkpoint_every: int = Field(1000, ge=0)
    """Save a checkpoint every this many iterations (and at the end); 0 disables periodic saves."""
    sample_every: int = Field(0, ge=0)
    """Call the sampling hook every this many iterations; 0 disables it."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss or gradient norm: stop (raise NonFiniteError naming iteration, network and quantity;
    the last finite checkpoint stays latest) or skip the update (no optimizer, scheduler or EMA step)."""
    max_skips: int = Field(10, ge=0)
    """With on_nonfinite=skip: stop once this many updates of this process have been skipped."""
    param_check_every: int = Field(100, ge=0)
    """Check the trained networks' parameters for NaN/inf every this many iterations (0: only before saves)."""


# ------------------------------------------------------------------------------------------ schedule
def is_student_phase(iteration: int, schedule: ScheduleConfig, has_critic: bool) -> bool:
    """True for student iterations: always without a critic, during the warmup, and every
    ``student_update_freq``-th iteration after it."""
    w, f = schedule.tangent_warmup, schedule.student_update_freq
    return not has_critic or iteration < w or (iteration - w) % f == 0


def effective_iteration(iteration: int, schedule: ScheduleConfig, has_critic: bool) -> int:
    """Number of student updates before ``iteration`` (drives the EMA decay and the DMD step cycle)."""
    w, f = schedule.tangent_warmup, schedule.student_update_freq
    if not has_critic or iteration < w:
        return iteration
    return w + (iteration - w) // f


def effective_iteration_critic(iteration: int, schedule: ScheduleConfig, has_critic: bool) -> int:
    """Number of critic updates before ``iteration`` (meaningful in critic iterations)."""
    return iteration - effective_iteration(iteration, schedule, has_critic) - 1


# ------------------------------------------------------------------------------------------ optimizers
def build_optimizer(module: nn.Module, config: OptimizerConfig) -> AdamW:
    """torch AdamW over the trainable parameters of ``module`` (one group; decay on all of them).

    Raises if a trainable parameter is bf16/fp16: low-precision compute belongs in FSDP2's mixed precision
    policy, the stored (float32) parameters are the optimizer's master weights.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(module).__name__} has no trainable parameters")
    low = sorted({str(p.dtype) for p in params if p.dtype in (torch.bfloat16, torch.float16)})
    if low:
        raise TypeError(f"trainable parameters must be float32 master weights, found {low}: keep parameters "
                        "float32 and compute in bf16 with parallelize(..., ParallelConfig(param_dtype='bfloat16'))")
    impl = config.implementation
    if impl == "auto":
        impl = "fused" if all(p.device.type == "cuda" for p in params) else "foreach"
    return AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay,
                 fused=impl == "fused" or None, foreach=impl == "foreach" or None)


@dataclass
class LinearWarmup:
    """LR multiplier: ``start + (1 - start) * step / steps`` for ``step < steps``, then 1."""

    steps: int
    start: float

    def __call__(self, step: int) -> float:
        if step >= self.steps:
            return 1.0
        return self.start + (1.0 - self.start) * step / self.steps


def build_scheduler(optimizer: Optimizer, config: OptimizerConfig) -> LambdaLR:
    """Linear warmup over this optimizer's own steps (each scheduler steps only with its optimizer)."""
    return LambdaLR(optimizer, LinearWarmup(config.warmup_steps, config.warmup_start))


# ------------------------------------------------------------------------------------------ step
@dataclass(frozen=True)
class StepContext:
    """What an objective needs to know about the current step."""

    phase: Phase
    iteration: int
    """Raw iteration (student and critic together)."""
    effective_iteration: int
    """Updates this phase has had before (student: eff(it); critic: eff_fake(it))."""
    schedule: ScheduleConfig
    generator: torch.Generator
    """Draw every random number of the step from this (identical on the ranks of a CP group)."""
    micro_step: int = 0
    has_critic: bool = False


class Objective(Protocol):
    """Builds the closures of one micro-batch: ``{name: closure}``; each returns ``(loss, diagnostics)``."""

    def closures(self, models: Mapping[str, nn.Module], batch: Any, ctx: StepContext) -> Mapping[str, Closure]: ...


def seeded_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from integer ``keys`` through numpy's ``SeedSequence`` (well-mixed, reproducible):
    the one way rcm derives a random stream from a seed and stream ids."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def step_generator(seed: int, iteration: int, micro_step: int, dp_rank: int,
                   device: torch.device | str = "cpu") -> torch.Generator:
    """The step's generator, seeded from ``(seed, iteration, micro_step, dp_rank)``: reproducible after resume
    and equal on all context-parallel ranks that share a data-parallel rank (no broadcast needed)."""
    return seeded_generator(seed, iteration, micro_step, dp_rank, device=device)


@torch.no_grad()
def sanitize_grads_(params: Sequence[Tensor], clip_norm: float | None) -> Tensor:
    """Replace NaN/±inf in gradients by 0, then clip the total norm to ``clip_norm`` (None: no clipping).

    Returns the total norm (after sanitizing, before clipping) as a plain tensor.
    """
    with_grad = [p for p in params if p.grad is not None]
    for p in with_grad:
        torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    if not with_grad:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(with_grad, math.inf if clip_norm is None else clip_norm, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@torch.no_grad()
def update_ema_(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """``ema <- beta ema + (1 - beta) model`` over parameters (``rcm_losses.ema.ema_update_``); buffers copied."""
    ema_update_(ema.parameters(), model.parameters(), beta)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


@torch.no_grad()
def _total_grad_norm(params: Sequence[Tensor]) -> Tensor:
    """The total 2-norm of the gradients (NaN/inf when any gradient is), reduced over ranks for DTensors."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _set_grad_sync(models: Iterable[nn.Module], enabled: bool) -> None:
    for m in models:
        if hasattr(m, "set_requires_gradient_sync"):  # FSDP2 module: skip reduce-scatter until the last micro-batch
            m.set_requires_gradient_sync(enabled)


def train_step(models: Mapping[str, nn.Module], batches: Sequence[Any], optimizers: Mapping[str, Optimizer],
               objective: Objective, ctx: StepContext, *, clip_norm: float | None = None,
               make_generator: Callable[[int], torch.Generator] | None = None) -> dict[str, float]:
    """One optimizer step of the networks in ``optimizers`` (keyed like ``models``) over ``batches``.

    For each micro-batch ``i`` the objective's closures run in order, each followed by
    ``(loss.sum() / len(batches)).backward()``. Then the total gradient norm of every optimizer is computed
    and, in one host sync, the losses and norms are checked: a NaN/inf raises :class:`NonFiniteError`
    (naming the iteration, the network or closure and the quantity) before any optimizer steps (gradients are
    dropped). Otherwise the gradients are clipped (``clip_norm``) and every optimizer steps.
    ``make_generator(i)`` gives micro-batch ``i`` its generator (default: the context's for all). Returns
    ``{closure/loss, closure/<diag>, grad_norm/<name>, nan_masked, nan_checked}`` as floats, where
    ``nan_masked`` counts the samples the losses masked to 0 for a NaN (their ``nan`` diagnostic) out of
    ``nan_checked``.
    """
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    trained = [models[n] for n in optimizers]
    sums: dict[str, Tensor] = {}  # detached scalars; one host sync at the end
    n = len(batches)
    for i, batch in enumerate(batches):
        _set_grad_sync(trained, i == n - 1)
        gen = make_generator(i) if make_generator is not None else ctx.generator
        step_ctx = dataclasses.replace(ctx, generator=gen, micro_step=i)
        for name, closure in objective.closures(models, batch, step_ctx).items():
            loss, diag = closure()
            (loss.sum() / n).backward()
            for k, v in {"loss": loss, **diag}.items():
                if k == "nan":
                    sums["nan_masked"] = sums.get("nan_masked", 0.0) + v.detach().double().sum()
                    sums["nan_checked"] = sums.get("nan_checked", 0.0) + torch.tensor(float(v.numel()))
                v = v.detach().double().mean() / n
                sums[f"{name}/{k}"] = sums.get(f"{name}/{k}", 0.0) + v
    params = {name: [p for group in opt.param_groups for p in group["params"]] for name, opt in optimizers.items()}
    for name in optimizers:
        sums[f"grad_norm/{name}"] = _total_grad_norm(params[name])
    if not sums:
        return {}
    dev = next(iter(sums.values())).device
    metrics = dict(zip(sums, torch.stack([v.detach().double().to(dev).reshape(()) for v in sums.values()]).tolist()))
    checked = [k for k in metrics if k.endswith("/loss") or k.startswith("grad_norm/")]
    bad = next((k for k in checked if not math.isfinite(metrics[k])), None)
    if bad is not None:
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        network = bad.removeprefix("grad_norm/") if bad.startswith("grad_norm/") else None
        quantity = "the gradient norm" if network else f"the loss {bad!r}"
        raise NonFiniteError(f"{quantity} ({metrics[bad]})", network=network or ",".join(optimizers),
                             iteration=ctx.iteration)
    for name, opt in optimizers.items():
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params[name] if p.grad is not None], clip_norm, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return metrics


# ------------------------------------------------------------------------------------------ loop
@dataclass
class TrainParts:
    """Everything the loop trains or reads. ``optimizers``, ``schedulers`` and ``ema`` are keyed by the name
    of the network in ``models`` they belong to (e.g. ``student``, ``fake_score``); ``models`` also holds
    frozen networks (``teacher``)."""

    models: dict[str, nn.Module]
    optimizers: dict[str, Optimizer]
    schedulers: dict[str, LRScheduler] = field(default_factory=dict)
    ema: dict[str, nn.Module] = field(default_factory=dict)

    def checkpoint_state(self) -> dict[str, Any]:
        """Stateful parts by checkpoint key: ``<name>``, ``<name>_ema``, ``<name>_optim``, ``<name>_sched``
        for every trained network (frozen ones are not saved)."""
        from rcm_train.checkpoint import ModelState, OptimizerState

        state: dict[str, Any] = {}
        for name, opt in self.optimizers.items():
            state[name] = ModelState(self.models[name])
            state[f"{name}_optim"] = OptimizerState(self.models[name], opt)
            if name in self.schedulers:
                state[f"{name}_sched"] = self.schedulers[name]
        for name, ema in self.ema.items():
            state[f"{name}_ema"] = ModelState(ema)
        return state


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _python_rng_bytes() -> Tensor:
    """``random.getstate()`` as uint8: 625 uint32 words (MT state + position), then the cached gauss as
    float64 (NaN for none)."""
    version, words, gauss = random.getstate()
    assert version == 3, version
    raw = np.array(words, np.uint32).tobytes() + np.array([np.nan if gauss is None else gauss]).tobytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def _set_python_rng(t: Tensor) -> None:
    raw = t.numpy().tobytes()
    words = tuple(int(w) for w in np.frombuffer(raw[:625 * 4], np.uint32))
    gauss = float(np.frombuffer(raw[625 * 4:], np.float64)[0])
    random.setstate((3, words, None if math.isnan(gauss) else gauss))


def _numpy_rng_bytes() -> Tensor:
    """``np.random.get_state()`` (MT19937) as uint8: 624 uint32 words, then pos, has_gauss (int64) and the
    cached gaussian (float64)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    assert name == "MT19937", name
    raw = np.asarray(keys, np.uint32).tobytes() + np.array([pos, has_gauss], np.int64).tobytes() \
        + np.array([cached], np.float64).tobytes()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def _set_numpy_rng(t: Tensor) -> None:
    raw = t.numpy().tobytes()
    keys = np.frombuffer(raw[:624 * 4], np.uint32).copy()
    pos, has_gauss = (int(x) for x in np.frombuffer(raw[624 * 4:624 * 4 + 16], np.int64))
    cached = float(np.frombuffer(raw[624 * 4 + 16:], np.float64)[0])
    np.random.set_state(("MT19937", keys, pos, has_gauss, cached))


@dataclass
class TrainState:
    """Iteration counter and this rank's global RNG states (python, numpy, torch CPU/CUDA); a DCP Stateful.

    RNG states are stored as uint8 tensors (never pickled objects) under a per-rank key, so each rank resumes
    its own stream; CUDA: the current device's state (each rank draws on its own device; ``[0]`` without CUDA).
    """

    iteration: int = 0

    def state_dict(self) -> dict[str, Any]:
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)
        rng = {"python": _python_rng_bytes(), "numpy": _numpy_rng_bytes(), "torch": torch.get_rng_state(),
               "cuda": cuda}
        return {"iteration": self.iteration, f"rng_rank{_rank()}": rng}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        rng = state[f"rng_rank{_rank()}"]
        if not isinstance(rng, Mapping) or not all(isinstance(v, Tensor) for v in rng.values()):
            raise TypeError("trainer RNG state must be uint8 tensors (a checkpoint from an older rcm_train?)")
        _set_python_rng(rng["python"])
        _set_numpy_rng(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"].numel() and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`; the message says which checkpoint a resume will use."""


def run_iteration(parts: TrainParts, objective: Objective, batches: Sequence[Any], iteration: int,
                  config: TrainConfig, *, dp_rank: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:
    """One raw iteration: pick the phase, :func:`train_step` its networks, step their LR schedulers and,
    in student phases, their EMAs with decay ``beta(eff(it) + shift)``."""
    has_critic = all(n in parts.optimizers for n in config.critic_models) and bool(config.critic_models)
    student = is_student_phase(iteration, config.schedule, has_critic)
    names = config.student_models if student else config.critic_models
    eff = (effective_iteration if student else effective_iteration_critic)(iteration, config.schedule, has_critic)
    make_gen = lambda i: step_generator(config.seed, iteration, i, dp_rank, device)
    ctx = StepContext("student" if student else "critic", iteration, eff, config.schedule, make_gen(0),
                      has_critic=has_critic)
    metrics = train_step(parts.models, batches, {n: parts.optimizers[n] for n in names}, objective, ctx,
                         clip_norm=config.clip_norm, make_generator=make_gen)
    for n in names:
        if n in parts.schedulers:
            parts.schedulers[n].step()
            metrics[f"lr/{n}"] = parts.schedulers[n].get_last_lr()[0]
    if student and config.ema_rate is not None:
        beta = ema_beta(eff + config.ema_iteration_shift, config.ema_rate)
        for n in names:
            if n in parts.ema:
                update_ema_(parts.ema[n], parts.models[n], beta)
        metrics["ema_beta"] = beta
    metrics["phase_student"] = float(student)
    return metrics


SampleHook = Callable[[int, Mapping[str, nn.Module]], Mapping[str, Tensor] | None]
"""``(iteration, models_and_emas) -> {name: image/video tensor}`` to be logged as files (or None)."""


def train(parts: TrainParts, objective: Objective, data: Iterable[Any], config: TrainConfig, *,
          checkpointer=None, logger=None, sample_hook: SampleHook | None = None, dp_rank: int = 0,
          device: torch.device | str = "cpu", state: TrainState | None = None) -> TrainState:
    """Run iterations ``state.iteration .. config.max_iter - 1``.

    ``data`` yields batches (``grad_accum`` per iteration; an object with ``state_dict`` is checkpointed as
    the data position). ``checkpointer`` (:class:`rcm_train.checkpoint.Checkpointer`): resumes from its
    latest checkpoint if there is one, saves every ``checkpoint_every`` iterations and at the end.
    ``logger`` (:class:`rcm_train.logging.MetricsLogger`) receives metrics and sampled media.

    A NaN/inf loss, gradient norm or parameter raises :class:`NonFiniteError` (``on_nonfinite="stop"``; no
    checkpoint is written after it, so ``latest`` stays the last finite one) or skips that update
    (``"skip"``, at most ``max_skips``). Ctrl-C finishes or abandons a pending save and raises
    :class:`TrainingInterrupted` naming the checkpoint a resume will use.
    """
    state = state or TrainState()
    ckpt_state = {**parts.checkpoint_state(), "trainer": state}
    if hasattr(data, "state_dict"):
        ckpt_state["data"] = data
    with_logger = hasattr(logger, "state_dict")  # MetricsLogger: the wandb run id, so a resume continues that run
    if checkpointer is not None and checkpointer.latest() is not None:
        loaded = dict(ckpt_state)
        if with_logger and "logger" in _saved_parts(checkpointer.latest()):  # older checkpoints have none
            loaded["logger"] = logger
        checkpointer.load(loaded)
    if with_logger:
        ckpt_state["logger"] = logger
    it_data: Iterator[Any] = iter(data)
    if logger is not None:
        logger.start(state.iteration, config.max_iter)
    skips = 0
    try:
        while state.iteration < config.max_iter:
            it = state.iteration
            if sample_hook is not None and config.sample_every and it % config.sample_every == 0:
                media = sample_hook(it, {**parts.models, **{f"{k}_ema": v for k, v in parts.ema.items()}})
                if logger is not None and media:
                    logger.log_media(it, media)
            batches = [next(it_data) for _ in range(config.grad_accum)]
            try:
                metrics = run_iteration(parts, objective, batches, it, config, dp_rank=dp_rank, device=device)
            except NonFiniteError as e:
                if config.on_nonfinite == "stop":
                    raise
                skips += 1
                if skips > config.max_skips:
                    raise NonFiniteError(f"{e.quantity}, after {config.max_skips} skipped updates (max_skips)",
                                         network=e.network, iteration=e.iteration) from e
                log.warning("skipping the update of iteration %d (%d/%d skips): %s", it, skips, config.max_skips, e)
                metrics = {"skipped_update": 1.0}
            state.iteration = it + 1
            if config.param_check_every and state.iteration % config.param_check_every == 0:
                check_parameters(parts, state.iteration)
            if logger is not None:
                logger.log(state.iteration, metrics)
            if checkpointer is not None and config.checkpoint_every and state.iteration % config.checkpoint_every == 0:
                checkpointer.save(state.iteration, ckpt_state)
        if checkpointer is not None:
            checkpointer.wait()  # an async save of the last iteration counts as done once finished
            if checkpointer.latest_iteration() != state.iteration:
                checkpointer.save(state.iteration, ckpt_state)
                checkpointer.wait()
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted):
            raise
        where = checkpointer.interrupted() if checkpointer is not None else "no checkpointer: nothing saved"
        raise TrainingInterrupted(f"interrupted at iteration {state.iteration}; {where}") from None
    finally:
        if logger is not None:
            logger.close()
    return state


def _saved_parts(checkpoint) -> set[str]:
    """Top-level part names of a DCP checkpoint (``{"logger"}`` when unreadable: the load names the problem)."""
    from rcm_train.safety import SafeFileSystemReader

    try:
        return {k.split(".", 1)[0] for k in SafeFileSystemReader(checkpoint).read_metadata().state_dict_metadata}
    except Exception:
        return {"logger"}


def check_parameters(parts: TrainParts, iteration: int | None = None) -> None:
    """Raise :class:`NonFiniteError` if a trained network or an EMA holds a NaN/inf parameter (collective)."""
    for name in parts.optimizers:
        check_finite_module(parts.models[name], name, iteration=iteration)
    for name, ema in parts.ema.items():
        check_finite_module(ema, f"{name}_ema", iteration=iteration)
