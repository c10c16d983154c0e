"""Training objectives bound to modules and callables (never to a network class): each builds the closures of
one micro-batch for :func:`rcm_train.trainer.train` from ``rcm_losses`` functions.

* :mod:`~rcm_train.objectives.rcm`: rCM (sCM or dCM + DMD with a fake score) of a bidirectional student;
* :mod:`~rcm_train.objectives.causal`: Causal-rCM stages (teacher / diffusion forcing, teacher-forcing CM,
  ODE initialization, self-forcing DMD);
* :mod:`~rcm_train.objectives.flow_matching`: rectified-flow training of a velocity network;
* :mod:`~rcm_train.objectives.meanflow`: MeanFlow average-velocity training / distillation (exact JVP or FD);
* :mod:`~rcm_train.objectives.stage`: one stage of a bidirectional distillation run (objective, critic, schedule).
"""

from .causal import CausalObjectiveConfig, CausalRCMObjective
from .flow_matching import FlowMatchingConfig, FlowMatchingObjective
from .meanflow import MeanFlowObjective, MeanFlowObjectiveConfig
from .rcm import RCMObjective, RCMObjectiveConfig
from .stage import DistillStageConfig

__all__ = ["RCMObjective", "RCMObjectiveConfig", "CausalObjectiveConfig", "CausalRCMObjective",
           "FlowMatchingConfig", "FlowMatchingObjective", "MeanFlowObjective", "MeanFlowObjectiveConfig", "DistillStageConfig"]
