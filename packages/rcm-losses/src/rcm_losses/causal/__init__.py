"""Causal (block-autoregressive) training as pure functions, one module per concern (docs/causal_training.md):

* :mod:`~rcm_losses.causal.blocks`: the frame-block layout and per-block time sampling;
* :mod:`~rcm_losses.causal.teacher_forcing`: a packed ``[context ; noisy]`` network pass seen as a velocity of
  the noisy frames;
* :mod:`~rcm_losses.causal.objectives`: teacher-forcing sCM / dCM, flow matching with per-frame times, ODE-pair
  regression;
* :mod:`~rcm_losses.causal.self_forcing`: the block-by-block student rollout with exit steps and its replayed
  backward.
"""

from rcm_losses.causal.blocks import FrameBlocks, sample_block_dcm_times, sample_block_times
from rcm_losses.causal.objectives import (
    causal_dcm_objective,
    flow_matching_objective,
    ode_regression_objective,
    tf_dcm_objective,
    tf_scm_objective,
)
from rcm_losses.causal.self_forcing import (
    BlockCommit,
    BlockDenoiser,
    SelfForcingRollout,
    cycled_exit_steps,
    replay_backward,
    replayed_video,
    sample_exit_steps,
    self_forcing_rollout,
)
from rcm_losses.causal.teacher_forcing import (
    TeacherForcingVelocity,
    network_input,
    teacher_forcing_adapter,
    teacher_forcing_velocity,
)

__all__ = [
    "FrameBlocks",
    "sample_block_times",
    "sample_block_dcm_times",
    "TeacherForcingVelocity",
    "teacher_forcing_velocity",
    "teacher_forcing_adapter",
    "tf_scm_objective",
    "tf_dcm_objective",
    "causal_dcm_objective",
    "flow_matching_objective",
    "ode_regression_objective",
    "BlockDenoiser",
    "BlockCommit",
    "SelfForcingRollout",
    "sample_exit_steps",
    "cycled_exit_steps",
    "self_forcing_rollout",
    "replayed_video",
    "replay_backward",
    "network_input",
]
