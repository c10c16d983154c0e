"""A WanDiT for pixel videos with a learned absolute position map added to its input.

WanDiT knows positions only through RoPE, i.e. only relative offsets between tokens. In the demo's data a
prompt's direction also fixes where the shape is in each frame (moving right: left side first), which a
relative-only network learns slowly (measured: a teacher without it had not learned direction after 4000
iterations). `PositionalDiT` adds a learned ``[C, T, H, W]`` map to the network input, initialized to
coordinate ramps (x in channel 0, y in channel 1, time in channel 2, each from -scale to +scale); through
the linear patch embedding this is exactly a learned absolute position embedding of the tokens. The map is constant, so
the JVP tangent of the input is unchanged and `forward_jvp` is WanDiT's hand-written JVP path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rcm_nets.wan import WanDiT, get_config

from .config import RecipeConfig

__all__ = ["PositionalDiT", "NetConfig", "build_pixel_dit"]


class NetConfig(RecipeConfig):
    """The tiny pixel-space WanDiT shared by the demo's teacher, student and fake score (official field names)."""

    dim: int = 64
    """Hidden width."""
    ffn_dim: int = 256
    """Feed-forward width."""
    num_heads: int = 4
    """Attention heads."""
    num_layers: int = 4
    """Transformer blocks."""
    patch_size: tuple[int, int, int] = (1, 4, 4)
    """Patch (t, h, w) of the patch embedding; frames and frame size must be divisible by it."""
    freq_dim: int = 64
    """Width of the sinusoidal timestep embedding."""
    absolute_position: float | None = 0.5
    """Add a learned absolute position map to the input, initialized to coordinate ramps of this
    amplitude (WanDiT itself has only relative RoPE positions); None: the plain WanDiT."""


def build_pixel_dit(cfg: NetConfig, *, text_dim: int, text_len: int, frames: int, size: int, seed: int) -> nn.Module:
    """The tiny pixel-space WanDiT for ``frames`` x ``size`` x ``size`` videos, initialized from ``seed``
    (wrapped in :class:`PositionalDiT` when ``cfg.absolute_position`` is set)."""
    wan = get_config("tiny-pixel", dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
                     num_layers=cfg.num_layers, patch_size=cfg.patch_size, freq_dim=cfg.freq_dim,
                     text_dim=text_dim, text_len=text_len)
    net = WanDiT(wan)
    net.init_weights(torch.Generator().manual_seed(seed))
    if cfg.absolute_position is not None:
        return PositionalDiT(net, frames, size, size, scale=cfg.absolute_position)
    return net


class PositionalDiT(nn.Module):
    """``dit(x + position, t, context)`` with a learned ``position [C, T, H, W]`` (coordinate ramps of
    amplitude `scale` initially; ``scale=0`` starts from zeros, i.e. the plain WanDiT).

    Same call signatures as `WanDiT.forward` / `WanDiT.forward_jvp` for t2v (``x [B, C, T, H, W]``).
    """

    def __init__(self, dit: nn.Module, frames: int, height: int, width: int, *, scale: float = 0.5):
        super().__init__()
        self.dit = dit
        c = dit.config.in_dim
        ramps = [torch.linspace(-scale, scale, n) for n in (width, height, frames)]
        position = torch.zeros(c, frames, height, width)
        position[0] += ramps[0][None, None, :]
        position[1 % c] += ramps[1][None, :, None]
        position[2 % c] += ramps[2][:, None, None]
        self.position = nn.Parameter(position)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, **kw) -> Tensor:
        """``kw`` goes to the wrapped network (e.g. ``r=`` of a MeanFlow DiT)."""
        return self.dit(x + self.position.to(x.dtype), t, context, **kw)

    def forward_jvp(self, x: Tensor, t: Tensor, context: Tensor, tx: Tensor | None,
                    tt: Tensor | None, **kw) -> tuple[Tensor, Tensor]:
        return self.dit.forward_jvp(x + self.position.to(x.dtype), t, context, tx, tt, **kw)
