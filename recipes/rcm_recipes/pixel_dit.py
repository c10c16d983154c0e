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

__all__ = ["PositionalDiT"]


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
