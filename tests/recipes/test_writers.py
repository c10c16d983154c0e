"""Grid videos (mp4 + gif, read back), loss-curve PNGs and metrics JSON."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from rcm_pipelines.video import plot_curves, read_video, video_grid, write_json, write_video
from rcm_recipes.shapes import ShapesConfig, balanced_prompts, render_videos


@pytest.fixture(scope="module")
def videos():
    return render_videos(balanced_prompts(3), ShapesConfig(), torch.Generator().manual_seed(0))


def test_grid_layout(videos):
    grid = video_grid({"a": videos, "b": -videos}, column_labels=["x", "y", "z"], scale=2, label_width=40)
    t, h, w = 8, 16 * 2, 16 * 2
    assert grid.shape == (t, 28 + 2 * (h + 2) + 2, 40 + 3 * (w + 2) + 2, 3) and grid.dtype == np.uint8
    # Cell (row 1, column 2) holds -videos[2], upscaled by repetition.
    y0, x0 = 28 + 2 + (h + 2), 40 + 2 + 2 * (w + 2)
    cell = grid[:, y0 : y0 + h : 2, x0 : x0 + w : 2]
    expected = ((-videos[2] + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()
    np.testing.assert_array_equal(cell, expected.astype(np.uint8))
    with pytest.raises(ValueError, match="one shape"):
        video_grid({"a": videos, "b": videos[:2]})


@pytest.mark.parametrize("suffix, tol", [(".gif", 6.0), (".mp4", 6.0)])
def test_video_round_trip(tmp_path, videos, suffix, tol):
    grid = video_grid({"real": videos}, column_labels=["a", "b", "c"], scale=4)
    path = write_video(grid, tmp_path / f"grid{suffix}", fps=4)
    back = read_video(path)
    assert back.shape[0] == grid.shape[0]
    back = back[:, : grid.shape[1], : grid.shape[2]]  # the mp4 is padded to a multiple of 16
    assert back.shape == grid.shape
    # Both are lossy (H.264 4:2:0 chroma, the gif's 256-color palette): mean abs error in 0..255 units.
    assert np.abs(back.astype(float) - grid).mean() < tol


def test_curves_png(tmp_path):
    steps = list(range(50))
    path = plot_curves(
        {"teacher": {"flow matching": (steps, np.exp(-np.arange(50) / 20).tolist())},
         "student": {"sCM": (steps, [1.0] * 50), "DMD": (steps, np.linspace(-1, 1, 50).tolist())}},
        tmp_path / "loss.png",
    )
    img = iio.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300
    assert img.std() > 5  # not a blank image


def test_write_json(tmp_path):
    path = write_json({"a": {"b": 1.5}}, tmp_path / "m.json")
    assert json.loads(path.read_text()) == {"a": {"b": 1.5}}
    with pytest.raises(ValueError):
        write_json({"a": float("nan")}, tmp_path / "n.json")
