"""One stage of a bidirectional distillation run (rCM family or MeanFlow): its objective, critic and schedule.

:class:`DistillStageConfig` is what a recipe nests once per stage (``stage1`` / ``stage2`` / ...); the staged
driver (:mod:`rcm_train.stages`) runs it and :meth:`DistillStageConfig.objective` binds its loss. The
causal counterpart is :class:`rcm_train.objectives.causal.CausalStageConfig`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from ..trainer import ScheduleConfig
from .meanflow import MeanFlowObjective, MeanFlowObjectiveConfig
from .rcm import RCMObjective, RCMObjectiveConfig

__all__ = ["DistillStageConfig"]


class DistillStageConfig(BaseModel):
    """One training stage: objective, student/critic schedule and length."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    name: str = "rcm"
    """Stage name: checkpoint / log sub-directory."""
    iterations: int = Field(0, ge=0)
    """Raw iterations (student and critic together) of this stage; 0 skips it."""
    method: Literal["rcm", "meanflow"] = "rcm"
    """rcm: the rCM objective family (sCM / dCM + DMD) on a WanDiT student; meanflow: MeanFlow average-velocity
    distillation of a MeanFlowWanDiT student (docs/meanflow.md; fake_score must be false)."""
    fake_score: bool = True
    """Train a fake score (critic) and add the DMD loss (rCM, DMD); False: consistency loss only."""
    objective: RCMObjectiveConfig = RCMObjectiveConfig()
    """The rCM objective of this stage (cm_type, loss weights, time distributions, ...)."""
    meanflow: MeanFlowObjectiveConfig = MeanFlowObjectiveConfig()
    """The MeanFlow objective of a method=meanflow stage (time pairs, exact or finite-difference JVP, ...)."""
    schedule: ScheduleConfig = ScheduleConfig()
    """Student / critic alternation (tangent_warmup, student_update_freq)."""

    @model_validator(mode="after")
    def _check(self) -> DistillStageConfig:
        o = self.objective
        if self.method == "meanflow":
            if self.fake_score:
                raise ValueError(f"stage {self.name!r}: method=meanflow has no critic: set fake_score=false")
            return self
        if o.loss_scale == 0 and not self.fake_score:
            raise ValueError(f"stage {self.name!r} trains nothing: loss_scale=0 and fake_score=false")
        if o.loss_scale == 0 and self.schedule.tangent_warmup != 0:
            raise ValueError(f"stage {self.name!r}: pure DMD (loss_scale=0) needs schedule.tangent_warmup=0")
        if self.fake_score and o.loss_scale_dmd <= 0:
            raise ValueError(f"stage {self.name!r}: a fake score needs objective.loss_scale_dmd > 0 "
                             "(set fake_score=false for a consistency-only stage)")
        return self

    @property
    def critic_models(self) -> list[str]:
        """The networks of the critic phase (the fake score, when the stage has one)."""
        return ["fake_score"] if self.fake_score else []

    def objective_and_guidance(self, negative_embed: Tensor | None) -> tuple[RCMObjective | MeanFlowObjective,
                                                                             str | None, float]:
        """The stage's bound objective, the input dtype name of its networks and its CFG scale (what a sample
        hook of the stage needs to match the training-time teacher)."""
        if self.method == "meanflow":
            m = self.meanflow
            return MeanFlowObjective(m, negative_embed=negative_embed), m.input_dtype, m.guidance
        o = self.objective
        return RCMObjective(o, negative_embed=negative_embed), o.input_dtype, o.guidance
