"""Fused DiT elementwise/norm ops (Triton on CUDA, reference twins elsewhere), each with an optional tangent.

Every op returns ``(primal, tangent | None)`` and computes both in one pass; ``None`` tangents mean zero and
cost nothing. The primal is differentiable (backward: Triton kernels after a Triton forward, see
:mod:`._dispatch`). Precision follows the Wan DiT (docs/kernels.md, fused ops).
"""

from .gated_residual import gated_residual
from .gelu import gelu_tanh
from .modulate_norm import layer_norm_modulate
from .rms_norm import rms_norm_rope
from .rope import apply_rope

__all__ = ["layer_norm_modulate", "gated_residual", "rms_norm_rope", "apply_rope", "gelu_tanh"]
