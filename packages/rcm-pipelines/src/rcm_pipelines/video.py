"""Video and image files: the one [-1, 1] -> uint8 conversion, the one mp4 / gif writer (whole videos or frames
appended as they stream), labelled video grids, conditioning images, loss-curve PNGs and metrics JSON.

Videos are float tensors in [-1, 1] (layouts in the names: ``video_cthw``, ``videos_nbcthw``); frames go out as
uint8 ``[T, H, W, 3]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

__all__ = ["to_uint8", "write_video", "VideoWriter", "read_video", "save_video", "grid_video", "video_grid",
           "load_image", "plot_curves", "write_json"]

_PAD = 2  # pixels of border between cells
_TEXT = (235, 235, 235)
_BORDER = (48, 48, 48)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 of the same layout (clamped, ``round((x + 1) * 127.5)``); uint8 passes through."""
    if video.dtype == torch.uint8:
        return video
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _frames(video_ncthw: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats ``[N, 3, T, H, W]`` -> uint8 ``[N, T, H, W, 3]``."""
    return to_uint8(video_ncthw).permute(0, 2, 3, 4, 1).cpu().numpy()


def _text_image(text: str, width: int, height: int, font: ImageFont.ImageFont) -> np.ndarray:
    img = Image.new("RGB", (width, height), _BORDER)
    draw = ImageDraw.Draw(img)
    lines = text.split("\n")
    line_h = height // max(len(lines), 1)
    for i, line in enumerate(lines):
        w = draw.textlength(line, font=font)
        draw.text(((width - w) / 2, i * line_h + (line_h - 10) / 2), line, fill=_TEXT, font=font)
    return np.asarray(img)


def video_grid(
    rows: Mapping[str, torch.Tensor],
    *,
    column_labels: Sequence[str] | None = None,
    scale: int = 4,
    label_width: int = 96,
) -> np.ndarray:
    """One video `[T, H, W, 3]` uint8 of a grid: a row per entry of `rows` (label at the left), a column
    per sample. Every entry is `[N, 3, T, H, W]` in [-1, 1] with the same N, T, H, W; cells are upscaled
    `scale` times (nearest). `column_labels` (N strings, `\\n` splits lines) go in a header row.
    """
    if not rows:
        raise ValueError("video_grid needs at least one row")
    shapes = {tuple(v.shape) for v in rows.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 5:
        raise ValueError(f"all rows must be [N, 3, T, H, W] of one shape, got {sorted(shapes)}")
    n, _, t, h, w = next(iter(shapes))
    if column_labels is not None and len(column_labels) != n:
        raise ValueError(f"{len(column_labels)} column labels for {n} columns")
    font = ImageFont.load_default()
    ch, cw = h * scale, w * scale
    header = 28 if column_labels is not None else 0
    grid = np.empty((t, header + len(rows) * (ch + _PAD) + _PAD, label_width + n * (cw + _PAD) + _PAD, 3), np.uint8)
    grid[:] = _BORDER
    for j, label in enumerate(column_labels or []):
        x0 = label_width + _PAD + j * (cw + _PAD)
        grid[:, :header, x0 : x0 + cw] = _text_image(label, cw, header, font)
    for i, (name, video) in enumerate(rows.items()):
        y0 = header + _PAD + i * (ch + _PAD)
        grid[:, y0 : y0 + ch, :label_width] = _text_image(name, label_width, ch, font)
        cells = _frames(video).repeat(scale, axis=2).repeat(scale, axis=3)  # [N, T, ch, cw, 3]
        for j in range(n):
            x0 = label_width + _PAD + j * (cw + _PAD)
            grid[:, y0 : y0 + ch, x0 : x0 + cw] = cells[j]
    return grid


class VideoWriter:
    """An ``.mp4`` written frame by frame as a video streams in (H.264 through imageio-ffmpeg; each frame is
    padded to a multiple of 16 pixels, which the codec needs). Use as a context manager or call ``close``."""

    def __init__(self, path: str | Path, *, fps: int = 16):
        import imageio.v2 as imageio  # the v3 API writes whole arrays only

        self.path = Path(path)
        if self.path.suffix != ".mp4":
            raise ValueError(f"video path '{self.path}' must end in .mp4")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = imageio.get_writer(self.path, format="FFMPEG", mode="I", fps=fps, codec="libx264",
                                          quality=8, macro_block_size=16)
        self.frames = 0

    def append(self, frames_thwc: np.ndarray | Tensor) -> None:
        """Append uint8 frames ``[T, H, W, 3]``, or a float video ``[3, T, H, W]`` in [-1, 1]."""
        if isinstance(frames_thwc, Tensor):
            if frames_thwc.dtype != torch.uint8:
                frames_thwc = to_uint8(frames_thwc).permute(1, 2, 3, 0)
            frames_thwc = frames_thwc.cpu().numpy()
        if frames_thwc.dtype != np.uint8 or frames_thwc.ndim != 4 or frames_thwc.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames_thwc.dtype} {frames_thwc.shape}")
        _, h, w, _ = frames_thwc.shape
        padded = np.pad(frames_thwc, ((0, 0), (0, -h % 16), (0, -w % 16), (0, 0)), constant_values=_BORDER[0])
        for frame in padded:
            self._writer.append_data(frame)
        self.frames += len(padded)

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(frames_thwc: np.ndarray, path: str | Path, *, fps: int = 4) -> Path:
    """Write uint8 frames ``[T, H, W, 3]`` as ``.mp4`` (:class:`VideoWriter`) or ``.gif`` (looping)."""
    path = Path(path)
    if frames_thwc.dtype != np.uint8 or frames_thwc.ndim != 4 or frames_thwc.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames_thwc.dtype} {frames_thwc.shape}")
    if path.suffix == ".mp4":
        with VideoWriter(path, fps=fps) as writer:
            writer.append(frames_thwc)
    elif path.suffix == ".gif":
        path.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, frames_thwc, plugin="pillow", duration=1000 / fps, loop=0)
    else:
        raise ValueError(f"video path '{path}' must end in .mp4 or .gif")
    return path


def read_video(path: str | Path) -> np.ndarray:
    """Frames `[T, H, W, 3]` uint8 of an `.mp4` or `.gif` written by `write_video`."""
    path = Path(path)
    if path.suffix == ".mp4":
        return iio.imread(path, plugin="FFMPEG")
    frames = iio.imread(path, plugin="pillow", index=None, mode="RGB")
    return frames if frames.ndim == 4 else frames[None]


def plot_curves(
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: str | Path,
    *,
    log_y: bool = True,
    smooth: float = 0.9,
) -> Path:
    """A PNG with one panel per entry of `panels` (`{panel: {series: (steps, values)}}`), each series drawn
    raw (faint) and as an exponential moving average with factor `smooth`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = min(len(panels), 4) or 1
    nrows = math.ceil(len(panels) / cols) or 1
    fig = Figure(figsize=(4.5 * cols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (title, series) in enumerate(panels.items()):
        ax = fig.add_subplot(nrows, cols, k + 1)
        for name, (steps, values) in series.items():
            v = np.asarray(values, dtype=float)
            ema = np.empty_like(v)
            for i, x in enumerate(v):
                ema[i] = x if i == 0 else smooth * ema[i - 1] + (1 - smooth) * x
            (line,) = ax.plot(steps, ema, label=name)
            ax.plot(steps, v, color=line.get_color(), alpha=0.25, linewidth=0.8)
        if log_y and all(np.all(np.asarray(v, dtype=float) > 0) for _, v in series.values()):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write `data` as indented JSON (NaN/inf are refused: they are not JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    return path


def grid_video(videos_nbcthw: Tensor) -> Tensor:
    """Tile ``[N, B, C, T, H, W]`` into one video ``[C, T, N*H, B*W]`` (a row per prompt, a column per sample)."""
    if videos_nbcthw.dim() != 6:
        raise ValueError(f"expected videos [N, B, C, T, H, W], got shape {tuple(videos_nbcthw.shape)}")
    return rearrange(videos_nbcthw, "n b c t h w -> c t (n h) (b w)")


def save_video(video_cthw: Tensor, path: str | Path, *, fps: int = 16) -> Path:
    """Write ``[3, T, H, W]`` in [-1, 1] as an H.264 ``.mp4`` (imageio-ffmpeg) or a ``.gif``."""
    if video_cthw.dim() != 4 or video_cthw.shape[0] != 3:
        raise ValueError(f"expected a video [3, T, H, W], got shape {tuple(video_cthw.shape)}")
    return write_video(to_uint8(video_cthw).permute(1, 2, 3, 0).cpu().numpy(), path, fps=fps)


def load_image(path: str | Path) -> Tensor:
    """An image file as ``[3, H, W]`` float32 in [-1, 1] (RGB; alpha dropped)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0
