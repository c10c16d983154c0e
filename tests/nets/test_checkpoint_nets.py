"""rcm_nets.checkpoint: official formats, meta build + assign, strict key checks, prefixes, corrupt files.

Checkpoints are tiny official-format files written by the tests (no real weights exist on this machine):
the golden DiT's weights, keyed exactly as the official WanModel.state_dict().
"""

import json
import warnings

import pytest
import torch
from _golden import golden_names, load_golden
from safetensors.torch import save_file

from rcm_nets.checkpoint import CheckpointError, load_checkpoint, read_state_dict
from rcm_nets.wan import WanConfig, WanDiT


@pytest.fixture(scope="module")
def official():
    """(config, official state dict in float32, example inputs) from the t2v DiT golden set."""
    name = next(n for n in golden_names("WanModel") if "t2v" in n)
    g = load_golden(name)
    cfg = WanConfig(**g.meta["constructor_kwargs"])
    x = torch.randn(1, cfg.in_dim, 2, 4, 4)
    return cfg, g.weights, (x, torch.tensor([321.5]), torch.randn(1, 5, cfg.text_dim))


def _reference_out(cfg, sd, inputs):
    net = WanDiT(cfg)
    net.load_state_dict(sd, strict=True)
    with torch.no_grad():
        return net(*inputs)


def _write(fmt, sd, tmp_path):
    if fmt == "pth":
        path = tmp_path / "model.pth"
        torch.save(sd, path)
    elif fmt == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    elif fmt == "sharded":  # the Hugging Face layout of the 14B release: shards + index
        path = tmp_path / "sharded"
        path.mkdir()
        keys = sorted(sd)
        halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2:]}
        for f, ks in halves.items():
            save_file({k: sd[k] for k in ks}, str(path / f))
        index = {"weight_map": {k: f for f, ks in halves.items() for k in ks}}
        (path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    else:
        import torch.distributed.checkpoint as dcp

        path = tmp_path / "dcp"
        with warnings.catch_warnings():  # "no process group: saving in a single process" is the intent
            warnings.simplefilter("ignore")
            dcp.save({k: v.clone() for k, v in sd.items()}, checkpoint_id=str(path), no_dist=True)
    return path


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "sharded", "dcp"])
def test_meta_build_and_load_each_format(official, fmt, tmp_path):
    cfg, sd, inputs = official
    path = _write(fmt, sd, tmp_path)
    with torch.device("meta"):
        net = WanDiT(cfg)
    report = load_checkpoint(net, path)
    assert report.prefix == "" and not report.missing and not report.unexpected
    assert not any(p.is_meta for p in net.parameters())
    assert net.patch_embedding.weight.shape == (cfg.dim, cfg.in_dim, *cfg.patch_size)  # official Conv3d layout
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
    with torch.no_grad():  # the same values; BLAS may round differently for differently aligned storage
        torch.testing.assert_close(net(*inputs), _reference_out(cfg, sd, inputs), atol=1e-5, rtol=1e-5)


def test_dtype_follows_module_or_argument(official, tmp_path):
    cfg, sd, _ = official
    path = _write("safetensors", {k: v.to(torch.bfloat16) for k, v in sd.items()}, tmp_path)
    with torch.device("meta"):
        net = WanDiT(cfg, dtype=torch.float32)
    report = load_checkpoint(net, path)
    assert report.cast == len(sd) and {p.dtype for p in net.parameters()} == {torch.float32}
    with torch.device("meta"):
        net = WanDiT(cfg)
    load_checkpoint(net, path, dtype=torch.float64)
    assert {p.dtype for p in net.parameters()} == {torch.float64}


def test_net_prefix_is_stripped_and_reported(official, tmp_path):
    cfg, sd, _ = official
    path = _write("pth", {f"net.{k}": v for k, v in sd.items()}, tmp_path)
    net = WanDiT(cfg)
    report = load_checkpoint(net, path)
    assert report.prefix == "net." and "stripped prefix 'net.'" in str(report)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())


def test_two_prefixes_need_a_choice(official):
    cfg, sd, _ = official
    ema = {k: v * 0.5 for k, v in sd.items()}
    both = {**{f"net.{k}": v for k, v in sd.items()}, **{f"net_ema.{k}": v for k, v in ema.items()}}
    with pytest.raises(CheckpointError, match=r"several copies .*'net.', 'net_ema.'.*pass prefix="):
        load_checkpoint(WanDiT(cfg), both)
    net = WanDiT(cfg)
    report = load_checkpoint(net, both, prefix="net_ema.")
    assert len(report.ignored) == len(sd)
    torch.testing.assert_close(net.head.head.weight, ema["head.head.weight"], atol=0, rtol=0)


