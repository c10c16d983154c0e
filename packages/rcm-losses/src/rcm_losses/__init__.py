"""rcm_losses: rCM objectives, rollouts and samplers as pure torch functions (docs/losses.md, parameterization).

A *denoiser* is a callable ``(x_t, t, cond) -> TrigFlowPrediction(x0, F)`` with TrigFlow time ``t [B]``;
:class:`TrigFlowAdapter` makes one from a rectified-flow velocity network (``WanDiT``). Objectives return a
per-sample loss ``[B]`` and a dict of detached diagnostics. The submodules hold the building blocks
(conversions, time samplers, tangents, time grids); docs/losses.md describes them.
"""

from rcm_losses.causal import (
    FrameBlocks,
    replayed_video,
    self_forcing_rollout,
    teacher_forcing_adapter,
    tf_dcm_objective,
    tf_scm_objective,
)
from rcm_losses.consistency import dcm_objective, scm_loss, scm_objective, tangent_warmup_ratio
from rcm_losses.dmd import dmd_loss, dmd_objective, fake_score_objective
from rcm_losses.ema import ema_beta, ema_update_
from rcm_losses.meanflow import (
    LogitNormalPair,
    MeanFlowAdapter,
    meanflow_loss,
    meanflow_objective,
    meanflow_sample,
)
from rcm_losses.parameterization import (
    TrigFlowAdapter,
    TrigFlowPrediction,
    add_noise,
    cfg_denoise,
    denoiser_jvp_via_func,
)
from rcm_losses.rollout import backward_simulation, simulation_steps
from rcm_losses.sampling import flow_euler_sample, flow_unipc_sample, rcm_sample
from rcm_losses.timesteps import LogNormal, UniformShift

__all__ = [
    "TrigFlowAdapter",
    "TrigFlowPrediction",
    "add_noise",
    "cfg_denoise",
    "denoiser_jvp_via_func",
    "LogNormal",
    "UniformShift",
    "scm_objective",
    "scm_loss",
    "dcm_objective",
    "tangent_warmup_ratio",
    "dmd_objective",
    "dmd_loss",
    "fake_score_objective",
    "backward_simulation",
    "simulation_steps",
    "rcm_sample",
    "flow_euler_sample",
    "flow_unipc_sample",
    "ema_beta",
    "ema_update_",
    "FrameBlocks",
    "teacher_forcing_adapter",
    "tf_scm_objective",
    "tf_dcm_objective",
    "self_forcing_rollout",
    "replayed_video",
    "meanflow_objective",
    "meanflow_loss",
    "meanflow_sample",
    "LogitNormalPair",
    "MeanFlowAdapter",
]
