"""The rCM objective as trainer closures over ``rcm_losses`` (docs/losses.md, consistency).

Networks come in ``models`` by name: ``student`` (with ``forward_jvp`` for sCM; without one the JVP falls
back to ``torch.func.jvp``), ``teacher``, and optionally ``fake_score``. Each is a rectified-flow velocity
network ``net(x, timestep, context)`` that :class:`rcm_losses.TrigFlowAdapter` turns into a TrigFlow
denoiser. Student iterations give the ``scm`` (or ``dcm``) closure and, after the tangent warmup and with a
fake score, the ``dmd`` closure; critic iterations give the ``critic`` closure. Every random number comes
from the step's generator (``StepContext.generator``), in the order the closures run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from rcm_losses import (
    LogNormal,
    TrigFlowAdapter,
    UniformShift,
    backward_simulation,
    dcm_objective,
    dmd_objective,
    fake_score_objective,
    scm_objective,
    simulation_steps,
    tangent_warmup_ratio,
)
from rcm_losses.timesteps import dcm_times, sample_dcm_u
from rcm_train.trainer import Closure, StepContext

__all__ = ["RCMObjectiveConfig", "RCMObjective"]

class RCMObjectiveConfig(BaseModel):
    """rCM student (sCM/dCM + DMD) and critic objectives (defaults: the 1.3B recipe, docs/recipes_distill_generate.md, distill.py)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    cm_type: Literal["scm", "dcm"] = "scm"
    """Consistency objective of the student: continuous-time sCM (JVP) or discrete-time dCM."""
    loss_scale: float = 100.0
    """Weight of the sCM/dCM loss; 0 = pure DMD."""
    loss_scale_dmd: float = 1.0
    """Weight of the DMD generator loss (used when a fake score is trained)."""
    guidance: float = 5.0
    """Teacher CFG scale (sCM tangent, dCM teacher steps, DMD real score); needs a negative embedding."""
    p_g_mean: float = 0.7
    """sCM time distribution p_G: log-sigma mean (1.3B 0.7, 14B 1.5)."""
    p_g_std: float = 1.6
    """sCM time distribution p_G: log-sigma std."""
    p_d_shift: float = 5.0
    """DMD / critic / simulation time distribution p_D = UniformShift(shift)."""
    max_simulation_steps: int = 4
    """Backward simulation steps cycle 1..this with the phase's effective iteration."""
    dmd_fix_timesteps: bool = False
    """Use backward_timesteps instead of p_D draws for the simulation's intermediate times."""
    backward_timesteps: list[float] = [1.5, 1.4, 1.0]
    """Fixed TrigFlow times of the backward simulation (with dmd_fix_timesteps)."""
    fd_type: Literal[0, 1, 2] = 0
    """sCM tangent: 0 JVP, 1 semi-continuous, 2 discrete finite difference."""
    fd_size: float = 1e-4
    """Finite-difference step for fd_type 1 and 2."""
    dcm_total_steps: int = 48
    """dCM grid size N."""
    dcm_skip_steps: int = 1
    """dCM teacher steps K per target."""
    dcm_shift: float = 5.0
    """dCM RF time shift."""
    input_dtype: Literal["bfloat16", "float32", "float64"] | None = "bfloat16"
    """Dtype of the network input c_in x_t (None: float64 as computed)."""
    timestep_dtype: Literal["bfloat16", "float32"] | None = "bfloat16"
    """Round Wan's timestep through this dtype (the reference uses bf16); None keeps it exact."""


