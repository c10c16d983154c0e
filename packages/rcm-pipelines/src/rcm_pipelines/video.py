"""Output writers of the recipes: labelled video grids (mp4 + gif), loss-curve PNGs, metrics JSON.

Videos come in as float tensors `[N, 3, T, H, W]` in [-1, 1]; frames go out as uint8 `[T, H, W, 3]`.
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
from PIL import Image, ImageDraw, ImageFont

__all__ = ["plot_curves", "read_video", "video_grid", "write_json", "write_video"]

_PAD = 2  # pixels of border between cells
_TEXT = (235, 235, 235)
_BORDER = (48, 48, 48)


def _to_uint8(video_ncthw: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats -> uint8 `[N, T, H, W, 3]`."""
    x = ((video_ncthw.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


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
        cells = _to_uint8(video).repeat(scale, axis=2).repeat(scale, axis=3)  # [N, T, ch, cw, 3]
        for j in range(n):
            x0 = label_width + _PAD + j * (cw + _PAD)
            grid[:, y0 : y0 + ch, x0 : x0 + cw] = cells[j]
    return grid


def write_video(frames_thwc: np.ndarray, path: str | Path, *, fps: int = 4) -> Path:
    """Write uint8 frames `[T, H, W, 3]` as `.mp4` (H.264 through imageio-ffmpeg; the frame is padded to
    a multiple of 16 pixels, which the codec needs) or `.gif` (looping)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames_thwc.dtype != np.uint8 or frames_thwc.ndim != 4 or frames_thwc.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames_thwc.dtype} {frames_thwc.shape}")
    if path.suffix == ".mp4":
        _, h, w, _ = frames_thwc.shape
        pad = ((0, 0), (0, -h % 16), (0, -w % 16), (0, 0))
        frames = np.pad(frames_thwc, pad, constant_values=_BORDER[0])
        iio.imwrite(path, frames, plugin="FFMPEG", fps=fps, codec="libx264", quality=8, macro_block_size=16)
    elif path.suffix == ".gif":
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
