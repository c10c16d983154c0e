"""Video files of the VBench harness: each mp4 appears complete or not at all (vbench lists the folder)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from ..video import save_video

__all__ = ["write_video_atomic"]


def write_video_atomic(video_cthw: Tensor, path: Path, tmp_dir: Path, *, fps: int) -> Path:
    """Write the mp4 to ``tmp_dir`` (same file system, outside the videos folder vbench lists), then rename it
    into place: ``path`` either does not exist or holds a complete video."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{os.getpid()}-{abs(hash(path.name)):x}.mp4"
    save_video(video_cthw, tmp, fps=fps)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    return path
