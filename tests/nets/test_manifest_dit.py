"""WanDiT built on ``meta`` has exactly the official state-dict layout of each released DiT.

The manifests (``{key: [shape, dtype]}``) were dumped from the official WanModel built with the released
configurations, listed in ``configs.json`` with their parameter counts. Matching them key for key and shape for
shape is what makes ``load_state_dict(official, strict=True)`` work; extra persistent buffers would break it.
"""

import json

import pytest
import torch
from _golden import manifest_dir

from rcm_nets.wan import WanConfig, WanDiT, get_config

# our named config for each released DiT manifest
NAMED = {"wanmodel_t2v_1.3B": "t2v-1.3B", "wanmodel_t2v_14B": "t2v-14B", "wanmodel_i2v_14B": "i2v-14B"}


def _entries():
    path = manifest_dir() / "configs.json"
    if not path.is_file():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"{path} not found"))]
    entries = json.loads(path.read_text())["manifests"]
    return [pytest.param(v, id=k) for k, v in entries.items() if "WanModel" in v["class"]]


@pytest.mark.parametrize("entry", _entries())
def test_meta_module_matches_manifest(entry):
    manifest = json.loads((manifest_dir() / entry["manifest"]).read_text())
    with torch.device("meta"):
        net = WanDiT(WanConfig(**entry["constructor_kwargs"]))
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    theirs = {k: v[0] for k, v in manifest.items()}
    assert sorted(set(theirs) - set(ours)) == [], "keys missing from our module"
    assert sorted(set(ours) - set(theirs)) == [], "keys our module has but the official one does not"
    bad = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert bad == {}
    assert len(ours) == entry["num_tensors"]
    assert sum(p.numel() for p in net.parameters()) == entry["num_params"]
    assert list(net.buffers()) == [], "no buffers (the official model has none; RoPE is computed on the fly)"


@pytest.mark.parametrize("entry", _entries())
def test_named_config_equals_released_config(entry):
    name = NAMED[entry["manifest"].removesuffix(".json")]
    assert get_config(name) == WanConfig(**entry["constructor_kwargs"])
