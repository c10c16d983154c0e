"""rcm-inspect: counts, dtypes and a strict comparison against named layouts."""

import json

import torch

from rcm_nets.wan import CLIPVisual, WanDiT, WanVAE
from rcm_pipelines.tools import ckpt_io, inspect_checkpoint


def _tiny_sd(prefix=""):
    torch.manual_seed(0)
    sd = WanDiT.from_config("tiny").state_dict()
    sd["head.head.weight"] = sd["head.head.weight"].to(torch.bfloat16)
    return {prefix + k: v for k, v in sd.items()}


def test_matching_checkpoint_with_prefix(tmp_path, capsys):
    sd = _tiny_sd("net.")
    path = ckpt_io.write(sd, tmp_path / "t.pth")
    assert inspect_checkpoint.main([str(path), "--config", "tiny", "--keys", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    n = sum(v.numel() for v in sd.values())
    assert f"{len(sd)} tensors, {n:,} parameters" in out
    assert "matches tiny after stripping 'net.'" in out
    assert "net.patch_embedding.weight  [64, 16, 1, 2, 2]  float32" in out
    assert f"... {len(sd) - 3} more" in out
    info = inspect_checkpoint.inspect(path)
    assert info["dtypes"]["bfloat16"] == sd["net.head.head.weight"].numel()
    assert sum(info["dtypes"].values()) == n == sum(info["modules"].values()) + 0
    assert info["bytes"] == sum(v.numel() * v.element_size() for v in sd.values())


def test_mismatch_is_listed_and_exit_status_1(tmp_path, capsys):
    path = ckpt_io.write(_tiny_sd(), tmp_path / "t.safetensors")
    assert inspect_checkpoint.main([str(path), "--config", "tiny-i2v", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)["check"]
    assert not report["ok"]
    assert any(k.startswith("img_emb.") for k in report["missing"])  # the CLIP branch of i2v
    assert any(k.startswith("patch_embedding.weight: file [64, 16") for k in report["mismatched"])  # in_dim 36


def test_encoder_layouts(tmp_path):
    """Tiny VAE / CLIP files have the released key layouts (only widths differ); CLIP's textual keys are
    outside the detected 'visual.' prefix."""
    vae = ckpt_io.write(WanVAE(dim=4).state_dict(), tmp_path / "vae.pth")
    rep = inspect_checkpoint.compare(inspect_checkpoint.inspect(vae), "vae")
    assert not rep["missing"] and not rep["unexpected"] and rep["mismatched"]
    clip = {f"visual.{k}": v for k, v in CLIPVisual(image_size=28, dim=32, num_heads=2, num_layers=32,
                                                     out_dim=8).state_dict().items()}
    clip["textual.token_embedding.weight"] = torch.zeros(2, 2)
    rep = inspect_checkpoint.compare(inspect_checkpoint.inspect(ckpt_io.write(clip, tmp_path / "c.pth")),
                                     "clip-vit-h-14")
    assert rep["prefix"] == "visual." and rep["ignored"] == ["textual.token_embedding.weight"]
    assert not rep["missing"] and not rep["unexpected"]
