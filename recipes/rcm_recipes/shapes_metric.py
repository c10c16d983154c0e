"""Sample quality of shape videos, read back from the pixels (the CPU demo's metric).

Two numbers, both computed against held-out procedural data (`shapes.render_videos` with another seed):

* **Prompt accuracy** -- does the video show what the prompt asked for? A pixel is "foreground" in
  proportion to how far its RGB lies from the known background beyond a margin (weight
  ``relu(|x - background| - 1)``, |.| the RGB Euclidean distance; the demo colors lie 2 to 2.83 away
  from black). *Color*: the foreground-weighted mean RGB over the whole video, classified to the nearest
  color of the grammar. *Direction*: the per-frame foreground centroid, a weighted least-squares line
  through it over time, and the grammar direction with the largest dot product with that velocity.
  Chance is 1/6 for color and 1/4 for direction (on balanced prompts).
* **Frechet distance on hand-made features** (FD) -- is the set of videos distributed like real ones?
  Each video gives the 16 `FEATURES` (color, foreground area and its stability over time, centroid
  position, velocity and the straightness of its path, shape extent, blur as the share of partially
  covered pixels, brightness detail inside the shape (texture), background cleanliness, edge energy,
  pixel spread). Features are standardized by the reference set's mean and standard deviation, the
  latter floored at a per-feature resolution (`_SCALE_FLOOR`, so features that are constant in clean
  data, like the background level, give finite distances), then
  ``FD = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` as in FID. Two real sets of 96 videos
  score 0.2-0.5 (finite-sample noise), a 3x3 box blur of real videos ~10, uniform noise ~5000.

Shape legend: N videos, C=3, T frames, H x W pixels, F features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .shapes import BACKGROUND, COLORS, DIRECTIONS, Prompt

__all__ = ["FEATURES", "evaluate", "frechet_distance", "prompt_accuracy", "read_back", "video_features"]

FEATURES: tuple[str, ...] = (
    "color_r", "color_g", "color_b",
    "area", "area_std",
    "centroid_x", "centroid_y",
    "velocity_x", "velocity_y", "path_residual",
    "extent",
    "partial_coverage",
    "texture",
    "background_level",
    "edge_energy",
    "pixel_std",
)  # fmt: skip
"""Names of the columns of `video_features`."""

_MARGIN = 1.0  # RGB distance from the background below which a pixel counts as background
_EPS = 1e-6
# Smallest standard deviation used to standardize each feature, in the feature's own units: the size of a
# difference that matters (real data has almost no spread in some features, e.g. its paths are exactly
# straight and its background exactly black, and would otherwise turn invisible differences into huge FDs).
_SCALE_FLOOR: dict[str, float] = {
    "color_r": 0.1, "color_g": 0.1, "color_b": 0.1,  # RGB in [-1, 1]
    "area": 0.01, "area_std": 0.01,  # foreground weight per pixel
    "centroid_x": 0.02, "centroid_y": 0.02,  # fraction of the frame
    "velocity_x": 0.1, "velocity_y": 0.1,  # pixels per frame
    "path_residual": 0.25, "extent": 0.1,  # pixels
    "partial_coverage": 0.01, "texture": 0.01, "background_level": 0.02, "edge_energy": 0.01, "pixel_std": 0.02,
}  # fmt: skip


def _foreground(video_ncthw: torch.Tensor) -> torch.Tensor:
    """Foreground weight per pixel, `[N, T, H, W]`, float64."""
    if video_ncthw.ndim != 5 or video_ncthw.shape[1] != 3:
        raise ValueError(f"expected videos [N, 3, T, H, W], got {tuple(video_ncthw.shape)}")
    bg = torch.tensor(BACKGROUND, dtype=torch.float64)[None, :, None, None, None]
    dist = (video_ncthw.double() - bg).norm(dim=1)
    return (dist - _MARGIN).clamp_min(0.0)


def _centroids(w_nthw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame foreground centroid `[N, T, 2]` (x, y in pixels) and mass `[N, T]`."""
    _, _, h, w = w_nthw.shape
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    xs = torch.arange(w, dtype=torch.float64)[None, :]
    mass = w_nthw.sum((-2, -1))
    cx = (w_nthw * xs).sum((-2, -1)) / (mass + _EPS)
    cy = (w_nthw * ys).sum((-2, -1)) / (mass + _EPS)
    return torch.stack([cx, cy], -1), mass


