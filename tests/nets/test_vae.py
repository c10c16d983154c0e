"""WanVAE: official goldens (encode and decode), chunked cache vs whole sequence, tiling, manifest, bad input.

Golden tolerance is the issue's atol = rtol = 1e-4 in float32: the official code run in float64 differs from
its float32 goldens by ≤ 2.6e-6 (recorded in the JSON), so a correct float32 implementation lands within a
few times that, while a wrong first-frame rule or cache order is O(0.1).
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _golden import golden_names, load_golden, tolerance

from rcm_nets.checkpoint import load_checkpoint
from rcm_nets.wan import WanVAE
from rcm_nets.wan.vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD

MANIFESTS = Path(__file__).resolve().parents[1] / "fixtures" / "wan21" / "manifests"


def _golden_vae(g) -> WanVAE:
    """The golden's config and latent statistics (``in.scale_mean``, ``in.scale_inv_std``), strict load."""
    inv_std = g.io["in.scale_inv_std"].double()
    with torch.device("meta"):  # the real loading path: meta build, strict load with assign=True
        vae = WanVAE(**g.meta["constructor_kwargs"], latent_mean=g.io["in.scale_mean"].tolist(),
                     latent_std=(1.0 / inv_std).tolist())
    load_checkpoint(vae, g.weights, strict=True)
    return vae.eval()


@pytest.mark.parametrize("name", golden_names("WanVAE_"))
def test_vae_matches_official_golden(name):
    g = load_golden(name)
    vae = _golden_vae(g)
    tol = tolerance(g.meta)
    # the stored 1/std is reproduced bit-exactly (the decode divides by it, as the reference does)
    assert torch.equal(vae._latent_stats(torch.device("cpu"))[1].flatten(), g.io["in.scale_inv_std"])
    assert g.meta["cases"], "golden set has no cases"
    for case in g.meta["cases"]:
        video, latent_ref = g.io[case["video_key"]], g.io[case["latent_key"]]
        decoded_ref = g.io[case["decoded_key"]]
        assert list(video.shape) == case["video_shape"]
        with torch.no_grad():
            latent = vae.encode(video)
            # decode the *stored* latent so the decoder is tested on its own (JSON: out.decoded = decode(out.latent))
            decoded = vae.decode(latent_ref, clamp=False)  # the official module's output is unclamped
        assert list(latent.shape) == case["latent_shape"]
        assert list(decoded.shape) == case["decoded_shape"]
        torch.testing.assert_close(latent, latent_ref, **tol)
        torch.testing.assert_close(decoded, decoded_ref, **tol)
        print(f"{name} {case['video_key']}: encode max|err| {(latent - latent_ref).abs().max():.2e}, "
              f"decode max|err| {(decoded - decoded_ref).abs().max():.2e}")


def _tiny(dtype=torch.float64, seed=0) -> WanVAE:
    """A tiny released-structure VAE (dim 4) with every parameter random (the default init zeroes some)."""
    vae = WanVAE(dim=4).to(dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=dtype)
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * noise)
            elif p.ndim > 1:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return vae


