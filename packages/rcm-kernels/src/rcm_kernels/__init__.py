"""rcm_kernels: JVP flash attention, attention seams, block masks and the KV cache."""

from . import blockmask
from .attention import Attention, SequenceShard, attention, jvp_attention
from .attention.cache_attention import cache_attention
from .blockmask import block_causal, sliding_window, teacher_forcing
from .kv_cache import CacheBlock, CacheLayer, CrossAttentionCache, KVCache

__all__ = ["attention", "jvp_attention", "Attention", "SequenceShard", "blockmask", "block_causal",
           "sliding_window", "teacher_forcing", "KVCache", "CacheLayer", "CacheBlock", "CrossAttentionCache",
           "cache_attention"]
