"""diffusers interop of the DiT: key / config mapping (rcm_nets.wan.diffusers_format), loading a diffusers
``save_pretrained`` folder into ``WanDiT`` and ``rcm-export-diffusers``.

The reference is diffusers' own ``WanTransformer3DModel`` (an independent implementation of the same network):
with the converted weights both give the same velocity in float32 (atol 1e-5; measured ~1e-6, the
difference being float32 summation order and diffusers' float32 timestep sinusoid against our float64 one).
"""

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from rcm_nets.checkpoint import CheckpointError, load_checkpoint
from rcm_nets.wan import WanDiT
from rcm_nets.wan import diffusers_format as dfm
from rcm_nets.wan.configs import get_config
from rcm_pipelines.components import DiTSpec, dit_config, load_dit
from rcm_pipelines.tools import export_diffusers

diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5


def _random_dit(name: str, seed: int = 0) -> WanDiT:
    """A tiny DiT with every tensor random (norm weights around 1, the head not zero)."""
    net = WanDiT.from_config(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in net.named_parameters():
            one = 1.0 if ("norm" in k or k.startswith("img_emb.proj.0") or k.startswith("img_emb.proj.4")) else 0.0
            p.copy_(one + torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 1 else 0.05))
    return net


def _inputs(cfg, seed: int = 1):
    """``(ours, theirs)`` keyword arguments of one call: x, t, context (padded to text_len), i2v y + CLIP."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.out_dim, 3, 4, 6, generator=g)
    t = torch.tensor([999.0, 37.5])
    ctx = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g)
    ours, theirs = dict(x=x, t=t, context=ctx), dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx)
    if cfg.model_type == "i2v":
        y = torch.randn(2, cfg.in_dim - cfg.out_dim, 3, 4, 6, generator=g)
        clip = torch.randn(2, 257, 1280, generator=g)
        ours.update(y=y, clip_fea=clip)
        theirs.update(hidden_states=torch.cat([x, y], 1), encoder_hidden_states_image=clip)
    return ours, theirs


def _from_folder(path):
    """diffusers' ``from_pretrained`` (it needs accelerate for the i2v model's fp32 modules); without accelerate:
    its config through diffusers, the shards the index names read with safetensors, a strict load."""
    cls = diffusers.WanTransformer3DModel
    if importlib.util.find_spec("accelerate") is not None:
        return cls.from_pretrained(path)
    model = cls.from_config(cls.load_config(path))
    files = sorted(set(json.loads((path / dfm.DIFFUSERS_INDEX).read_text())["weight_map"].values()))
    sd = {k: v for f in files for k, v in load_file(path / f).items()}
    model.load_state_dict(sd, strict=True)
    return model


@torch.no_grad()
def _max_diff(net: WanDiT, model, cfg) -> float:
    ours, theirs = _inputs(cfg)
    a = net(**ours)
    b = model(**theirs, return_dict=False)[0]
    assert a.shape == b.shape and a.abs().max() > 0.1  # a real signal, not a zero head
    return float((a - b).abs().max())


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_keys_and_config_cover_diffusers_model(name):
    cfg = get_config(name)
    model = diffusers.WanTransformer3DModel.from_config(dfm.config_to_diffusers(cfg))
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in WanDiT(cfg, device="meta").state_dict().items()}
    mapped = {dfm.key_to_diffusers(k): s for k, s in ours.items()}
    assert mapped == theirs  # every key, both ways, same shapes
    assert {dfm.key_from_diffusers(k) for k in theirs} == set(ours)
    assert dfm.config_from_diffusers(dict(model.config), text_len=cfg.text_len) == cfg
    assert dfm.key_to_diffusers("blocks.3.norm3.weight") == "blocks.3.norm2.weight"  # the norms' names swap
    assert dfm.key_to_diffusers("head.modulation") == "scale_shift_table"


@pytest.mark.parametrize("name", ["tiny", "tiny-i2v"])
def test_ours_to_diffusers_same_output(name):
    net = _random_dit(name)
    model = diffusers.WanTransformer3DModel.from_config(dfm.config_to_diffusers(net.config))
    model.load_state_dict(dfm.state_dict_to_diffusers(net.state_dict()), strict=True)
    assert _max_diff(net, model, net.config) < ATOL
    with torch.no_grad():  # can fail: one tensor off changes the output
        model.blocks[1].scale_shift_table.add_(0.01)
    assert _max_diff(net, model, net.config) > 10 * ATOL


@pytest.mark.parametrize("name, sharded", [("tiny", True), ("tiny-i2v", True), ("tiny", False)])
def test_diffusers_folder_loads_into_wandit(tmp_path, name, sharded):
    """diffusers model (its own random init) -> save_pretrained -> our loader: the folder (sharded), or the
    single weights file with the config.json path."""
    cfg = get_config(name)
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel.from_config(dfm.config_to_diffusers(cfg))
    with torch.no_grad():
        model.proj_out.weight.normal_(std=0.05)  # a signal whatever diffusers' init of the head
    model.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "10GB")
    assert (tmp_path / dfm.DIFFUSERS_INDEX).is_file() == sharded
    config, path = (tmp_path, tmp_path) if sharded else (tmp_path / "config.json", tmp_path / dfm.DIFFUSERS_WEIGHTS)
    spec = DiTSpec(config=str(config), overrides={"text_len": cfg.text_len}, path=str(path))
    assert dit_config(spec) == cfg  # config.json understood
    net = load_dit(spec, torch.device("cpu"), torch.float32)
    assert _max_diff(net, model, cfg) < ATOL


def test_export_tool_round_trip(tmp_path, capsys):
    net = _random_dit("tiny-i2v", seed=3)
    src = tmp_path / "student.pth"
    torch.save({f"net_ema.{k}": v for k, v in net.state_dict().items()}, src)  # wrapper prefix, as rCM files
    out = tmp_path / "diffusers"
    assert export_diffusers.main(["--student", str(src), "--config", "tiny-i2v", "--out", str(out),
                                  "--max_shard_gb", str(200 / 2**20)]) == 0
    assert "safetensors file(s)" in capsys.readouterr().out
    index = json.loads((out / dfm.DIFFUSERS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    model = _from_folder(out)
    assert _max_diff(net, model, net.config) < ATOL
    # exporting again unsharded into the same folder leaves no stale shard or index behind
    assert export_diffusers.main(["--student", str(src), "--config", "tiny-i2v", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", dfm.DIFFUSERS_WEIGHTS]
    # and back: the exported folder is a valid student checkpoint for our loader, bit for bit
    back = WanDiT.from_config("tiny-i2v")
    report = load_checkpoint(back, out)
    assert "diffusers layout" in report.format
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())


def test_shard_sizes():
    sd = {f"k{i}": torch.zeros(n) for i, n in enumerate([10, 10, 30, 5])}  # float32: 40, 40, 120, 20 bytes
    assert [list(g) for g in export_diffusers.shard(sd, 80)] == [["k0", "k1"], ["k2"], ["k3"]]
    assert [list(g) for g in export_diffusers.shard(sd, 10**6)] == [["k0", "k1", "k2", "k3"]]


def test_errors(tmp_path):
    base = dfm.config_to_diffusers(get_config("tiny"))
    with pytest.raises(ValueError, match="pos_embed_seq_len"):
        dfm.config_from_diffusers({**base, "pos_embed_seq_len": 514})
    with pytest.raises(ValueError, match=r"cfg.json: fields \['foo'\]"):
        dfm.config_from_diffusers({**base, "foo": 1}, source="cfg.json")
    with pytest.raises(ValueError, match="image_dim"):
        dfm.config_from_diffusers({**base, "image_dim": 1280})  # added_kv_proj_dim missing
    with pytest.raises(KeyError, match="condition_embedder.image_embedder.pos_embed"):
        dfm.state_dict_from_diffusers({"condition_embedder.image_embedder.pos_embed": torch.zeros(1)})
    sd = dfm.state_dict_to_diffusers(WanDiT.from_config("tiny").state_dict())
    with pytest.raises(CheckpointError, match="shape mismatches"):  # a t2v folder is not an i2v net
        load_checkpoint(WanDiT.from_config("tiny", in_dim=20, model_type="t2v"), sd)
    official = get_config("tiny").model_dump(mode="json", exclude={"precision"})
    (tmp_path / "config.json").write_text(json.dumps(official))
    assert dfm.read_config(tmp_path / "config.json") == get_config("tiny")  # an official config.json still reads
    (tmp_path / "config.json").write_text(json.dumps({**base, "qk_norm": "layer_norm"}))
    with pytest.raises(ValueError, match="qk_norm='layer_norm'"):
        dfm.read_config(tmp_path)
