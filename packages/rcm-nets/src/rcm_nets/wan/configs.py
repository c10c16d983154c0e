"""Named Wan2.1 DiT configurations.

Field names follow the official ``WanModel`` constructor, so an official ``config.json`` (or a golden
fixture's ``constructor_kwargs``) builds the same network: ``WanConfig.from_official(d)``. ``precision`` is
ours: it picks the numerics of the rCM teacher or student (docs/nets.md, precision) and changes no parameter.

Named configs (``get_config(name, **overrides)``):

=============  =====  =====  ======  ======  =====  =====  ===========================================
name           type   in     dim     ffn     heads  layers notes
=============  =====  =====  ======  ======  =====  =====  ===========================================
t2v-1.3B       t2v    16     1536    8960    12     30     Wan2.1-T2V-1.3B
t2v-14B        t2v    16     5120    13824   40     40     Wan2.1-T2V-14B
i2v-14B        i2v    36     5120    13824   40     40     Wan2.1-I2V-14B-480P / -720P
tiny           t2v    16     64      128     4      2      tests (text_dim 32, text_len 16, freq_dim 32)
tiny-i2v       i2v    36     64      128     4      2      tests (text_len 512 as the official i2v needs)
tiny-pixel     t2v    3      64      256     4      4      CPU demo on pixels (out_dim 3, text_dim 32)
=============  =====  =====  ======  ======  =====  =====  ===========================================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

__all__ = ["WanConfig", "get_config", "CONFIG_NAMES"]


class WanConfig(BaseModel):
    """Constructor arguments of the Wan2.1 DiT (official names) plus our ``precision`` switch."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    dim: int
    """Hidden width D."""
    ffn_dim: int
    """Hidden width of the feed-forward network."""
    num_heads: int
    """Attention heads; head dim = dim / num_heads."""
    num_layers: int
    """Number of transformer blocks."""
    model_type: Literal["t2v", "i2v"] = "t2v"
    """'t2v' (text only) or 'i2v' (CLIP image tokens through img_emb + y channels concatenated to x)."""
    patch_size: tuple[int, int, int] = (1, 2, 2)
    """Patch size (t, h, w) of the Conv3d patch embedding."""
    text_len: int = 512
    """Text context rows; shorter contexts are zero-padded to it before text_embedding."""
    in_dim: int = 16
    """Input channels of the patch embedding (x channels, plus y channels for i2v)."""
    freq_dim: int = 256
    """Width of the sinusoidal timestep embedding."""
    text_dim: int = 4096
    """Width of the text encoder output (umT5-xxl: 4096)."""
    out_dim: int = 16
    """Output channels."""
    window_size: tuple[int, int] = (-1, -1)
    """Local attention window; only (-1, -1) (global attention, every released model) is supported."""
    qk_norm: bool = True
    """RMSNorm on q and k (over the full dim) in self- and cross-attention."""
    cross_attn_norm: bool = True
    """Affine LayerNorm (norm3) in front of the cross-attention."""
    eps: float = 1e-6
    """Epsilon of the LayerNorms and RMSNorms."""
    precision: Literal["teacher", "student"] = "teacher"
    """'teacher': FFN and residual adds in the parameter dtype (bf16 teacher / fake score); 'student': the
    rCM student's extra fp32 FFN and residual adds (docs/nets.md, precision). Identical for float32 parameters."""

    @model_validator(mode="after")
    def _check(self) -> WanConfig:
        if self.dim % self.num_heads:
            raise ValueError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.num_heads} must be even for RoPE (change num_heads)")
        if tuple(self.window_size) != (-1, -1):
            raise ValueError(f"window_size={self.window_size}: only global attention (-1, -1) is supported")
        if min(self.patch_size) < 1:
            raise ValueError(f"patch_size={self.patch_size} must be positive")
        if self.model_type == "i2v" and self.in_dim <= self.out_dim:
            raise ValueError(f"i2v needs in_dim > out_dim (x plus y channels), got in_dim={self.in_dim}")
        return self

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_official(cls, config: dict[str, Any] | str | Path, **overrides: Any) -> WanConfig:
        """Build from an official ``config.json`` (path or dict); keys starting with ``_`` are ignored."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        return cls.model_validate({**{k: v for k, v in config.items() if not k.startswith("_")}, **overrides})


_TINY = dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=32, text_dim=32, out_dim=16)

_CONFIGS: dict[str, dict[str, Any]] = {
    "t2v-1.3B": dict(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16),
    "t2v-14B": dict(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16),
    "i2v-14B": dict(model_type="i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36),
    "tiny": dict(model_type="t2v", in_dim=16, text_len=16, **_TINY),
    "tiny-i2v": dict(model_type="i2v", in_dim=36, text_len=512, **_TINY),
    "tiny-pixel": dict(model_type="t2v", in_dim=3, out_dim=3, dim=64, ffn_dim=256, num_heads=4, num_layers=4,
                       freq_dim=64, text_dim=32, text_len=16),
}

CONFIG_NAMES: tuple[str, ...] = tuple(_CONFIGS)


def get_config(name: str, **overrides: Any) -> WanConfig:
    """The named config (see the module docstring), with fields replaced by ``overrides``."""
    if name not in _CONFIGS:
        raise KeyError(f"unknown Wan config {name!r}; choose one of {list(_CONFIGS)}")
    return WanConfig.model_validate({**_CONFIGS[name], **overrides})
