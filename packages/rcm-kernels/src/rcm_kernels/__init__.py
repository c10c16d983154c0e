"""rcm_kernels: JVP flash attention, attention seams, block masks and the KV cache."""

from .attention import Attention, SequenceShard, attention, jvp_attention

__all__ = ["attention", "jvp_attention", "Attention", "SequenceShard"]