def test_missing_unexpected_and_shape_mismatch_are_listed(official):
    cfg, sd, _ = official
    bad = dict(sd)
    del bad["blocks.0.self_attn.norm_q.weight"]
    bad["blocks.0.extra.weight"] = torch.zeros(3)
    bad["head.head.weight"] = torch.zeros(7, cfg.dim)
    net = WanDiT(cfg)
    before = net.head.head.weight.clone()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(net, bad)
    msg = str(err.value)
    assert "missing keys (1): blocks.0.self_attn.norm_q.weight" in msg
    assert "unexpected keys (1): blocks.0.extra.weight" in msg
    assert f"head.head.weight: file [7, {cfg.dim}] vs model [64, {cfg.dim}]" in msg
    assert torch.equal(net.head.head.weight, before), "nothing may be loaded when the check fails"


def test_missing_key_file_and_non_strict(official, tmp_path):
    cfg, sd, _ = official
    path = _write("safetensors", {k: v for k, v in sd.items() if k != "head.modulation"}, tmp_path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): head.modulation"):
        load_checkpoint(WanDiT(cfg), path)
    with pytest.warns(UserWarning, match="1 missing"):
        report = load_checkpoint(WanDiT(cfg), path, strict=False)
    assert report.missing == ["head.modulation"]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_truncated_file_is_named(official, fmt, tmp_path):
    _, sd, _ = official
    path = _write(fmt, sd, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read .*{path.name}.*truncated or corrupt"):
        read_state_dict(path)


def test_absent_and_unknown_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"0")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        read_state_dict(tmp_path / "w.npz")
    with pytest.raises(CheckpointError, match="neither DCP"):
        read_state_dict(tmp_path)


def test_pth_refuses_pickled_code(tmp_path):
    """weights_only=True: a file holding arbitrary objects is refused, with the reason."""
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "obj": WanConfig}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(path)


class _Payload:
    """Unpickling it would run a shell command creating ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_dcp_metadata_holding_pickled_code_is_refused_and_runs_nothing(tmp_path):
    """Before: the network loader read DCP metadata with the stock reader, whose unpickler ran the payload."""
    import pickle

    import torch.distributed.checkpoint as dcp

    from rcm_nets.checkpoint import read_dcp_part

    path = tmp_path / "dcp"
    dcp.save({"net.w": torch.ones(2)}, checkpoint_id=str(path), no_dist=True)
    assert read_state_dict(path)[0]["net.w"].sum() == 2  # the intact directory reads
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"dcp/.metadata holds a pickled object .*refused"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="refused"):
        read_dcp_part(path, "net")
    assert not marker.exists()
    assert pickle.loads(pickle.dumps(_Payload(marker))) == 0 and marker.exists()  # the payload is live


def test_flattened_patch_embedding_of_rcm_checkpoints_loads(official, tmp_path):
    """rCM's released DiT files store patch_embedding.weight as the Linear [dim, in_dim * 1 * 2 * 2] of its
    patchify; it is the same tensor as the official Conv3d weight, reshaped, and must give the same network."""
    from safetensors.torch import save_file

    cfg, weights, (x, t, ctx) = official
    flat = {f"net.{k}": (v.flatten(1) if k == "patch_embedding.weight" else v) for k, v in weights.items()}
    assert flat["net.patch_embedding.weight"].dim() == 2
    save_file(flat, tmp_path / "rcm_student.safetensors")
    net, ref = WanDiT(cfg), WanDiT(cfg)
    load_checkpoint(net, tmp_path / "rcm_student.safetensors")
    load_checkpoint(ref, weights)
    assert torch.equal(net.patch_embedding.weight, weights["patch_embedding.weight"])
    with torch.no_grad():
        assert torch.equal(net(x, t, ctx), ref(x, t, ctx))
    bad = dict(flat, **{"net.patch_embedding.weight": flat["net.patch_embedding.weight"][:, :-1]})
    with pytest.raises(CheckpointError, match="patch_embedding.weight"):  # a wrong size is still refused
        load_checkpoint(net, bad)