def _velocity(c_nt2: torch.Tensor, mass_nt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass-weighted least-squares slope `[N, 2]` (pixels/frame) and RMS residual `[N]` of the centroid path."""
    t = torch.arange(c_nt2.shape[1], dtype=torch.float64)[None, :, None]
    m = mass_nt[..., None] + _EPS
    t_mean = (m * t).sum(1, keepdim=True) / m.sum(1, keepdim=True)
    c_mean = (m * c_nt2).sum(1, keepdim=True) / m.sum(1, keepdim=True)
    slope = (m * (t - t_mean) * (c_nt2 - c_mean)).sum(1) / (m * (t - t_mean) ** 2).sum(1)
    fit = c_mean + (t - t_mean) * slope[:, None, :]
    resid = ((m * (c_nt2 - fit) ** 2).sum((1, 2)) / m.sum((1, 2))).sqrt()
    return slope, resid


def read_back(video_ncthw: torch.Tensor) -> tuple[list[str], list[str]]:
    """The color word and direction word each video shows (see the module docstring)."""
    w = _foreground(video_ncthw)
    mean_rgb = (video_ncthw.double() * w[:, None]).sum((2, 3, 4)) / (w.sum((1, 2, 3))[:, None] + _EPS)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float64)  # [6, 3]
    color_idx = torch.cdist(mean_rgb, palette).argmin(1)
    slope, _ = _velocity(*_centroids(w))
    dirs = torch.tensor(list(DIRECTIONS.values()), dtype=torch.float64)  # [4, 2]
    dir_idx = (slope @ dirs.T).argmax(1)
    colors, directions = list(COLORS), list(DIRECTIONS)
    return [colors[i] for i in color_idx.tolist()], [directions[i] for i in dir_idx.tolist()]


def prompt_accuracy(video_ncthw: torch.Tensor, prompts: Sequence[Prompt]) -> dict[str, float]:
    """Fractions of videos whose read-back color, direction, and both match their prompt."""
    if len(prompts) != video_ncthw.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {video_ncthw.shape[0]} videos")
    colors, directions = read_back(video_ncthw)
    ok_c = np.array([c == p.color for c, p in zip(colors, prompts)])
    ok_d = np.array([d == p.direction for d, p in zip(directions, prompts)])
    return {
        "color_accuracy": float(ok_c.mean()),
        "direction_accuracy": float(ok_d.mean()),
        "prompt_accuracy": float((ok_c & ok_d).mean()),
    }


def video_features(video_ncthw: torch.Tensor) -> np.ndarray:
    """Hand-made features `[N, F]` (float64, columns named by `FEATURES`) of videos in [-1, 1]."""
    x = video_ncthw.double()
    n, _, t, h, w_ = x.shape
    w = _foreground(x)
    mass_nt = w.sum((-2, -1))
    total = mass_nt.sum(1) + _EPS
    mean_rgb = (x * w[:, None]).sum((2, 3, 4)) / total[:, None]
    area = mass_nt / (h * w_)  # [N, T] foreground weight per pixel
    c, _ = _centroids(w)
    slope, resid = _velocity(c, mass_nt)
    c_mean = (mass_nt[..., None] * c).sum(1) / total[:, None]
    ys = torch.arange(h, dtype=torch.float64)[:, None]
    xs = torch.arange(w_, dtype=torch.float64)[None, :]
    d2 = (xs - c[..., 0, None, None]) ** 2 + (ys - c[..., 1, None, None]) ** 2  # [N, T, H, W]
    extent = ((w * d2).sum((1, 2, 3)) / total).sqrt()
    # Coverage of each pixel relative to the video's own color: 0 background, 1 fully covered; blur makes
    # many pixels partial, sharp shapes only their anti-aliased rim. 4a(1-a) peaks at a = 1/2.
    full = _foreground(mean_rgb[:, :, None, None, None]) + _EPS  # [N, 1, 1, 1]
    a = (w / full).clamp(0, 1)
    partial = (4 * a * (1 - a)).mean((1, 2, 3))
    # Texture: RMS of brightness minus its 3x3 local mean, over the shape's interior (pixels whose 5x5
    # neighbourhood is all foreground): 0 inside a flat shape, high for sparkle, low once it is blurred.
    bright = (w + _MARGIN) * (w > 0)  # [N, T, H, W] RGB distance from the background
    inner = -F.max_pool3d(-(w > 0).double()[:, None], (1, 5, 5), 1, (0, 2, 2))[:, 0]
    local = F.avg_pool3d(bright[:, None], (1, 3, 3), 1, (0, 1, 1), count_include_pad=False)[:, 0]
    texture = (((bright - local) ** 2 * inner).sum((1, 2, 3)) / (inner.sum((1, 2, 3)) + _EPS)).sqrt()
    bg = torch.tensor(BACKGROUND, dtype=torch.float64)[None, :, None, None, None]
    is_bg = (w == 0).double()
    bg_level = ((x - bg).abs().mean(1) * is_bg).sum((1, 2, 3)) / (is_bg.sum((1, 2, 3)) + _EPS)
    edges = (x.diff(dim=-1).abs().mean((1, 2, 3, 4)) + x.diff(dim=-2).abs().mean((1, 2, 3, 4))) / 2
    feats = torch.stack(
        [
            *mean_rgb.T,
            area.mean(1), area.std(1),
            c_mean[:, 0] / w_, c_mean[:, 1] / h,
            slope[:, 0], slope[:, 1], resid,
            extent,
            partial,
            texture,
            bg_level,
            edges,
            x.reshape(n, -1).std(1),
        ],
        1,
    )  # fmt: skip
    return feats.numpy()


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((a + a.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(feats: np.ndarray, ref_feats: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to `feats` `[N, F]` and `ref_feats` `[M, F]`, after
    standardizing both by the reference's per-feature mean and std (for `FEATURES` columns the std is floored
    at `_SCALE_FLOOR`; other widths use the plain std), so FD has no units.

    ``tr (S_a S_b)^(1/2)`` is computed as ``tr (S_b^(1/2) S_a S_b^(1/2))^(1/2)`` with symmetric
    eigendecompositions (the two agree; the second is a PSD matrix, so no complex round-off).
    """
    if feats.ndim != 2 or ref_feats.ndim != 2 or feats.shape[1] != ref_feats.shape[1]:
        raise ValueError(f"feature arrays must be [N, F] with equal F, got {feats.shape} and {ref_feats.shape}")
    if min(len(feats), len(ref_feats)) < 2:
        raise ValueError("need at least two samples on each side")
    # A floor on the scale keeps features that are (nearly) constant in the reference, such as the
    # background level of clean videos, from turning tiny differences into huge distances.
    floor = np.array([_SCALE_FLOOR[f] for f in FEATURES]) if feats.shape[1] == len(FEATURES) else 0.0
    mu, sd = ref_feats.mean(0), np.maximum(ref_feats.std(0), floor) + 1e-12
    a, b = (feats - mu) / sd, (ref_feats - mu) / sd
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_b = _sqrtm_psd(s_b)
    cross = np.trace(_sqrtm_psd(root_b @ s_a @ root_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


def evaluate(
    video_ncthw: torch.Tensor, prompts: Sequence[Prompt], ref_video_ncthw: torch.Tensor
) -> dict[str, float]:
    """Prompt accuracies of `video_ncthw` and its feature FD to the held-out `ref_video_ncthw`."""
    out = prompt_accuracy(video_ncthw, prompts)
    out["frechet_distance"] = frechet_distance(video_features(video_ncthw), video_features(ref_video_ncthw))
    return out
