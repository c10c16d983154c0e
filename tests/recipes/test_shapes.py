"""Procedural shape videos and the tiny text encoder."""

import pytest
import torch

from rcm_recipes.shapes import (
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    Prompt,
    ShapesConfig,
    TinyTextEncoder,
    all_prompts,
    balanced_prompts,
    random_prompts,
    render_videos,
)


def test_grammar():
    prompts = all_prompts()
    assert len(prompts) == len(set(prompts)) == 6 * 2 * 4
    assert Prompt.parse("a red disk moving up") == Prompt("red", "disk", "up")
    assert Prompt("cyan", "square", "left").text == "a cyan square moving left"
    with pytest.raises(ValueError, match="'purple'"):
        Prompt("purple", "disk", "up")
    with pytest.raises(ValueError, match="does not match"):
        Prompt.parse("a red disk")
    assert set(balanced_prompts(48)) == set(prompts)
    first12 = balanced_prompts(12)
    assert sorted(p.color for p in first12) == sorted(list(COLORS) * 2)
    assert sorted(p.direction for p in first12) == sorted(list(DIRECTIONS) * 3)
    g = torch.Generator().manual_seed(0)
    assert all(p in prompts for p in random_prompts(20, g))


def test_videos_show_the_prompt():
    cfg = ShapesConfig(frames=8, size=16, radius=2.5, speed=1.0)
    prompts = all_prompts()
    video = render_videos(prompts, cfg, torch.Generator().manual_seed(0))
    assert video.shape == (48, 3, 8, 16, 16) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    bg = torch.tensor(BACKGROUND)
    for i, p in enumerate(prompts):
        v = video[i]  # [3, T, H, W]
        # Pixels fully covered by the shape have exactly the prompt's color (a 5x5 square / r=2.5 disk
        # has interior pixels at every sub-pixel position).
        covered = (v - torch.tensor(COLORS[p.color])[:, None, None, None]).abs().amax(0) < 1e-6  # [T, H, W]
        assert covered.flatten(1).any(1).all(), p
        # The shape never touches the border: the outer ring of every frame is background.
        ring = torch.ones(16, 16, dtype=torch.bool)
        ring[1:-1, 1:-1] = False
        assert torch.allclose(v[:, :, ring], bg[:, None, None].expand(3, 8, int(ring.sum()))), p
        # Covered-pixel centroid moves `speed` px per frame in the prompt's direction (exact up to the
        # pixel grid: one pixel of slack over the whole path).
        ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        cov = covered.double()
        cx = (cov * xs).sum((1, 2)) / cov.sum((1, 2))
        cy = (cov * ys).sum((1, 2)) / cov.sum((1, 2))
        dx, dy = DIRECTIONS[p.direction]
        assert abs((cx[-1] - cx[0]) - 7 * dx) <= 1 and abs((cy[-1] - cy[0]) - 7 * dy) <= 1, p


def test_render_is_deterministic_by_seed():
    cfg = ShapesConfig()
    p = balanced_prompts(8)
    a = render_videos(p, cfg, torch.Generator().manual_seed(3))
    b = render_videos(p, cfg, torch.Generator().manual_seed(3))
    c = render_videos(p, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_config_refuses_a_path_that_leaves_the_frame():
    with pytest.raises(ValueError, match="does not fit in 16 px"):
        ShapesConfig(frames=9, size=16, radius=3.0, speed=1.5)


def test_text_encoder():
    enc = TinyTextEncoder(dim=12, length=8, seed=1)
    e = enc(["a red disk moving up", "a blue disk moving up", ""])
    assert e.shape == (3, 8, 12)
    assert torch.equal(e[0, 5:], torch.zeros(3, 12)) and torch.equal(e[2], torch.zeros(8, 12))
    assert torch.equal(e[0, 2:5], e[1, 2:5]) and not torch.equal(e[0, 1], e[1, 1])  # words embed alone
    assert torch.equal(TinyTextEncoder(dim=12, length=8, seed=1)(["a red disk moving up"])[0], e[0])
    assert not torch.equal(TinyTextEncoder(dim=12, length=8, seed=2)(["a red disk moving up"])[0], e[0])
    with pytest.raises(ValueError, match="'purple'"):
        enc(["a purple disk moving up"])


def test_texture_scales_brightness_per_pixel():
    flat_cfg, tex_cfg = ShapesConfig(), ShapesConfig(texture=0.4)
    prompts = all_prompts()
    flat = render_videos(prompts, flat_cfg, torch.Generator().manual_seed(0))
    tex = render_videos(prompts, tex_cfg, torch.Generator().manual_seed(0))  # same positions: drawn first
    bg = torch.tensor(BACKGROUND)[None, :, None, None, None]
    inside = (flat - bg).abs().amax(1, keepdim=True) > 0  # pixels the shape covers at all
    ratio = ((tex + 1) / (flat + 1)).where(flat > -1, torch.ones(()))  # brightness factor per channel
    shade = ratio[inside.expand_as(ratio) & (flat > -1)]
    assert shade.min() >= 0.6 - 1e-6 and shade.max() <= 1 + 1e-6 and shade.std() > 0.05
    assert torch.equal(tex[~inside.expand_as(tex)], flat[~inside.expand_as(flat)])  # background untouched
    with pytest.raises(ValueError, match="texture"):
        ShapesConfig(texture=0.8)
