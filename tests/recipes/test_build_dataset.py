"""recipes/build_dataset.py: teacher samples into webdataset shards, split over ranks, resumable, read back by
rcm_train's loader; a stored latent equals a direct Euler + CFG sampling of the same files."""

import _fixtures
import build_dataset
import pytest
import torch

from rcm_losses import flow_euler_sample
from rcm_nets.checkpoint import load_checkpoint
from rcm_nets.wan import Tokenizer, UMT5Encoder, WanDiT
from rcm_recipes.config import field_paths
from rcm_train.data import DataConfig, ShardLoader

_one_thread, assets = _fixtures._one_thread, _fixtures.assets  # shared pytest fixtures (module scope)


def _args(assets, out):
    return [*[f for f in assets.component_flags() if not f.startswith("--vae.")], f"--prompt_file={assets.prompts}",
            f"--output_dir={out}", "--samples_per_shard=2", "--repeat=2", "--batch_size=2", "--dit.config=tiny",
            f"--dit.path={assets.t2v}", "--num_steps=3", "--size=[32,32]", "--num_frames=5", "--device=cpu",
            "--negative_prompt=static blurry"]


def _read(out):
    cfg = DataConfig(shards=str(out / "shard_*.tar"), batch_size=1, num_workers=0, shuffle_buffer=1, max_epochs=1)
    return {b["key"][0]: b for b in ShardLoader(cfg, rank=0, world_size=1)}


def test_help_and_bad_field(capsys):
    with pytest.raises(SystemExit):
        build_dataset.main(["--help"])
    text = capsys.readouterr().out
    for path in field_paths(build_dataset.BuildDatasetConfig):
        if path not in ("dit", "text_encoder"):
            assert f"--{path} " in text or f"--{path}\n" in text, path
    with pytest.raises(SystemExit) as e:
        build_dataset.main(["--samples_per_shrad=3"])
    assert e.value.code == 2
    assert "did you mean 'samples_per_shard'" in capsys.readouterr().err


def test_two_ranks_resume_and_loader(assets, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    res = build_dataset.main(_args(assets, out))
    # 3 prompts x 2 = 6 samples, 2 per shard: shards 0, 1, 2; rank 0 of 2 owns shards 0 and 2
    assert res["written"] == 4 and [p.name for p in res["shards"]] == ["shard_000000.tar", "shard_000002.tar"]
    assert (out / "negative_embed.pt").is_file() and (out / "build_config.yaml").is_file()
    monkeypatch.setenv("RANK", "1")
    assert build_dataset.main(_args(assets, out))["written"] == 2
    first = _read(out)
    assert sorted(first) == [f"{i:09d}" for i in range(6)]

    prompts = [ln.strip() for ln in assets.prompts.read_text().splitlines() if ln.strip()] * 2
    for i, key in enumerate(sorted(first)):
        b = first[key]
        assert b["prompt"] == [prompts[i]]
        assert b["latent"].shape == (1, 16, 2, 4, 4) and b["latent"].dtype == torch.bfloat16
        assert b["embed"].shape == (1, 16, 32) and b["embed"].dtype == torch.bfloat16

    # reference for sample 3: its own seed (0 + 3), Euler with CFG against the stored negative embedding
    tok, enc = Tokenizer(assets.tokenizer, max_length=16), UMT5Encoder(**assets.t5_arch).eval()
    load_checkpoint(enc, assets.t5)
    with torch.no_grad():
        emb = enc(*tok([prompts[3], "static blurry"]))
    torch.testing.assert_close(first[f"{3:09d}"]["embed"][0], emb[0].to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(torch.load(out / "negative_embed.pt"), emb[1].to(torch.bfloat16), rtol=0, atol=0)
    net = WanDiT.from_config("tiny")
    load_checkpoint(net, assets.t2v)
    noise = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator().manual_seed(3))
    want = flow_euler_sample(net.eval(), noise, emb[:1], emb[1:], guidance=5.0, num_steps=3, shift=3.0,
                             sigma_max=5000.0, input_dtype=torch.float32)
    # bf16 storage: half an ulp of bf16 (2^-9 relative) is the only difference
    torch.testing.assert_close(first[f"{3:09d}"]["latent"].float(), want.float(), rtol=2**-8, atol=1e-6)

    # resume: a finished shard is kept, a lost one is rebuilt, a complete .tmp (crash before the rename) is
    # renamed without sampling again
    (out / "shard_000001.tar").unlink()
    (out / "shard_000002.tar").rename(out / "shard_000002.tar.tmp")
    assert build_dataset.main(_args(assets, out))["written"] == 2  # rank 1: shard 1 only
    monkeypatch.setenv("RANK", "0")
    assert build_dataset.main(_args(assets, out))["written"] == 0  # rank 0: nothing to sample
    assert not (out / "shard_000002.tar.tmp").exists()
    again = _read(out)
    assert sorted(again) == sorted(first)
    for k in first:  # deterministic: a rebuilt shard holds the same tensors
        assert torch.equal(again[k]["latent"], first[k]["latent"]) and torch.equal(again[k]["embed"], first[k]["embed"])


def test_resume_with_another_build_config_is_refused(assets, tmp_path, capsys):
    """Before: a build killed mid-shard and resumed with another --size wrote one shard of mixed latent shapes
    and exited 0; batch_size=0 crashed after files were written."""
    from rcm_recipes.rundir import RunConfigMismatch

    out = tmp_path / "ds"
    with pytest.raises(SystemExit):
        build_dataset.main(_args(assets, out) + ["--batch_size=0"])
    assert "field 'batch_size': Input should be greater than or equal to 1" in capsys.readouterr().err
    assert not out.exists()
    build_dataset.main(_args(assets, out) + ["--repeat=1"])
    (out / "shard_000001.tar").unlink()  # as if killed while writing the last shard
    stored = (out / "build_config.yaml").read_bytes()
    with pytest.raises(RunConfigMismatch, match=r"size: \[32, 32\] -> \[64, 32\]"):
        build_dataset.main(_args(assets, out) + ["--repeat=1", "--size=[64,32]"])
    assert (out / "build_config.yaml").read_bytes() == stored
    # what may change (batch size, device) does not stop the resume
    res = build_dataset.main(_args(assets, out) + ["--repeat=1", "--batch_size=1"])
    assert res["written"] == 1 and (out / "shard_000001.tar").is_file()
    assert sorted(p.name for p in (out / "attempts").iterdir()) == ["001.yaml", "002.yaml"]