def test_chunked_cache_equals_whole_sequence():
    """Chunked execution with the feature cache (1, 4, 4, ... frames in; one latent frame out at a time)
    equals running the whole sequence at once with the first-frame rules: an independent path.
    float64 so that any cache error (wrong frames kept, frame 0 leaking into upsample3d) stands far above
    rounding (1e-12); 13 frames = 4 chunks, more than the goldens use."""
    vae = _tiny()
    video = torch.rand(2, 3, 13, 16, 24, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        z_chunked, z_whole = vae.encode(video), vae.encode(video, chunked=False)
        assert z_chunked.shape == (2, 16, 4, 2, 3)
        torch.testing.assert_close(z_chunked, z_whole, atol=1e-12, rtol=1e-12)
        x_chunked, x_whole = vae.decode(z_chunked, clamp=False), vae.decode(z_chunked, clamp=False, chunked=False)
        assert x_chunked.shape == (2, 3, 13, 16, 24)
        torch.testing.assert_close(x_chunked, x_whole, atol=1e-12, rtol=1e-12)


def test_decode_clamps_by_default():
    """The user-facing decode clamps to [-1, 1] like the official wrapper; ``clamp=False`` does not."""
    vae = _tiny()
    z = torch.randn(1, 16, 2, 2, 2, dtype=torch.float64) * 3
    with torch.no_grad():
        raw, clamped = vae.decode(z, clamp=False), vae.decode(z)
    assert raw.abs().max() > 1
    torch.testing.assert_close(clamped, raw.clamp(-1, 1), atol=0, rtol=0)


def test_causality():
    """Encoding and decoding are causal in time: later frames never change earlier outputs."""
    vae = _tiny()
    video = torch.rand(1, 3, 9, 8, 8, dtype=torch.float64) * 2 - 1
    other = video.clone()
    other[:, :, 5:] = torch.rand_like(other[:, :, 5:])
    with torch.no_grad():
        za, zb = vae.encode(video), vae.encode(other)
        torch.testing.assert_close(za[:, :, :2], zb[:, :, :2], atol=0, rtol=0)
        assert (za[:, :, 2] - zb[:, :, 2]).abs().max() > 1e-3
        xa, xb = vae.decode(za, clamp=False), vae.decode(zb, clamp=False)
        torch.testing.assert_close(xa[:, :, :5], xb[:, :, :5], atol=0, rtol=0)


def test_tiled_decode_blending_is_exact_for_a_pointwise_decoder(monkeypatch):
    """Tile layout and blend weights, isolated: with a spatially pointwise stand-in decoder every tile agrees
    with the untiled result where they overlap, so tiled == untiled up to float rounding (weights sum to 1
    and every pixel is covered), for uneven sizes and per-axis tile/overlap settings."""
    vae = WanVAE(dim=4)
    monkeypatch.setattr(vae, "_decode", lambda z, chunked: F.interpolate(
        z[:, :3].flatten(1, 2), scale_factor=8, mode="nearest").unflatten(1, (3, z.shape[2])) * 1.7)
    z = torch.randn(2, 16, 3, 13, 21)
    ref = vae.decode(z, clamp=False)
    for tile, overlap in [(6, 2), ((5, 8), (2, 3)), (13, 4), (32, 8)]:
        out = vae.decode(z, clamp=False, tiled=True, tile_size=tile, tile_overlap=overlap)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_tiled_decode_approximates_untiled():
    """Real decoder (golden weights, 1 latent frame 8×28 split in width into tiles of 20 sharing 10).

    Tolerances (relative RMS error, measured 4.2e-3 and 6.2e-2): with the middle attention disabled the
    decoder is spatially local and the only error is the zero padding seen at tile borders (its receptive
    field is ~17 latent pixels, wider than the discarded margin) → < 1e-2. With the (global) attention on,
    each tile attends only within itself, so the result differs more → < 0.15. A blending error would be
    O(1). Random weights make both errors larger than for a trained VAE."""
    g = load_golden(golden_names("WanVAE_")[0])
    vae = _golden_vae(g)
    z = torch.randn(1, vae.z_dim, 1, 8, 28, generator=torch.Generator().manual_seed(0)) * 0.5
    kw = dict(clamp=False, tiled=True, tile_size=(8, 20), tile_overlap=(0, 10))

    def rel_rms(a, b):
        return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()

    with torch.no_grad():
        full = vae.decode(z, clamp=False)
        tiled = vae.decode(z, **kw)
        assert tiled.shape == full.shape
        assert rel_rms(tiled, full) < 0.15
        attn = vae.decoder.middle[1]
        attn.proj.weight.zero_()
        attn.proj.bias.zero_()
        full = vae.decode(z, clamp=False)
        tiled = vae.decode(z, **kw)
        assert rel_rms(tiled, full) < 1e-2


def test_manifest_full_size_vae_on_meta():
    """The released configuration (configs.json) built on meta has exactly the manifest's keys and shapes,
    and the constructor defaults are that configuration."""
    cfg = json.loads((MANIFESTS / "configs.json").read_text())["manifests"]["vae_wan2.1"]
    manifest = json.loads((MANIFESTS / cfg["manifest"]).read_text())
    with torch.device("meta"):
        vae, default = WanVAE(**cfg["constructor_kwargs"]), WanVAE()
    for m in (vae, default):
        sd = m.state_dict()
        assert sorted(sd) == sorted(manifest)
        assert {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()} == manifest
    assert sum(p.numel() for p in vae.parameters()) == cfg["num_params"]
    assert vae.spatial_factor == 8 and vae.temporal_factor == 4


def test_latent_constants_are_wan21():
    pipe = json.loads((MANIFESTS / "configs.json").read_text())["pipeline"]
    assert list(WAN21_LATENT_MEAN) == pipe["vae_latent_mean"]
    assert list(WAN21_LATENT_STD) == pipe["vae_latent_std"]
    mean, inv_std = WanVAE(dim=4)._latent_stats(torch.device("cpu"))
    assert torch.equal(inv_std.flatten(), 1.0 / torch.tensor(pipe["vae_latent_std"]))


def test_frame_count_helpers():
    vae = WanVAE(dim=4)
    assert [vae.num_latent_frames(t) for t in (1, 5, 81)] == [1, 2, 21]
    assert [vae.num_pixel_frames(t) for t in (1, 2, 21)] == [1, 5, 81]


@pytest.mark.parametrize("shape, match", [
    ((1, 4, 5, 16, 16), "3 channels"),
    ((1, 1, 5, 16, 16), "3 channels"),
    ((1, 3, 4, 16, 16), "frame count must be 1 \\+ 4"),
    ((1, 3, 6, 16, 16), "frame count must be 1 \\+ 4"),
    ((1, 3, 5, 20, 16), "divisible by 8"),
    ((1, 3, 5, 16, 12), "divisible by 8"),
    ((3, 5, 16, 16), "\\[B, 3, T, H, W\\]"),
])
def test_encode_rejects_bad_video(shape, match):
    with pytest.raises(ValueError, match=match):
        WanVAE(dim=4).encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 15, 2, 4, 4), (1, 32, 2, 4, 4), (16, 2, 4, 4)])
def test_decode_rejects_bad_latent(shape):
    with pytest.raises(ValueError, match="16 channels"):
        WanVAE(dim=4).decode(torch.zeros(shape))


def test_bad_tiling_and_config():
    vae = WanVAE(dim=4)
    with pytest.raises(ValueError, match="tile_overlap"):
        vae.decode(torch.zeros(1, 16, 1, 8, 8), tiled=True, tile_size=0, tile_overlap=0)
    with pytest.raises(ValueError, match="tile_overlap"):
        vae.decode(torch.zeros(1, 16, 1, 8, 8), tiled=True, tile_size=4, tile_overlap=3)
    with pytest.raises(ValueError, match="temperal_downsample"):
        WanVAE(dim=4, temperal_downsample=(True,))
    with pytest.raises(ValueError, match="z_dim"):
        WanVAE(dim=4, latent_mean=[0.0] * 4)
    with pytest.raises(ValueError, match="image must be \\[B, 3, H, W\\]"):
        vae.encode_image_condition(torch.zeros(3, 16, 16), 5)
    with pytest.raises(ValueError, match="frame count must be 1 \\+ 4"):
        vae.encode_image_condition(torch.zeros(1, 3, 16, 16), 4)
