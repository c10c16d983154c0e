"""Attention: fused JVP flash attention (Triton on CUDA), reference math, and the network call-site seams."""

from .jvp import attention, jvp_attention
from .reference import attention_reference
from .seam import Attention, SequenceShard

__all__ = ["attention", "jvp_attention", "attention_reference", "Attention", "SequenceShard"]
