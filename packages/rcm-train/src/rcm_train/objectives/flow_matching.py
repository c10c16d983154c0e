"""Rectified-flow (flow-matching) training of a velocity network as an ``rcm_train`` objective.

The loss is :func:`rcm_losses.causal.flow_matching_objective` with one time per sample and the
mean over all elements (``loss_scale = 1 / frames``). RF times are logit-normal (``s = sigmoid(n)``,
``n ~ N(mean, std^2)``, as SD3, arXiv 2403.03206 §3.1); the text context of a sample is replaced by the
unconditional (all-zero) context with probability ``cond_dropout`` so that the network supports
classifier-free guidance (docs/train.md, "Objectives").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from rcm_losses.causal import flow_matching_objective
from rcm_losses.parameterization import rf_to_trig

from ..trainer import Closure, StepContext

__all__ = ["FlowMatchingConfig", "FlowMatchingObjective"]


class FlowMatchingConfig(BaseModel):
    """Flow-matching objective of a velocity network (e.g. a teacher trained from scratch)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    logit_mean: float = 0.0
    """Mean of the logit-normal RF time distribution."""
    logit_std: float = Field(1.0, gt=0)
    """Std of the logit-normal RF time distribution."""
    cond_dropout: float = Field(0.1, ge=0, le=1)
    """Probability of training a sample with the unconditional (zero) text context, for CFG."""


class FlowMatchingObjective:
    """``closures(models, batch, ctx)`` for ``rcm_train.train``: one ``flow`` closure training ``models[name]``.

    ``batch`` is ``{"latent": x0 [B, C, T, H, W], "embed": [B, L, D]}``; all noise, times and dropout come from
    the step's generator. The network sees inputs and times in ``x0``'s dtype.
    """

    def __init__(self, config: FlowMatchingConfig, *, name: str = "teacher"):
        self.cfg, self.name = config, name

    def closures(self, models: Mapping[str, nn.Module], batch: Mapping[str, Any], ctx: StepContext) -> dict[str, Closure]:
        net, g = models[self.name], ctx.generator
        x0, context = batch["latent"], batch["embed"]

        def flow() -> tuple[Tensor, dict[str, Tensor]]:
            b = x0.shape[0]
            eps = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
            s = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * torch.randn(b, generator=g))
            keep = (torch.rand(b, generator=g) >= self.cfg.cond_dropout).to(context.dtype)
            loss, _ = flow_matching_objective(net, x0, eps, rf_to_trig(s.double()), context * keep[:, None, None],
                                              loss_scale=1.0 / x0.shape[2], input_dtype=x0.dtype,
                                              timestep_dtype=x0.dtype)
            return loss.to(x0.dtype), {"s": s}

        return {"flow": flow}