class RCMObjective:
    """``closures(models, batch, ctx)`` for :func:`rcm_train.trainer.train_step`.

    ``batch``: ``{"latent": x0 [B, C, T, H, W], "embed": [B, L, D]}``. ``negative_embed`` ``[L, D]`` is the
    unconditional context for CFG (None: CFG is a no-op, as the reference without a negative prompt).
    """

    def __init__(self, config: RCMObjectiveConfig, *, negative_embed: Tensor | None = None):
        self.cfg = config
        self.negative_embed = negative_embed
        self.p_g = LogNormal(config.p_g_mean, config.p_g_std)
        self.p_d = UniformShift(config.p_d_shift)

    def denoiser(self, net: nn.Module) -> TrigFlowAdapter:
        cfg = self.cfg
        return TrigFlowAdapter(net, getattr(net, "forward_jvp", None),
                               input_dtype=getattr(torch, cfg.input_dtype) if cfg.input_dtype else None,
                               timestep_dtype=getattr(torch, cfg.timestep_dtype) if cfg.timestep_dtype else None)

    def _simulate(self, student, cond, shape, ctx: StepContext, with_grad: bool) -> Tensor:
        cfg = self.cfg
        n = simulation_steps(ctx.effective_iteration, cfg.max_simulation_steps)
        kw = dict(fixed=cfg.backward_timesteps) if cfg.dmd_fix_timesteps else dict(time_sampler=self.p_d)
        return backward_simulation(student, cond, shape, n_steps=n, generator=ctx.generator, with_grad=with_grad,
                                   **kw).x0

    def _noise(self, like: Tensor, g: torch.Generator) -> Tensor:
        return torch.randn(like.shape, generator=g, device=g.device, dtype=torch.float32).to(like.device)

    def closures(self, models: Mapping[str, nn.Module], batch: Mapping[str, Any], ctx: StepContext) -> dict[str, Closure]:
        cfg, g = self.cfg, ctx.generator
        x0 = batch["latent"].float()
        cond = batch["embed"]
        b = x0.shape[0]
        uncond = None
        if self.negative_embed is not None:
            uncond = self.negative_embed.to(cond)[None].expand(b, *self.negative_embed.shape)
        student, teacher = self.denoiser(models["student"]), self.denoiser(models["teacher"])
        fake = self.denoiser(models["fake_score"]) if "fake_score" in models else None
        out: dict[str, Closure] = {}
        if ctx.phase == "critic":
            if fake is None:
                raise ValueError("a critic phase needs models['fake_score']")

            def critic():
                with torch.no_grad():
                    G = self._simulate(student, cond, x0.shape, ctx, with_grad=False)
                t = self.p_d(b, generator=g)
                return fake_score_objective(G, t, self._noise(x0, g), fake, cond)

            out["critic"] = critic
            return out
        if cfg.loss_scale > 0 and cfg.cm_type == "scm":
            def scm():
                t = self.p_g(b, generator=g)
                r = tangent_warmup_ratio(ctx.iteration, ctx.schedule.tangent_warmup)
                return scm_objective(student, student.jvp, teacher, x0, self._noise(x0, g), t, cond, uncond,
                                     guidance=cfg.guidance, r=r, loss_scale=cfg.loss_scale, fd_type=cfg.fd_type,
                                     fd_size=cfg.fd_size)

            out["scm"] = scm
        elif cfg.loss_scale > 0:
            def dcm():
                u = sample_dcm_u(b, generator=g, total_steps=cfg.dcm_total_steps, skip_steps=cfg.dcm_skip_steps)
                times = dcm_times(u, total_steps=cfg.dcm_total_steps, skip_steps=cfg.dcm_skip_steps,
                                  shift=cfg.dcm_shift)
                return dcm_objective(student, teacher, x0, self._noise(x0, g), times.to(x0.device), cond, uncond,
                                     guidance=cfg.guidance, loss_scale=cfg.loss_scale)

            out["dcm"] = dcm
        if fake is not None and ctx.has_critic and ctx.iteration >= ctx.schedule.tangent_warmup \
                and cfg.loss_scale_dmd > 0:
            def dmd():
                G = self._simulate(student, cond, x0.shape, ctx, with_grad=True)
                t = self.p_d(b, generator=g)
                return dmd_objective(G, t, self._noise(x0, g), fake, teacher, cond, uncond, guidance=cfg.guidance,
                                     loss_scale=cfg.loss_scale_dmd)

            out["dmd"] = dmd
        return out
