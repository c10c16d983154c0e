"""rcm-export-ema: the EMA part of an rcm_train DCP checkpoint, exported with official keys."""

import warnings

import pytest
import torch

from rcm_nets.checkpoint import CheckpointError, load_checkpoint
from rcm_nets.wan import WanDiT
from rcm_pipelines.tools import ckpt_io, export_ema
from rcm_train.checkpoint import Checkpointer, ModelState


def _net(seed):
    torch.manual_seed(seed)
    net = WanDiT.from_config("tiny")
    net.init_weights()
    torch.nn.init.normal_(net.head.head.weight)
    return net


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    student, ema = _net(1), _net(2)
    ckpt = Checkpointer(root)
    with warnings.catch_warnings():  # "no process group: saving in a single process" is the intent
        warnings.simplefilter("ignore")
        ckpt.save(3, {"student": ModelState(student), "student_ema": ModelState(ema), "trainer": {"iteration": 3}})
    return root, student, ema


def test_export_ema_from_root_keeps_bits(tmp_path, checkpoint, capsys):
    root, _, ema = checkpoint
    out = tmp_path / "ema.safetensors"
    assert export_ema.main([str(root), str(out), "--dtype", "keep", "--config", "tiny"]) == 0
    assert "iter_000000003" in capsys.readouterr().out  # followed the `latest` pointer
    got, _ = ckpt_io.read(out)
    want = ema.state_dict()
    assert set(got) == set(want)
    assert all(ckpt_io.bitwise_equal(got[k], want[k]) for k in want)
    net = WanDiT.from_config("tiny")
    load_checkpoint(net, out)  # strict: official keys, nothing else


def test_default_is_bf16_and_other_parts(tmp_path, checkpoint):
    root, student, _ = checkpoint
    export_ema.export(root / "iter_000000003", tmp_path / "s.pth", part="student")
    got, _ = ckpt_io.read(tmp_path / "s.pth")
    for k, v in student.state_dict().items():
        assert ckpt_io.bitwise_equal(got[k], v.to(torch.bfloat16)), k


def test_errors(tmp_path, checkpoint):
    root, _, _ = checkpoint
    with pytest.raises(CheckpointError, match=r"no part 'fake_score'.*student_ema"):
        export_ema.export(root, tmp_path / "x.pth", part="fake_score")
    with pytest.raises(FileNotFoundError, match="neither a DCP checkpoint"):
        export_ema.export(tmp_path, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="missing keys"):  # wrong layout named before anything is written
        export_ema.export(root, tmp_path / "x.pth", config="tiny-i2v")
    assert not (tmp_path / "x.pth").exists()
