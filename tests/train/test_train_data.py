"""Webdataset shards: atomic resumable writer, exact read-back, disjoint rank x worker split covering the
epoch, exact resume of the position, named errors (and the skip policy) for corrupt / truncated data."""

import io
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from rcm_train.data import CorruptDataError, DataConfig, ShardLoader, ShardWriter

N, PER = 24, 3  # 8 shards of 3 samples


def _sample(i):
    latent = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) + 1000 * i  # [C, T, H, W]
    return latent.bfloat16(), torch.full((4, 8), float(i)).bfloat16(), f"prompt {i} ✓"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    with ShardWriter(out, N, PER) as w:
        assert w.pending() == list(range(N))
        for i in w.pending():
            w.write(i, *_sample(i))
    return out


def _cfg(path, **kw):
    return DataConfig(shards=str(path / "shard_*.tar"), **{"num_workers": 0, "batch_size": 2, **kw})


def _keys(loader, n=None):
    out = []
    for b in loader:
        out.append(tuple(b["key"]))
        if n is not None and len(out) == n:
            break
    return out


def test_roundtrip_exact(shards):
    assert sorted(p.name for p in shards.iterdir()) == [f"shard_{s:06d}.tar" for s in range(N // PER)]
    loader = ShardLoader(_cfg(shards, max_epochs=1, shuffle_buffer=1, num_frames=2))
    seen = 0
    for batch in loader:
        assert batch["latent"].shape == (2, 2, 2, 2, 2) and batch["embed"].shape == (2, 4, 8)
        for j, key in enumerate(batch["key"]):
            latent, embed, prompt = _sample(int(key))
            assert torch.equal(batch["latent"][j], latent[:, :2]) and torch.equal(batch["embed"][j], embed)
            assert batch["prompt"][j] == prompt
            seen += 1
    assert seen == N and loader.batches == N // 2


def test_ranks_and_workers_read_disjoint_samples_covering_the_epoch(shards):
    per_rank = []
    for rank in range(2):
        loader = ShardLoader(_cfg(shards, max_epochs=1, num_workers=2, batch_size=3, shuffle_buffer=4),
                             rank=rank, world_size=2)
        per_rank.append([k for b in _keys(loader) for k in b])
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == N and sorted(everything) == [f"{i:09d}" for i in range(N)]
    assert len(per_rank[0]) == len(per_rank[1]) == N // 2


def test_resume_position_exactly(shards):
    """Infinite stream, 2 workers, shuffling: stop after 5 batches, restore the saved position in a new
    loader, and the next batches are those the uninterrupted loader gives."""
    cfg = _cfg(shards, num_workers=2, shuffle_buffer=5)
    straight = _keys(ShardLoader(cfg), 11)
    first = ShardLoader(cfg)
    head = _keys(first, 5)
    state = first.state_dict()
    again = ShardLoader(cfg)
    again.load_state_dict(state)
    assert head + _keys(again, 6) == straight
    assert len({k for b in straight for k in b}) > 2 * 5  # the stream crosses epochs (24 samples / epoch)
    with pytest.raises(ValueError, match="cannot resume the data position exactly"):
        ShardLoader(_cfg(shards, num_workers=1)).load_state_dict(state)


def _write_raw(path, members):
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as w:
        for m in members:
            w.write(m)


def _members(i, latent_bytes=None):
    buf = io.BytesIO()
    latent, embed, prompt = _sample(i)
    torch.save(latent, buf)
    lb = buf.getvalue() if latent_bytes is None else latent_bytes
    buf = io.BytesIO()
    torch.save(embed, buf)
    return {"__key__": f"{i:09d}", "latent.pt": lb, "embed.pt": buf.getvalue(), "prompt.txt": prompt.encode()}


class _NotATensor:
    pass


@pytest.mark.parametrize("bad, message", [
    (b"garbage bytes", "000000101.latent.pt: cannot be loaded"),
    ("pickle", "000000101.latent.pt: cannot be loaded"),  # weights_only=True refuses arbitrary objects
])
def test_corrupt_member_named_error_and_skip(tmp_path, bad, message):
    if bad == "pickle":
        buf = io.BytesIO()
        torch.save({"x": _NotATensor()}, buf)
        bad = buf.getvalue()
    _write_raw(tmp_path / "shard_000000.tar", [_members(100), _members(101, bad), _members(102)])
    _write_raw(tmp_path / "shard_000001.tar", [_members(103)])
    cfg = dict(batch_size=1, max_epochs=1, shuffle_buffer=1)
    with pytest.raises(CorruptDataError, match=f"shard .*shard_000000.tar: {message}"):
        list(ShardLoader(_cfg(tmp_path, **cfg)))
    if bad == b"garbage bytes":  # from a worker process too (once: a failed worker takes torch ~5 s to join)
        with pytest.raises(CorruptDataError, match="000000101.latent.pt"):
            list(ShardLoader(_cfg(tmp_path, num_workers=1, **cfg)))
    loader = ShardLoader(_cfg(tmp_path, on_error="skip", **cfg))
    assert sorted(k for b in _keys(loader) for k in b) == ["000000100", "000000102", "000000103"]
    assert loader.skipped == 1


def test_truncated_shard_named_error_and_skip(tmp_path):
    _write_raw(tmp_path / "shard_000000.tar", [_members(i) for i in range(3)])
    _write_raw(tmp_path / "shard_000001.tar", [_members(10)])
    path = tmp_path / "shard_000000.tar"
    with tarfile.open(path) as tf:
        cut = next(m.offset_data for m in tf if m.name == "000000002.latent.pt") + 100
    path.write_bytes(path.read_bytes()[:cut])  # inside the third sample's second member (members sort: embed, latent, prompt)
    cfg = dict(batch_size=1, max_epochs=1, shuffle_buffer=1)
    with pytest.raises(CorruptDataError, match=r"shard .*shard_000000.tar: unreadable at or after sample 000000002"):
        list(ShardLoader(_cfg(tmp_path, **cfg)))
    loader = ShardLoader(_cfg(tmp_path, on_error="skip", **cfg))
    assert sorted(k for b in _keys(loader) for k in b) == ["000000000", "000000001", "000000010"]
    assert loader.skipped == 1


def test_writer_resumes_after_a_crash(tmp_path):
    n = 5  # shards of 3: shard 0 = samples 0-2, shard 1 = samples 3-4
    done = tmp_path / "complete"
    with ShardWriter(done, n, PER) as w:
        for i in w.pending():
            w.write(i, *_sample(i))
    # the state a crash while writing sample 4 leaves: shard 0 finished, shard 1 a .tmp holding a prefix of
    # the bytes the writer produces (it appends sample by sample), torn inside sample 4's last member
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "shard_000000.tar").write_bytes((done / "shard_000000.tar").read_bytes())
    with tarfile.open(done / "shard_000001.tar") as tf:
        cut = next(m.offset_data for m in tf if m.name == "000000004.prompt.txt") + 1
    (crashed / "shard_000001.tar.tmp").write_bytes((done / "shard_000001.tar").read_bytes()[:cut])
    w2 = ShardWriter(crashed, n, PER)
    assert w2.pending() == [4]
    for i in w2.pending():
        w2.write(i, *_sample(i))
    w2.close()
    assert sorted(p.name for p in crashed.iterdir()) == ["shard_000000.tar", "shard_000001.tar"]
    with tarfile.open(crashed / "shard_000001.tar") as tf:
        assert sorted(m.name for m in tf) == [f"{i:09d}.{e}" for i in (3, 4) for e in ("embed.pt", "latent.pt", "prompt.txt")]
    loader = ShardLoader(DataConfig(shards=[str(crashed / "shard_000001.tar")], num_workers=0, batch_size=2,
                                    max_epochs=1, shuffle_buffer=1))
    batch = next(iter(loader))
    assert batch["key"] == ["000000003", "000000004"] and torch.equal(batch["latent"][1], _sample(4)[0])
    assert ShardWriter(crashed, n, PER).pending() == []


def test_writer_splits_shards_by_rank(tmp_path):
    w = ShardWriter(tmp_path, 10, 2, rank=1, world_size=2)
    assert w.pending() == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="not owned by rank 1"):
        w.write(0, *_sample(0))


