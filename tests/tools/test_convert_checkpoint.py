"""rcm-convert: .pth <-> DCP <-> .safetensors round trips keep every bit.

The state dict mixes dtypes (fp32, bf16, fp16, int64, bool) and special values (NaN with a payload, ±inf,
-0.0, subnormals), whose bits a careless conversion (a cast, a NaN canonicalisation) would change; the
check compares raw bytes, not values.
"""

import pytest
import torch

from rcm_nets.checkpoint import CheckpointError
from rcm_nets.wan import WanDiT
from rcm_pipelines.tools import ckpt_io
from rcm_pipelines.tools import convert as convert_checkpoint


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    net = WanDiT.from_config("tiny")
    net.init_weights()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    sd["blocks.0.modulation"] = sd["blocks.0.modulation"].to(torch.bfloat16)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3.0], dtype=torch.float32)
    special[0] = torch.tensor(0x7FC01234, dtype=torch.int32).view(torch.float32)  # NaN with a payload
    sd["extra.special"] = special
    sd["extra.half"] = torch.randn(3, 5).to(torch.float16)
    sd["extra.index"] = torch.arange(7, dtype=torch.int64)
    sd["extra.mask"] = torch.tensor([True, False, True])
    return sd


def _assert_bitwise(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert ckpt_io.bitwise_equal(a[k], b[k]), k


def test_bitwise_equal_sees_nan_payloads_and_signed_zero():
    x = torch.tensor([0.0, 1.0])
    assert ckpt_io.bitwise_equal(x, x.clone())
    assert not ckpt_io.bitwise_equal(x, torch.tensor([-0.0, 1.0]))  # values equal, bits differ
    n1 = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    n2 = torch.tensor([0x7FC00002], dtype=torch.int32).view(torch.float32)
    assert not ckpt_io.bitwise_equal(n1, n2)
    assert not ckpt_io.bitwise_equal(x, x.double())


@pytest.mark.parametrize("chain", [("pth", "dcp", "safetensors", "pth"), ("safetensors", "dcp", "pth", "safetensors")])
def test_round_trip_is_bit_exact(tmp_path, state_dict, chain):
    suffix = {"pth": ".pth", "safetensors": ".safetensors", "dcp": ".dcp"}
    src = ckpt_io.write(state_dict, tmp_path / f"start{suffix[chain[0]]}")
    for i, fmt in enumerate(chain[1:]):
        dst = tmp_path / f"step{i}{suffix[fmt]}"
        info = convert_checkpoint.convert(src, dst)
        assert info["dst_format"] == fmt and info["verified"]
        back, got_fmt = ckpt_io.read(dst)
        assert got_fmt.startswith(fmt)
        _assert_bitwise(back, state_dict)  # against the original, not only the previous step
        src = dst


def test_cli_prefix_and_dtype(tmp_path, state_dict, capsys):
    src = ckpt_io.write(state_dict, tmp_path / "a.pth")
    assert convert_checkpoint.main([str(src), str(tmp_path / "b"), "--to", "dcp", "--add_prefix", "net."]) == 0
    assert "verified bit-exact" in capsys.readouterr().out
    b, fmt = ckpt_io.read(tmp_path / "b")
    assert fmt == "dcp" and set(b) == {f"net.{k}" for k in state_dict}
    convert_checkpoint.main([str(tmp_path / "b"), str(tmp_path / "c.safetensors"), "--strip_prefix", "net.",
                             "--dtype", "bfloat16"])
    c, _ = ckpt_io.read(tmp_path / "c.safetensors")
    for k, v in state_dict.items():
        want = v.to(torch.bfloat16) if v.is_floating_point() else v  # integers and bools are never cast
        assert ckpt_io.bitwise_equal(c[k], want), k


def test_shared_storage_is_written_to_safetensors(tmp_path):
    w = torch.randn(4, 4)
    sd = {"a.weight": w, "b.weight": w, "c.weight": w.t()}  # tied and non-contiguous views
    ckpt_io.write(sd, tmp_path / "t.safetensors")
    back, _ = ckpt_io.read(tmp_path / "t.safetensors")
    _assert_bitwise(back, {k: v.contiguous() for k, v in sd.items()})


def test_errors_name_the_problem(tmp_path, state_dict):
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_checkpoint.convert(tmp_path / "missing.pth", tmp_path / "x.pth")
    src = ckpt_io.write(state_dict, tmp_path / "a.pth")
    with pytest.raises(ValueError, match=r"suffix '\.bin'"):
        convert_checkpoint.convert(src, tmp_path / "x.bin")
    with pytest.raises(KeyError, match="do not start with 'net.'"):
        convert_checkpoint.convert(src, tmp_path / "x.pth", strip_prefix="net.")
