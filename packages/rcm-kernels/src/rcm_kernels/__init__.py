"""rcm_kernels: JVP flash attention, attention seams, block masks and the KV cache."""

from . import blockmask
from .attention import Attention, SequenceShard, attention, jvp_attention
from .blockmask import block_causal, sliding_window, teacher_forcing

__all__ = ["attention", "jvp_attention", "Attention", "SequenceShard", "blockmask", "block_causal",
           "sliding_window", "teacher_forcing"]
