"""rcm-inspect --sha256 (print, verify against a digest or a sha256sum file) and a diffusers folder checked
against a named layout. The reference digest is hashlib over the whole file read at once."""

import hashlib
import json

import pytest

from rcm_nets.wan import WanDiT
from rcm_nets.wan import diffusers_format as dfm
from rcm_pipelines.tools import ckpt_io, inspect_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    path = ckpt_io.write(WanDiT.from_config("tiny").state_dict(), tmp_path / "tiny.safetensors")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_print_and_verify(ckpt, capsys, monkeypatch):
    path, digest = ckpt
    monkeypatch.setattr(inspect_checkpoint, "_CHUNK", 1000)  # many pieces: the streaming must add up
    assert inspect_checkpoint.sha256(path) == digest
    assert inspect_checkpoint.main([str(path), "--sha256"]) == 0
    assert f"sha256 {digest}" in capsys.readouterr().out
    assert inspect_checkpoint.main([str(path), "--sha256", digest.upper(), "--config", "tiny"]) == 0
    assert f"sha256 {digest} (verified)" in capsys.readouterr().out
    assert inspect_checkpoint.main([str(path), "--sha256", digest, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == {"sha256": digest, "expected": digest, "ok": True}


def test_mismatch_exit_2(ckpt, capsys):
    path, digest = ckpt
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    assert inspect_checkpoint.main([str(path), "--sha256", wrong]) == 2
    assert "SHA-256 MISMATCH" in capsys.readouterr().out
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last tensor
    path.write_bytes(bytes(data))
    assert inspect_checkpoint.main([str(path), "--sha256", digest]) == 2


def test_sums_file(ckpt, tmp_path, capsys):
    path, digest = ckpt
    sums = tmp_path / "SHA256SUMS"
    sums.write_text(f"{'a' * 64}  other.pth\n{digest} *checkpoints/{path.name}\n")
    assert inspect_checkpoint.main([str(path), "--sha256", str(sums)]) == 0
    sums.write_text(f"{'a' * 64}  other.pth\n")
    with pytest.raises(ValueError, match="no sha256 line for tiny.safetensors"):
        inspect_checkpoint.main([str(path), "--sha256", str(sums)])
    with pytest.raises(ValueError, match="neither 64 hex digits"):
        inspect_checkpoint.main([str(path), "--sha256", "abc"])
    with pytest.raises(ValueError, match="needs a single file"):
        inspect_checkpoint.main([str(tmp_path), "--sha256"])


def test_diffusers_folder_against_layout(tmp_path, capsys):
    sd = dfm.state_dict_to_diffusers(WanDiT.from_config("tiny").state_dict())
    ckpt_io.write(sd, tmp_path / dfm.DIFFUSERS_WEIGHTS)
    assert inspect_checkpoint.main([str(tmp_path), "--config", "tiny"]) == 0
    assert "matches tiny" in capsys.readouterr().out
    del sd["blocks.1.scale_shift_table"]
    ckpt_io.write(sd, tmp_path / dfm.DIFFUSERS_WEIGHTS)
    assert inspect_checkpoint.main([str(tmp_path), "--config", "tiny", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["check"]["missing"] == ["blocks.1.modulation"]
