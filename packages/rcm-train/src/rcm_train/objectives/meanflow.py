"""MeanFlow (average-velocity) training as an ``rcm_train`` objective over ``rcm_losses.meanflow``
(docs/meanflow.md; Geng et al., arXiv 2505.13447).

Networks come in ``models`` by name and are used only through call contracts (never a network class):

* ``student``: an average-velocity network ``net(x, timestep_t, context, r=timestep_r) -> u`` on Wan's
  ``1000·t`` scale; with ``net.forward_jvp(x, t, context, tx, tt, r=r, tr=tr) -> (u, du)`` the exact JVP
  uses it, else ``torch.func.jvp`` (``MeanFlowWanDiT`` has both).
* ``teacher`` (optional): a rectified-flow velocity network ``net(x, timestep, context) -> v``. With it the
  objective distills (the teacher's CFG velocity is ``v``); without it ``v = ε − x`` (training from data),
  optionally guided in training (``omega``, ``kappa``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from rcm_losses.meanflow import LogitNormalPair, MeanFlowAdapter, meanflow_objective

from ..trainer import Closure, StepContext

__all__ = ["MeanFlowObjectiveConfig", "MeanFlowObjective", "meanflow_adapter"]


class MeanFlowObjectiveConfig(BaseModel):
    """MeanFlow student objective (defaults: the paper's ImageNet choices where it has one)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    time_mean: float = -0.4
    """Logit-normal mean of the time pair (paper sec. 4.3)."""
    time_std: float = Field(1.0, ge=0)
    """Logit-normal std of the time pair."""
    ratio_r_neq_t: float = Field(0.25, ge=0, le=1)
    """Fraction of samples with r < t; the others have r = t (flow matching)."""
    jvp: Literal["exact", "fd"] = "exact"
    """du/dt by the exact forward-mode JVP, or by a forward finite difference (two forwards)."""
    fd_eps: float = Field(5e-3, gt=0)
    """Finite-difference step in RF time (with jvp='fd'; FastGen's value for Wan)."""
    p: float = Field(1.0, ge=0)
    """Adaptive weighting power: w = 1 / (||Δ||² + c)^p; 0 = plain L2."""
    c: float = Field(1e-3, gt=0)
    """Adaptive weighting constant."""
    reduce: Literal["mean", "sum"] = "mean"
    """||Δ||² as the mean or the sum over a sample's elements."""
    loss_scale: float = Field(1.0, gt=0)
    """Weight of the MeanFlow loss."""
    guidance: float = 5.0
    """Teacher CFG scale (distillation; needs a negative embedding, else no CFG)."""
    omega: float = 1.0
    """Guidance in training without a teacher (paper sec. 4.2): ω; 1 = no guidance."""
    kappa: float = 0.0
    """Guidance in training: κ (paper appendix); needs omega/kappa != (1, 0) to take effect."""
    input_dtype: Literal["bfloat16", "float32", "float64"] | None = "bfloat16"
    """Dtype of the networks' input latents (None: float64 as computed)."""


def meanflow_adapter(net: nn.Module, input_dtype: torch.dtype | None) -> MeanFlowAdapter:
    """A :class:`rcm_losses.meanflow.MeanFlowAdapter` over ``net``'s ``r=`` / ``forward_jvp(..., r=, tr=)`` contract."""
    fj = getattr(net, "forward_jvp", None)
    jvp = None if fj is None else (lambda x, t, r, c, tx, tt, tr: fj(x, t, c, tx, tt, r=r, tr=tr))
    return MeanFlowAdapter(lambda x, t, r, c: net(x, t, c, r=r), jvp, input_dtype=input_dtype)


class MeanFlowObjective:
    """``closures(models, batch, ctx)`` for :func:`rcm_train.trainer.train_step`: one ``meanflow`` closure.

    ``batch``: ``{"latent": x [B, C, T, H, W], "embed": [B, L, D]}``. ``negative_embed`` ``[L, D]`` is the
    unconditional context (teacher CFG, guidance in training); None: zeros for guidance in training, no CFG
    for the teacher. Noise and times are drawn from the step's generator (times first, then noise).
    """

    def __init__(self, config: MeanFlowObjectiveConfig, *, negative_embed: Tensor | None = None):
        self.cfg = config
        self.negative_embed = negative_embed
        self.pairs = LogitNormalPair(config.time_mean, config.time_std, config.ratio_r_neq_t)

    def closures(self, models: Mapping[str, nn.Module], batch: Mapping[str, Any], ctx: StepContext) -> dict[str, Closure]:
        cfg, g = self.cfg, ctx.generator
        dt = getattr(torch, cfg.input_dtype) if cfg.input_dtype else None
        x, cond = batch["latent"], batch["embed"]
        b = x.shape[0]
        student = meanflow_adapter(models["student"], dt)
        teacher_net = models.get("teacher")
        guided = cfg.omega != 1.0 or cfg.kappa != 0.0
        uncond = None
        if self.negative_embed is not None:
            uncond = self.negative_embed.to(cond)[None].expand(b, *self.negative_embed.shape)
        elif guided and teacher_net is None:
            uncond = torch.zeros_like(cond)

        def meanflow() -> tuple[Tensor, dict[str, Tensor]]:
            r, t = self.pairs(b, generator=g)
            r, t = r.to(x.device), t.to(x.device)
            eps = torch.randn(x.shape, generator=g, device=g.device, dtype=torch.float32).to(x.device)
            teacher = None if teacher_net is None else (lambda z, ts, c: teacher_net(z, ts, c))
            return meanflow_objective(student, None, x.to(torch.float64), eps.to(torch.float64), r, t, cond, uncond,
                                      teacher=teacher, guidance=cfg.guidance,
                                      omega=1.0 if teacher is not None else cfg.omega,
                                      kappa=0.0 if teacher is not None else cfg.kappa,
                                      mode=cfg.jvp, fd_eps=cfg.fd_eps, p=cfg.p, c=cfg.c, loss_scale=cfg.loss_scale,
                                      reduce=cfg.reduce, teacher_input_dtype=dt)

        return {"meanflow": meanflow}
