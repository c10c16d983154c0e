"""Procedural text-to-video data for the CPU demo: a colored shape moving in the prompted direction.

Prompts come from the grammar ``"a {color} {shape} moving {direction}"`` (6 x 2 x 4 = 48 prompts). A video
is ``[3, T, H, W]`` in [-1, 1]: one anti-aliased square or disk of the prompt's color on a black
background, starting at a random sub-pixel position and moving ``speed`` pixels per frame in the prompt's
direction, never touching the frame's outermost pixels. Everything is generated in memory from a `torch.Generator`, so a
seed fixes the data. `TinyTextEncoder` embeds prompts for the DiT's cross-attention: one fixed random
vector per word, zero-padded to a fixed length (the empty prompt is all zeros, the unconditional input).

Shape legend: N videos, C=3 channels, T frames, H x W pixels, L text tokens, D text width.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from pydantic import model_validator

from .config import RecipeConfig

__all__ = [
    "BACKGROUND",
    "COLORS",
    "DIRECTIONS",
    "SHAPES",
    "Prompt",
    "ShapesConfig",
    "TinyTextEncoder",
    "all_prompts",
    "balanced_prompts",
    "random_prompts",
    "render_videos",
    "shape_batches",
]

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "cyan": (-1.0, 1.0, 1.0),
    "magenta": (1.0, -1.0, 1.0),
}
"""RGB in [-1, 1] of each color word."""
SHAPES: tuple[str, ...] = ("square", "disk")
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
"""Unit motion (dx, dy) in pixels of each direction word; image y grows downwards."""
BACKGROUND: tuple[float, float, float] = (-1.0, -1.0, -1.0)
"""RGB of the background (black)."""


@dataclass(frozen=True)
class Prompt:
    """One sentence of the grammar, kept as its three choices."""

    color: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        for word, choices in ((self.color, COLORS), (self.shape, SHAPES), (self.direction, DIRECTIONS)):
            if word not in choices:
                raise ValueError(f"'{word}' is not one of {', '.join(choices)}")

    @property
    def text(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}"

    @classmethod
    def parse(cls, text: str) -> Prompt:
        """Inverse of `text`: 'a red disk moving up' -> Prompt('red', 'disk', 'up')."""
        words = text.split()
        if len(words) != 5 or words[0] != "a" or words[3] != "moving":
            raise ValueError(f"'{text}' does not match 'a {{color}} {{shape}} moving {{direction}}'")
        return cls(words[1], words[2], words[4])


def all_prompts() -> list[Prompt]:
    """The 48 prompts of the grammar in a fixed order (colors, then shapes, then directions)."""
    return [Prompt(c, s, d) for c, s, d in itertools.product(COLORS, SHAPES, DIRECTIONS)]


def balanced_prompts(n: int) -> list[Prompt]:
    """`n` prompts in a fixed order where every 12 consecutive ones hold each color twice and each
    direction three times, and every 48 hold all prompts of the grammar once."""
    colors, directions = list(COLORS), list(DIRECTIONS)
    # (i % 6, i % 4) visits the 12 color/direction pairs of equal parity; shifting the direction by one
    # every 12 prompts visits the other 12; the shape flips every 24.
    return [
        Prompt(colors[i % 6], SHAPES[(i // 24) % 2], directions[(i + i // 12) % 4])
        for i in range(n)
    ]


def random_prompts(n: int, generator: torch.Generator) -> list[Prompt]:
    """`n` prompts drawn uniformly from the grammar."""
    prompts = all_prompts()
    idx = torch.randint(len(prompts), (n,), generator=generator)
    return [prompts[i] for i in idx.tolist()]


class ShapesConfig(RecipeConfig):
    """The procedural videos: size, length and motion."""

    frames: int = 8
    """Frames per video (T)."""
    size: int = 16
    """Height and width of a frame in pixels."""
    radius: float = 2.5
    """Half-width of the square / radius of the disk, in pixels."""
    speed: float = 1.0
    """Pixels moved per frame."""
    texture: float = 0.0
    """Sparkle of the shape: each covered pixel's brightness is scaled by 1 - texture * u, u ~ U[0, 1)
    drawn per pixel and frame (0 = flat color). Fine detail that few-step samplers average away."""

    @model_validator(mode="after")
    def _fits(self) -> ShapesConfig:
        path = self.speed * (self.frames - 1)
        room = self.size - 2 - 2 * self.radius  # centers stay >= radius + 0.5 from the frame's edge pixels
        if not 0 <= self.texture <= 0.5:
            raise ValueError(f"shapes.texture={self.texture} must lie in [0, 0.5] (darker pixels would read as background)")
        if self.frames < 2 or self.radius <= 0 or path > room:
            raise ValueError(
                f"a shape of radius {self.radius} moving {path:g} px (speed x (frames-1)) does not fit in "
                f"{self.size} px: lower speed, frames or radius, or raise size"
            )
        return self


def render_videos(prompts: Sequence[Prompt], cfg: ShapesConfig, generator: torch.Generator) -> torch.Tensor:
    """Videos `[N, 3, T, H, W]` (float32, [-1, 1]) of `prompts`, with random start positions from `generator`.

    Coverage of a pixel is anti-aliased over one pixel: ``clamp(radius + 0.5 - d, 0, 1)`` where d is the
    Chebyshev (square) or Euclidean (disk) distance from the pixel center to the shape center.
    """
    n, t_len, size, r = len(prompts), cfg.frames, cfg.size, cfg.radius
    path = cfg.speed * (t_len - 1)
    motion = torch.tensor([DIRECTIONS[p.direction] for p in prompts])  # [N, 2] (dx, dy)
    u = torch.rand(n, 2, generator=generator)
    # Along a moving axis the start leaves `path` pixels of room ahead; across it, any position fits.
    # The outermost pixels stay background: centers keep radius + 0.5 px from them.
    lo = (r + 0.5) + torch.where(motion < 0, path, 0.0)
    hi = (size - 1.5 - r) - torch.where(motion > 0, path, 0.0)
    start = lo + u * (hi - lo)  # [N, 2]
    steps = torch.arange(t_len, dtype=torch.float32) * cfg.speed
    centers = start[:, None, :] + steps[None, :, None] * motion[:, None, :]  # [N, T, 2]
    grid = torch.arange(size, dtype=torch.float32)
    dx = grid[None, None, None, :] - centers[..., 0, None, None]  # [N, T, 1, W]
    dy = grid[None, None, :, None] - centers[..., 1, None, None]  # [N, T, H, 1]
    dist_square = torch.maximum(dx.abs(), dy.abs())
    dist_disk = torch.sqrt(dx**2 + dy**2)
    is_disk = torch.tensor([p.shape == "disk" for p in prompts])[:, None, None, None]
    alpha = (r + 0.5 - torch.where(is_disk, dist_disk, dist_square)).clamp(0.0, 1.0)  # [N, T, H, W]
    color = torch.tensor([COLORS[p.color] for p in prompts])[:, :, None, None, None]  # [N, 3, 1, 1, 1]
    bg = torch.tensor(BACKGROUND)[None, :, None, None, None]
    alpha = alpha[:, None]  # [N, 1, T, H, W]
    if cfg.texture > 0:  # scale the color's brightness in [0, 1] units, per pixel and frame
        shade = 1 - cfg.texture * torch.rand(alpha.shape, generator=generator)
        color = (color + 1) * shade - 1
    return bg * (1 - alpha) + color * alpha


class TextConfig(RecipeConfig):
    """The tiny text encoder (one fixed random vector per word)."""

    dim: int = 32
    """Embedding width (the DiT's text_dim)."""
    length: int = 8
    """Padded prompt length in words (the DiT's text_len)."""


class TinyTextEncoder:
    """Prompt embeddings `[N, L, D]`: a fixed random vector per grammar word, zero padding to `length`.

    The table is drawn from `seed` (unit-variance entries), so the same seed gives the same embeddings
    across runs. The empty string encodes to all zeros (the unconditional / negative prompt). Words outside
    the grammar raise `ValueError` naming the word.
    """

    def __init__(self, dim: int, length: int = 8, seed: int = 0):
        self.vocab = {w: i for i, w in enumerate(["a", "moving", *COLORS, *SHAPES, *DIRECTIONS])}
        self.dim, self.length = dim, length
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(self.vocab), dim, generator=g)  # [V, D]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.length, self.dim)
        for i, text in enumerate(texts):
            words = text.split()
            if len(words) > self.length:
                raise ValueError(f"prompt '{text}' has {len(words)} words, more than length={self.length}")
            for j, w in enumerate(words):
                if w not in self.vocab:
                    raise ValueError(f"word '{w}' of prompt '{text}' is not in the demo grammar")
                out[i, j] = self.table[self.vocab[w]]
        return out


def shape_batches(
    cfg: ShapesConfig, encoder: TinyTextEncoder, batch_size: int, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches ``{"latent": [B, 3, T, H, W], "embed": [B, L, D]}`` of random prompts."""
    while True:
        prompts = random_prompts(batch_size, generator)
        yield {"latent": render_videos(prompts, cfg, generator), "embed": encoder([p.text for p in prompts])}
