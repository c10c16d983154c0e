"""CLIPVisual: official goldens (preprocessing + penultimate features), manifest (visual.* subset), bad input.

Golden tolerance is the issue's atol = rtol = 1e-4 in float32: the official code run in float64 differs from
the float32 golden by 3.4e-6 (recorded in the JSON); using the last block, a post-norm, a wrong resize mode
or a wrong q/k/v split is O(0.1) or more.
"""

import json
import re
from pathlib import Path

import pytest
import torch
from _golden import golden_names, load_golden, tolerance

from rcm_nets.checkpoint import load_checkpoint
from rcm_nets.wan import CLIPVisual
from rcm_nets.wan.clip import visual_state_dict

MANIFESTS = Path(__file__).resolve().parents[1] / "fixtures" / "wan21" / "manifests"
NAMES = golden_names("VisionTransformer")


def _images(g) -> list[torch.Tensor]:
    """The golden's ``in.image.<i>`` inputs, in index order, as ``[3, H, W]`` (stored as ``[3, 1, H, W]``)."""
    keys = sorted((k for k in g.meta["inputs"] if re.fullmatch(r"in\.image\.\d+", k)),
                  key=lambda k: int(k.rsplit(".", 1)[1]))
    assert keys, "golden set has no in.image.<i> inputs"
    for k in keys:
        assert list(g.io[k].shape) == g.meta["inputs"][k]["shape"]
    return [g.io[k][:, 0] for k in keys]


def _model(g) -> CLIPVisual:
    with torch.device("meta"):  # the real loading path: meta build, strict load with assign=True
        m = CLIPVisual(**g.meta["constructor_kwargs"]).eval()
    load_checkpoint(m, g.weights, strict=True)
    return m


@pytest.mark.parametrize("name", NAMES)
def test_clip_matches_official_golden(name):
    g = load_golden(name)
    model, images = _model(g), _images(g)
    ref = g.io["out.features"]
    tol = tolerance(g.meta)
    with torch.no_grad():
        pixels = model.preprocess(images)
        feats = model.encode_images(images)
    if "debug.pixel_values" in g.io:
        torch.testing.assert_close(pixels, g.io["debug.pixel_values"], **tol)
    assert list(feats.shape) == g.meta["outputs"]["out.features"]["shape"]
    torch.testing.assert_close(feats, ref, **tol)
    print(f"{name}: max|err| {(feats - ref).abs().max():.2e}")


def test_list_of_images_equals_one_by_one():
    """Images of different sizes in one call equal separate calls; a batched tensor equals the list."""
    g = load_golden(NAMES[0])
    model = _model(g)
    a, b = torch.rand(3, 30, 50) * 2 - 1, torch.rand(3, 64, 40) * 2 - 1
    with torch.no_grad():
        both = model.encode_images([a, b])
        torch.testing.assert_close(both[0], model.encode_images([a])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(both[1], model.encode_images(b[None])[0], atol=1e-5, rtol=1e-5)


def _vision_kwargs(clip_kwargs: dict) -> dict:
    """The whole-CLIP constructor arguments (configs.json) mapped to the visual tower's."""
    return dict(image_size=clip_kwargs["image_size"], patch_size=clip_kwargs["patch_size"],
                dim=clip_kwargs["vision_dim"], mlp_ratio=clip_kwargs["vision_mlp_ratio"],
                out_dim=clip_kwargs["embed_dim"], num_heads=clip_kwargs["vision_heads"],
                num_layers=clip_kwargs["vision_layers"], pool_type=clip_kwargs["vision_pool"],
                pre_norm=clip_kwargs["vision_pre_norm"], post_norm=clip_kwargs["vision_post_norm"],
                activation=clip_kwargs["activation"], norm_eps=clip_kwargs["norm_eps"])


def test_manifest_visual_tower_on_meta():
    """ViT-H/14 on meta has exactly the checkpoint's ``visual.*`` keys and shapes (prefix stripped), and the
    constructor defaults are that tower; the whole-checkpoint extraction drops every textual key."""
    cfg = json.loads((MANIFESTS / "configs.json").read_text())["manifests"]["clip_xlm_roberta_vit_h_14"]
    manifest = json.loads((MANIFESTS / cfg["manifest"]).read_text())
    visual = visual_state_dict({k: torch.empty(0) for k in manifest})
    assert len(visual) == cfg["visual_num_tensors"]
    want = {k[len("visual."):]: v for k, v in manifest.items() if k.startswith("visual.")}
    assert set(visual) == set(want)
    with torch.device("meta"):
        vit, default = CLIPVisual(**_vision_kwargs(cfg["constructor_kwargs"])), CLIPVisual()
    for m in (vit, default):
        assert {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in m.state_dict().items()} == want
    assert sum(p.numel() for p in vit.parameters()) == cfg["visual_num_params"]


def test_bad_input():
    m = CLIPVisual(image_size=28, patch_size=14, dim=8, out_dim=4, num_heads=2, num_layers=2)
    with pytest.raises(ValueError, match="pixels must be \\[B, 3, 28, 28\\]"):
        m(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="RGB images"):
        m.preprocess(torch.zeros(1, 4, 20, 20))
    with pytest.raises(ValueError, match="RGB images"):
        m.preprocess([torch.zeros(1, 20, 20)])
    with pytest.raises(ValueError, match="pool_type='token'"):
        CLIPVisual(pool_type="attn_pool")
    with pytest.raises(KeyError, match="visual."):
        visual_state_dict({"textual.x": torch.zeros(1)})


def test_i2v_runs_end_to_end_from_an_image():
    """Image → CLIP features + VAE conditioning ``y`` → tiny I2V DiT: shapes line up and the output is finite.
    ``y``'s 4 mask channels are built the official way here (pixel frame 0 marked, repeated 4 times, folded
    into 4 channels per latent frame) and must equal the helper's."""
    from rcm_nets.wan import WanDiT, WanVAE

    frames, h, w = 5, 16, 32
    clip = CLIPVisual(image_size=28, dim=1280, mlp_ratio=1, num_heads=16, num_layers=2).eval()
    vae = WanVAE(dim=4).eval()
    dit = WanDiT.from_config("tiny-i2v").eval()
    dit.init_weights()
    torch.nn.init.normal_(dit.head.head.weight, std=0.1)  # the official init zeroes the head
    image = torch.rand(1, 3, 40, 50) * 2 - 1
    with torch.no_grad():
        clip_fea = clip.encode_images(image)
        y = vae.encode_image_condition(image, frames, size=(h, w))
        assert clip_fea.shape == (1, 5, 1280) and y.shape == (1, 20, 2, h // 8, w // 8)
        pixel_mask = torch.zeros(frames, h // 8, w // 8)
        pixel_mask[0] = 1
        official = torch.cat([pixel_mask[:1].repeat(4, 1, 1), pixel_mask[1:]]).view(-1, 4, h // 8, w // 8)
        torch.testing.assert_close(y[0, :4], official.transpose(0, 1), atol=0, rtol=0)
        video = torch.cat([torch.nn.functional.interpolate(image, size=(h, w), mode="bicubic")[:, :, None],
                           torch.zeros(1, 3, frames - 1, h, w)], dim=2)
        torch.testing.assert_close(y[:, 4:], vae.encode(video), atol=0, rtol=0)
        x = torch.randn(1, 16, 2, h // 8, w // 8)
        out = dit(x, torch.tensor([500]), torch.randn(1, 7, dit.config.text_dim), clip_fea=clip_fea, y=y)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().max() > 0
