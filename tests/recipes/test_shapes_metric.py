"""The demo's sample-quality metric: prompt accuracy read back from pixels and a feature FD."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rcm_recipes.shapes import Prompt, ShapesConfig, balanced_prompts, render_videos
from rcm_recipes.shapes_metric import FEATURES, evaluate, frechet_distance, read_back, video_features

N = 96  # a multiple of 12: colors and directions are balanced, so chance is exactly 1/6 and 1/4


@pytest.fixture(scope="module")
def data():
    cfg = ShapesConfig()
    prompts = balanced_prompts(N)
    real = render_videos(prompts, cfg, torch.Generator().manual_seed(1))
    ref = render_videos(balanced_prompts(N), cfg, torch.Generator().manual_seed(2))
    return prompts, real, ref


def test_real_videos_score_perfectly(data):
    prompts, real, ref = data
    m = evaluate(real, prompts, ref)
    assert m["color_accuracy"] == m["direction_accuracy"] == m["prompt_accuracy"] == 1.0
    # Two independent real sets differ only by finite-sample noise (measured ~0.13 for N=96).
    assert m["frechet_distance"] < 1.0


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_noise_scores_near_chance_and_far(data, kind):
    prompts, real, ref = data
    g = torch.Generator().manual_seed(7)
    noise = torch.rand(real.shape, generator=g) * 2 - 1 if kind == "uniform" else torch.randn(real.shape, generator=g).clamp(-1, 1)
    m = evaluate(noise, prompts, ref)
    # Chance is 1/6 and 1/4; with 96 samples a binomial standard error is ~0.04, so allow 0.12.
    assert m["color_accuracy"] < 1 / 6 + 0.12
    assert m["direction_accuracy"] < 1 / 4 + 0.12
    assert m["frechet_distance"] > 100.0


def test_degradations_are_ordered(data):
    """Blurring, freezing and averaging move the features away from real data step by step."""
    prompts, real, ref = data
    fd_real = evaluate(real, prompts, ref)["frechet_distance"]
    blurred = F.avg_pool3d(real, (1, 3, 3), 1, (0, 1, 1), count_include_pad=False)
    frozen = real[:, :, :1].expand_as(real).contiguous()
    average = real.mean(0, keepdim=True).expand_as(real).contiguous()
    m_blur, m_frozen, m_avg = (evaluate(v, prompts, ref) for v in (blurred, frozen, average))
    assert m_blur["prompt_accuracy"] == 1.0 and m_blur["frechet_distance"] > 3 * fd_real + 1
    assert m_frozen["color_accuracy"] == 1.0 and m_frozen["direction_accuracy"] < 0.4
    assert m_avg["frechet_distance"] > 10 * m_blur["frechet_distance"]


def test_texture_is_measured_and_read_back_survives_it():
    prompts = balanced_prompts(N)
    flat = render_videos(prompts, ShapesConfig(radius=3.5, frames=5, speed=1.5), torch.Generator().manual_seed(1))
    cfg = ShapesConfig(radius=3.5, frames=5, speed=1.5, texture=0.4)
    tex, ref = (render_videos(prompts, cfg, torch.Generator().manual_seed(s)) for s in (1, 2))
    k = FEATURES.index("texture")
    assert video_features(flat)[:, k].max() < 0.05 < video_features(tex)[:, k].min()
    m_tex, m_flat = evaluate(tex, prompts, ref), evaluate(flat, prompts, ref)
    assert m_tex["prompt_accuracy"] == 1.0 and m_tex["frechet_distance"] < 1.0
    assert m_flat["prompt_accuracy"] == 1.0 and m_flat["frechet_distance"] > 10.0  # lost detail is seen


def test_read_back_detects_wrong_prompts(data):
    prompts, real, _ = data
    colors, directions = read_back(real)
    assert colors == [p.color for p in prompts] and directions == [p.direction for p in prompts]
    flipped = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong = [Prompt(p.color, p.shape, flipped[p.direction]) for p in prompts]
    assert evaluate(real, wrong, real)["direction_accuracy"] == 0.0


def test_features_shape():
    v = render_videos(balanced_prompts(4), ShapesConfig(), torch.Generator().manual_seed(0))
    f = video_features(v)
    assert f.shape == (4, len(FEATURES)) and np.isfinite(f).all()
    with pytest.raises(ValueError, match=r"\[N, 3, T, H, W\]"):
        video_features(v[:, :2])


def test_frechet_distance_closed_form():
    """Against the Gaussian closed form in standardized units: diagonal covariances give
    |mu_a - mu_b|^2 + sum (s_a - s_b)^2 with s the standard deviations."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4000, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    assert frechet_distance(ref, ref) == pytest.approx(0.0, abs=1e-6)
    # Map ref by a known affine transform: in units of ref's std, feature k is scaled by a_k and shifted
    # by b_k (in ref std units), so FD = sum b_k^2 + sum (a_k - 1)^2 * var_k, var_k = 1 after standardizing.
    a, b = np.array([2.0, 0.5, 1.0]), np.array([1.0, 0.0, -3.0])
    mu, sd = ref.mean(0), ref.std(0)
    other = mu + (ref - mu) * a + b * sd
    expected = (b**2).sum() + ((a - 1) ** 2).sum() * (len(ref) / (len(ref) - 1))  # np.cov is unbiased
    assert frechet_distance(other, ref) == pytest.approx(expected, rel=1e-6)
    # A correlated case against the definition computed another way: tr (S_a S_b)^(1/2) as the sum of
    # square roots of the (real, positive) eigenvalues of the non-symmetric product S_a S_b.
    mix = rng.standard_normal((3, 3))
    other = ref @ mix + 0.3
    za, zb = (other - mu) / sd, (ref - mu) / sd
    s_a, s_b = np.cov(za, rowvar=False), np.cov(zb, rowvar=False)
    cross = np.sqrt(np.linalg.eigvals(s_a @ s_b).real).sum()
    expected = ((za.mean(0) - zb.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    assert frechet_distance(other, ref) == pytest.approx(expected, rel=1e-8)
