"""WanDiT against the official WanModel goldens (float32, atol = rtol = 1e-4).

Every config, key, shape, sample count and call argument comes from ``<name>.json`` of each DiT set in
``$WAN21_GOLDEN_DIR``. The official call takes lists of per-sample tensors of different sizes, padded to a
``seq_len`` that never changes the outputs; our call takes batched tensors, so samples of equal latent shape
are run together as one batch (their contexts zero-padded to a common length, which the model pads to
text_len with zeros anyway). The tolerance is the issue's 1e-4: the official code run in float64 differs
from these float32 goldens by ~1e-6 (recorded in each JSON), so a correct float32 implementation lands
within a few times that, while any semantic error (RoPE layout, padding mask, modulation order) is O(1).
"""

from collections import defaultdict

import pytest
import torch
from _golden import golden_names, load_golden, tolerance

from rcm_nets.checkpoint import load_checkpoint
from rcm_nets.wan import WanConfig, WanDiT


def _samples(g):
    """Per-sample call arguments read from the JSON: list of dicts (x, t, context, y?, clip_fea?)."""
    inp = g.meta["inputs"]
    xs, ctxs = g.tensors(inp["x"]["keys"]), g.tensors(inp["context"]["keys"])
    t = g.io[inp["t"]["key"]]
    ys = g.tensors(inp["y"]["keys"]) if "y" in inp else None
    clip = g.io[inp["clip_fea"]["key"]] if "clip_fea" in inp else None
    outs = g.tensors(g.meta["outputs"]["keys"])
    assert len(xs) == len(ctxs) == len(outs) == t.shape[0] == g.meta.get("batch_size", len(xs))
    return [dict(x=xs[i], t=t[i], context=ctxs[i], out=outs[i], y=None if ys is None else ys[i],
                 clip_fea=None if clip is None else clip[i]) for i in range(len(xs))]


def _batch(samples):
    """Stack samples of one latent shape; contexts zero-padded to the longest."""
    lmax = max(s["context"].shape[0] for s in samples)
    ctx = torch.stack([torch.nn.functional.pad(s["context"], (0, 0, 0, lmax - s["context"].shape[0]))
                       for s in samples])
    kw = {}
    if samples[0]["y"] is not None:
        kw = dict(y=torch.stack([s["y"] for s in samples]), clip_fea=torch.stack([s["clip_fea"] for s in samples]))
    return torch.stack([s["x"] for s in samples]), torch.stack([s["t"] for s in samples]), ctx, kw


@pytest.mark.parametrize("name", golden_names("WanModel"))
def test_dit_matches_official_golden(name):
    g = load_golden(name)
    net = WanDiT(WanConfig(**g.meta["constructor_kwargs"])).eval()
    report = load_checkpoint(net, g.weights, strict=True)  # official keys, strict, bf16-stored -> float32
    assert report.prefix == "" and not report.missing and not report.unexpected
    tol = tolerance(g.meta)
    groups = defaultdict(list)
    for i, s in enumerate(_samples(g)):
        groups[tuple(s["x"].shape)].append((i, s))
    worst = 0.0
    for members in groups.values():
        x, t, ctx, kw = _batch([s for _, s in members])
        with torch.no_grad():
            out = net(x, t, ctx, **kw)
        assert out.dtype == torch.float32
        for j, (i, s) in enumerate(members):
            torch.testing.assert_close(out[j], s["out"], **tol, msg=lambda m, i=i: f"{name} sample {i}: {m}")
            worst = max(worst, (out[j] - s["out"]).abs().max().item())
    print(f"{name}: max abs error {worst:.3g} over {sum(map(len, groups.values()))} samples")


@pytest.mark.parametrize("name", golden_names("WanModel"))
def test_dit_golden_single_samples_match_batched(name):
    """Each sample alone gives its golden too (the official per-sample padding never changes outputs)."""
    g = load_golden(name)
    samples = _samples(g)
    if len(samples) == 1:
        pytest.skip("one sample: the batched test already ran it alone")
    net = WanDiT(WanConfig(**g.meta["constructor_kwargs"])).eval()
    net.load_state_dict(g.weights, strict=True)
    for i, s in enumerate(samples):
        x, t, ctx, kw = _batch([s])
        with torch.no_grad():
            out = net(x, t, ctx, **kw)
        torch.testing.assert_close(out[0], s["out"], **tolerance(g.meta), msg=lambda m, i=i: f"sample {i}: {m}")
