"""UMT5Encoder: official goldens, relative-position buckets, masking semantics, shared_pos, manifest, bad input.

Golden tolerance is the issue's atol = rtol = 1e-4 in float32: the official code run in float64 differs from
the float32 golden by 6.6e-6 (recorded in the JSON); a missing 1/sqrt(d)-free logit, a bias added instead
of replaced under the mask, or a wrong bucket is O(0.1) or more.
"""

import json
from pathlib import Path

import pytest
import torch
from _golden import golden_names, load_golden, tolerance

from rcm_nets.checkpoint import load_checkpoint
from rcm_nets.wan import UMT5Encoder
from rcm_nets.wan.t5 import relative_position_buckets

MANIFESTS = Path(__file__).resolve().parents[1] / "fixtures" / "wan21" / "manifests"


@pytest.mark.parametrize("name", golden_names("T5Encoder"))
def test_t5_matches_official_golden(name):
    g = load_golden(name)
    with torch.device("meta"):  # the real loading path: meta build, strict load with assign=True
        enc = UMT5Encoder(**g.meta["constructor_kwargs"]).eval()
    load_checkpoint(enc, g.weights, strict=True)
    inp, out = g.meta["inputs"], g.meta["outputs"]
    ids, mask = g.io["in.ids"], g.io["in.mask"]
    ref = g.io["out.hidden"]
    assert list(ids.shape) == inp["in.ids"]["shape"] and list(ref.shape) == out["out.hidden"]["shape"]
    lengths = mask.sum(1).tolist()
    if "valid_lengths" in inp["in.mask"]:
        assert lengths == inp["in.mask"]["valid_lengths"]
    tol = tolerance(g.meta)
    with torch.no_grad():
        raw = enc(ids, mask, zero_padding=False)  # the official module's output, padded rows included
        trimmed = enc(ids, mask)  # the pipeline's: rows past each prompt's length are zero
    torch.testing.assert_close(raw, ref, **tol)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(trimmed[b, :n], ref[b, :n], **tol)
        assert torch.all(trimmed[b, n:] == 0)
    if "debug.rel_buckets" in g.io:
        rb = g.io["debug.rel_buckets"]
        assert torch.equal(relative_position_buckets(*rb.shape, g.meta["constructor_kwargs"]["num_buckets"]),
                           rb.long())
    print(f"{name}: max|err| {(raw - ref).abs().max():.2e}")


def test_relative_buckets_closed_form():
    """docs/nets_encoders.md, umT5: r = 0 → 0, r = −1..−7 → 1..7, r = +1..+7 → 17..23; log offsets by |r| band
    (8–11 → 8, …, 64–90 → 14, ≥ 91 → 15), identical on both sides."""
    b = relative_position_buckets(1, 400)[0]  # query 0, keys 0..399: r = key
    bl = relative_position_buckets(400, 1)[:, 0]  # keys before the query: r = −query
    assert b[0] == 0 and bl[0] == 0
    assert b[1:8].tolist() == list(range(17, 24)) and bl[1:8].tolist() == list(range(1, 8))
    bands = [(8, 11, 8), (12, 15, 9), (16, 22, 10), (23, 31, 11), (32, 45, 12), (46, 63, 13), (64, 90, 14),
             (91, 399, 15)]
    for lo, hi, off in bands:
        assert torch.all(b[lo : hi + 1] == 16 + off), (lo, hi)
        assert torch.all(bl[lo : hi + 1] == off), (lo, hi)


def _random_encoder(shared_pos=False, **kw) -> UMT5Encoder:
    enc = UMT5Encoder(vocab=50, dim=16, dim_attn=16, dim_ffn=24, num_heads=2, num_layers=2, shared_pos=shared_pos,
                      **kw).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=gen)) if p.ndim == 1
                    else torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return enc


def test_padding_only_masks_keys():
    """Valid rows do not depend on the ids at padded positions (keys masked); the mask is honoured per
    sample; a sample's valid rows equal encoding it alone, unpadded."""
    enc = _random_encoder()
    ids = torch.randint(2, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    other = ids.clone()
    other[1, 7:] = torch.randint(2, 50, (5,))
    with torch.no_grad():
        a, b = enc(ids, mask), enc(other, mask)
        alone = enc(ids[1:, :7])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a[1, :7], alone[0], atol=1e-5, rtol=1e-5)
    assert torch.all(a[1, 7:] == 0)


def test_shared_pos_layout_and_equivalence():
    """``shared_pos=True`` keeps one table at the root; copying it into every block of a per-layer model
    gives the same output (so the per-layer path indexes its own table the same way)."""
    shared, per_layer = _random_encoder(shared_pos=True), _random_encoder(shared_pos=False)
    keys = set(shared.state_dict())
    assert "pos_embedding.embedding.weight" in keys
    assert not any(k.startswith("blocks.") and "pos_embedding" in k for k in keys)
    sd = {k: v for k, v in shared.state_dict().items() if k != "pos_embedding.embedding.weight"}
    for i in range(len(per_layer.blocks)):
        sd[f"blocks.{i}.pos_embedding.embedding.weight"] = shared.pos_embedding.embedding.weight
    per_layer.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(shared(ids), per_layer(ids), atol=0, rtol=0)


def test_manifest_umt5_xxl_on_meta():
    cfg = json.loads((MANIFESTS / "configs.json").read_text())["manifests"]["umt5_xxl_encoder"]
    manifest = json.loads((MANIFESTS / cfg["manifest"]).read_text())
    with torch.device("meta"):
        enc, default = UMT5Encoder(**cfg["constructor_kwargs"]), UMT5Encoder()
    for m in (enc, default):
        assert {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in m.state_dict().items()} == manifest
    assert sum(p.numel() for p in enc.parameters()) == cfg["num_params"]


def test_bad_input():
    enc = _random_encoder()
    with pytest.raises(ValueError, match="integer \\[B, L\\]"):
        enc(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="integer \\[B, L\\]"):
        enc(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="mask shape"):
        enc(torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="token ids must lie in \\[0, 50\\)"):
        enc(torch.full((1, 3), 50))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        UMT5Encoder(vocab=8, dim=10, dim_attn=10, dim_ffn=8, num_heads=3, num_layers=1)
