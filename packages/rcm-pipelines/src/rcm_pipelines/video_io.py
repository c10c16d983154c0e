"""Video and image files of the generation recipes: sample grids written as mp4, conditioning images read.

Videos are float tensors in [-1, 1]; layouts are in the names (``videos_nbcthw``: N prompts x B samples).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from .video import write_video

__all__ = ["grid_video", "save_video", "load_image"]


def grid_video(videos_nbcthw: Tensor) -> Tensor:
    """Tile ``[N, B, C, T, H, W]`` into one video ``[C, T, N*H, B*W]`` (a row per prompt, a column per sample)."""
    if videos_nbcthw.dim() != 6:
        raise ValueError(f"expected videos [N, B, C, T, H, W], got shape {tuple(videos_nbcthw.shape)}")
    return rearrange(videos_nbcthw, "n b c t h w -> c t (n h) (b w)")


def save_video(video_cthw: Tensor, path: str | Path, *, fps: int = 16) -> Path:
    """Write ``[3, T, H, W]`` in [-1, 1] as an H.264 ``.mp4`` (imageio-ffmpeg) or a ``.gif``."""
    if video_cthw.dim() != 4 or video_cthw.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W], got shape {tuple(video_cthw.shape)}")
    frames = ((video_cthw.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return write_video(frames.permute(1, 2, 3, 0).cpu().numpy(), path, fps=fps)


def load_image(path: str | Path) -> Tensor:
    """An image file as ``[3, H, W]`` float32 in [-1, 1] (RGB; alpha dropped)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0
