"""Rectified-flow (flow-matching) teacher training as an `rcm_train` objective.

The Wan convention: ``x_s = (1 - s) x0 + s eps`` and the network ``net(x_s, 1000 s, context)`` predicts the
velocity ``v = eps - x0``. RF times are logit-normal (``s = sigmoid(n)``, ``n ~ N(mean, std^2)``, as SD3);
the text context of a sample is replaced by the unconditional (all-zero) context with probability
``cond_dropout`` so that the teacher supports classifier-free guidance.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from rcm_train.trainer import Closure, StepContext

from .config import RecipeConfig

__all__ = ["FlowMatchingConfig", "FlowMatchingObjective", "flow_matching_loss"]


class FlowMatchingConfig(RecipeConfig):
    """Flow-matching objective of the teacher."""

    logit_mean: float = 0.0
    """Mean of the logit-normal RF time distribution."""
    logit_std: float = 1.0
    """Std of the logit-normal RF time distribution."""
    cond_dropout: float = 0.1
    """Probability of training a sample with the unconditional (zero) text context, for CFG."""


def flow_matching_loss(net: nn.Module, x0: Tensor, eps: Tensor, s: Tensor, context: Tensor) -> Tensor:
    """Per-sample mean squared velocity error ``[B]`` of `net` at RF times `s` ``[B]``.

    `x0`, `eps` ``[B, C, T, H, W]``; `context` ``[B, L, D]``.
    """
    sb = s.to(x0.dtype)[:, None, None, None, None]
    x_s = (1 - sb) * x0 + sb * eps
    v = net(x_s, 1000.0 * s.to(x0.dtype), context)
    return (v - (eps - x0)).square().flatten(1).mean(1)


class FlowMatchingObjective:
    """`closures(models, batch, ctx)` for `rcm_train.train`: one ``flow`` closure training ``models[name]``.

    `batch` is ``{"latent": x0 [B, C, T, H, W], "embed": [B, L, D]}``; all noise, times and dropout come
    from the step's generator.
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
            loss = flow_matching_loss(net, x0, eps, s, context * keep[:, None, None])
            return loss, {"s": s}

        return {"flow": flow}