def test_loader_config_errors(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="no shards match"):
        ShardLoader(DataConfig(shards=str(tmp_path / "none_*.tar")))
    with pytest.raises(ValueError, match="8 shards cannot feed 9 ranks x 1 workers"):
        next(iter(ShardLoader(_cfg(shards, num_workers=0), rank=0, world_size=9)))
    with pytest.raises(Exception, match="extra_forbidden|Extra inputs"):
        DataConfig(shards="x", batchsize=2)


def test_shards_of_other_shapes_are_named_not_stacked_or_mixed(tmp_path):
    """Before: a build resumed with another --size gave one shard of mixed latent shapes and training died in
    torch.stack naming no shard; a whole shard of other shapes trained silently."""
    with ShardWriter(tmp_path, 4, 2) as w:
        for i in (0, 1, 2):
            w.write(i, *_sample(i))
    small = torch.zeros(2, 3, 1, 1)  # [C, T, H, W] of another resolution
    with ShardWriter(tmp_path, 4, 2) as w:  # the build resumed with another configuration
        assert w.pending() == [3]
        with pytest.raises(ValueError, match=r"sample 3 has latent \(2, 3, 1, 1\) .* but shard .*shard_000000.tar: "
                                             r"000000000 has \(2, 3, 2, 2\).*another configuration"):
            w.write(3, small, _sample(3)[1], "p")
        w.write(3, *_sample(3))
    # a shard written with other shapes: the reader names the shard and key
    with ShardWriter(tmp_path / "other", 2, 2) as w:
        for i in w.pending():
            w.write(i, small, _sample(i)[1], "p")
    (tmp_path / "other" / "shard_000000.tar").rename(tmp_path / "shard_000009.tar")
    cfg = DataConfig(shards=str(tmp_path / "shard_*.tar"), num_workers=0, batch_size=1, shuffle_buffer=1,
                     max_epochs=1)
    with pytest.raises(CorruptDataError, match=r"shard .*shard_0000(00|01|09).tar: sample 00000000\d has latent "
                                               r"\(2, 3, (1, 1|2, 2)\).*but shard .*different configurations"):
        list(ShardLoader(cfg))
    skipped = ShardLoader(cfg.model_copy(update={"on_error": "skip"}))
    assert len(list(skipped)) == 4 and skipped.skipped == 2
