"""Webdataset shards of latents, text embeddings and prompts (docs/train.md, data): writer and loader.

Each sample is three tar members sharing a 9-digit key: ``{key}.latent.pt`` (``torch.save`` of the
normalized VAE latent ``[C, T, H, W]``), ``{key}.embed.pt`` (umT5 embedding ``[L, D]``), ``{key}.prompt.txt``
(UTF-8). Shards are ``shard_{id:06d}.tar``.

Loader: every epoch the shard list is permuted with a seed shared by all ranks; reader ``r`` of ``R``
(``R = data-parallel ranks x workers``) takes shards ``r, r + R, ...`` — disjoint across ranks and workers and
covering the epoch. Each reader shuffles samples in a buffer, decodes with ``torch.load(weights_only=True)``
and batches; streams are infinite by default (epochs follow each other inside a reader), which makes the
position a single counter per rank: :class:`ShardLoader` is a DCP Stateful and resumes exactly. A corrupt
or truncated member raises :class:`CorruptDataError` naming the shard and key; ``on_error="skip"`` counts,
logs and goes on. Every sample's latent and embedding shapes are checked against the first one's (a shard of
another resolution raises naming shard and key, or is skipped), so a batch never mixes shapes.
"""

from __future__ import annotations

import glob
import io
import itertools
import logging
import os
import random
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import webdataset as wds
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

__all__ = ["DataConfig", "CorruptDataError", "ShardLoader", "ShardWriter", "DeviceData", "decode_sample", "MEMBERS",
           "expand_shards", "resolve_shards", "first_samples"]

log = logging.getLogger(__name__)

MEMBERS = ("latent.pt", "embed.pt", "prompt.txt")


class CorruptDataError(RuntimeError):
    """A shard or sample that cannot be read; the message names the shard and the sample key."""


class DataConfig(BaseModel):
    """Training data: webdataset shards of latents + text embeddings."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    shards: str | list[str]
    """Shard files: a glob pattern (e.g. data/shard_*.tar) or an explicit list."""
    batch_size: int = Field(1, ge=1)
    """Samples per batch per data-parallel rank."""
    num_workers: int = Field(2, ge=0)
    """DataLoader worker processes per rank (each reads its own shards)."""
    shuffle_buffer: int = Field(1000, ge=1)
    """Sample shuffle buffer per reader (1 disables sample shuffling; shards are always permuted)."""
    seed: int = 0
    """Seed of the shard permutation and of the shuffle buffers."""
    max_epochs: int | None = Field(None, ge=1)
    """Stop after this many epochs (None: infinite stream, as training wants)."""
    num_frames: int | None = Field(None, ge=1)
    """Keep only the first this-many latent frames (e.g. 20 for the 1.3B recipe)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Corrupt or truncated data: raise CorruptDataError, or skip it (counted and logged)."""
    prefetch_factor: int = Field(2, ge=1)
    """Batches prefetched per worker."""
    pin_memory: bool = False
    """Pin batches in page-locked memory (for CUDA training)."""


# ------------------------------------------------------------------------------------------ decoding
def _load_tensor(data: bytes, where: str) -> Tensor:
    try:
        value = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise CorruptDataError(f"{where}: cannot be loaded ({type(e).__name__}: {e})") from e
    if not isinstance(value, Tensor):
        raise CorruptDataError(f"{where}: expected a tensor, got {type(value).__name__}")
    return value


def decode_sample(sample: Mapping[str, Any], num_frames: int | None = None) -> dict[str, Any]:
    """Raw members (as grouped by webdataset) -> ``{"key", "latent" [C,T,H,W], "embed" [L,D], "prompt"}``."""
    key, url = sample.get("__key__"), sample.get("__url__")
    missing = [m for m in MEMBERS if m not in sample]
    if missing:
        raise CorruptDataError(f"shard {url}: sample {key} lacks members {missing} (truncated shard?)")
    latent = _load_tensor(sample["latent.pt"], f"shard {url}: {key}.latent.pt")
    embed = _load_tensor(sample["embed.pt"], f"shard {url}: {key}.embed.pt")
    if latent.dim() != 4 or embed.dim() != 2:
        raise CorruptDataError(f"shard {url}: sample {key} has latent {tuple(latent.shape)} / embed "
                               f"{tuple(embed.shape)}, expected [C, T, H, W] / [L, D]")
    try:
        prompt = sample["prompt.txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptDataError(f"shard {url}: {key}.prompt.txt is not UTF-8 ({e})") from e
    if num_frames is not None:
        if latent.shape[1] < num_frames:
            raise CorruptDataError(f"shard {url}: sample {key} has {latent.shape[1]} latent frames < {num_frames}")
        latent = latent[:, :num_frames]
    return {"key": key, "latent": latent, "embed": embed, "prompt": prompt}


def _collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"latent": torch.stack([s["latent"] for s in samples]),  # [B, C, T, H, W]
            "embed": torch.stack([s["embed"] for s in samples]),  # [B, L, D]
            "prompt": [s["prompt"] for s in samples], "key": [s["key"] for s in samples]}


# ------------------------------------------------------------------------------------------ reading
def _shard_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard (members grouped by key, as webdataset groups them); a truncated / corrupt tar
    raises CorruptDataError after yielding every complete sample before the damage."""
    current: dict[str, Any] = {}
    try:
        with open(url, "rb") as f:
            for member in tar_file_iterator(f):
                key, ext = base_plus_ext(member["fname"])
                if current and current["__key__"] != key:
                    yield current
                    current = {}
                current.setdefault("__key__", key)
                current["__url__"] = url
                current[ext] = member["data"]
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        last = current.get("__key__")
        if current and all(m in current for m in MEMBERS):
            yield current
        raise CorruptDataError(f"shard {url}: unreadable {f'at or after sample {last}' if last else 'at its start'} "
                               f"({type(e).__name__}: {e})") from e
    if current:
        yield current


class _Readers(IterableDataset):
    """The per-worker sample stream (see the module docstring). Emits batches tagged with the logical worker."""

    def __init__(self, shards: list[str], config: DataConfig, rank: int, world_size: int, consumed: int):
        self.shards, self.cfg, self.rank, self.world, self.consumed = shards, config, rank, world_size, consumed
        self.skipped = 0
        self._shapes: tuple[tuple[int, ...], tuple[int, ...], str] | None = None  # latent, embed, where

    def _check_shapes(self, sample: dict[str, Any], url: str) -> None:
        shapes = (tuple(sample["latent"].shape), tuple(sample["embed"].shape))
        if self._shapes is None:
            self._shapes = (*shapes, f"shard {url}: sample {sample['key']}")
        elif shapes != self._shapes[:2]:
            raise CorruptDataError(f"shard {url}: sample {sample['key']} has latent {shapes[0]} / embed {shapes[1]}, "
                                   f"but {self._shapes[2]} has latent {self._shapes[0]} / embed {self._shapes[1]} "
                                   "(shards of different configurations?)")

    def _samples(self, reader: int, readers: int) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        for epoch in itertools.count():
            if cfg.max_epochs is not None and epoch >= cfg.max_epochs:
                return
            order = list(self.shards)
            random.Random(f"{cfg.seed}/{epoch}").shuffle(order)
            raw = itertools.chain.from_iterable(self._guarded(u) for u in order[reader::readers])
            if cfg.shuffle_buffer > 1:
                rng = random.Random(f"{cfg.seed}/{epoch}/{reader}")
                raw = wds.shuffle(cfg.shuffle_buffer, min(100, cfg.shuffle_buffer), rng=rng)(raw)
            for s in raw:
                try:
                    sample = decode_sample(s, cfg.num_frames)
                    self._check_shapes(sample, s.get("__url__"))
                except CorruptDataError as e:
                    self._skip(e)
                    continue
                yield sample

    def _guarded(self, url: str) -> Iterator[dict[str, Any]]:
        try:
            yield from _shard_samples(url)
        except CorruptDataError as e:
            self._skip(e)

    def _skip(self, error: CorruptDataError) -> None:
        if self.cfg.on_error == "raise":
            raise error
        self.skipped += 1
        log.warning("skipping corrupt data (%d so far in this reader): %s", self.skipped, error)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        logical = (wid + self.consumed) % nw  # resume: physical worker 0 continues where the stream stopped
        readers = self.world * nw
        if len(self.shards) < readers:
            raise ValueError(f"{len(self.shards)} shards cannot feed {self.world} ranks x {nw} workers disjointly: "
                             "use fewer workers or more shards")
        skip = max(0, -(-(self.consumed - logical) // nw))  # batches this logical worker already delivered
        samples = self._samples(self.rank * nw + logical, readers)
        bs = self.cfg.batch_size
        for b, batch in enumerate(iter(lambda: list(itertools.islice(samples, bs)), [])):
            if b >= skip:
                yield {**_collate(batch), "_worker": logical, "_skipped": self.skipped}


def expand_shards(spec: str | list[str]) -> list[str]:
    """Existing shard paths from a glob pattern or a list of paths/patterns (each entry expanded and sorted)."""
    entries = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for e in entries:
        out += sorted(glob.glob(e))  # a literal path matches itself when it exists
    return out


class ShardLoader:
    """Batches for one data-parallel rank: ``{"latent" [B,C,T,H,W], "embed" [B,L,D], "prompt", "key"}``.

    A DCP Stateful: its position (batches delivered) is saved per rank and restored exactly, provided the
    shards, batch size, worker count and world size are unchanged. ``skipped`` counts corrupt samples /
    shards skipped under ``on_error="skip"`` (summed over workers).
    """

    def __init__(self, config: DataConfig, *, rank: int | None = None, world_size: int | None = None):
        shards = expand_shards(config.shards)
        if not shards:
            raise FileNotFoundError(f"no shards match {config.shards!r}")
        self.cfg, self.shards = config, shards
        init = dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if init else 0)
        self.world = world_size if world_size is not None else (dist.get_world_size() if init else 1)
        self.batches = 0
        self._skipped: dict[int, int] = {}

    @property
    def skipped(self) -> int:
        return sum(self._skipped.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        dataset = _Readers(self.shards, cfg, self.rank, self.world, self.batches)
        loader = DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                            prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None)
        first: tuple[torch.Size, torch.Size, list[str]] | None = None
        for batch in loader:
            self._skipped[batch.pop("_worker")] = batch.pop("_skipped")
            shapes = (batch["latent"].shape[1:], batch["embed"].shape[1:])
            if first is None:
                first = (*shapes, batch["key"])
            elif shapes != first[:2]:  # readers (workers) each checked their own samples; compare across them
                raise CorruptDataError(f"samples {batch['key']} have latent {tuple(shapes[0])} / embed "
                                       f"{tuple(shapes[1])}, but samples {first[2]} have {tuple(first[0])} / "
                                       f"{tuple(first[1])} (shards of different configurations in {cfg.shards!r}?)")
            self.batches += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {f"rank{self.rank}": {"batches": self.batches, "workers": self.cfg.num_workers,
                                     "world": self.world, "shards": len(self.shards)}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = state[f"rank{self.rank}"]
        now = {"workers": self.cfg.num_workers, "world": self.world, "shards": len(self.shards)}
        then = {k: mine[k] for k in now}
        if then != now:
            raise ValueError(f"cannot resume the data position exactly: saved with {then}, now {now}")
        self.batches = int(mine["batches"])


# ------------------------------------------------------------------------------------------ writing
def _tensor_bytes(t: Tensor) -> bytes:
    buf = io.BytesIO()
    torch.save(t.detach().cpu().contiguous().clone(), buf)
    return buf.getvalue()


def _recover(tmp: Path) -> list[dict[str, Any]]:
    """Complete samples (all members, full data) at the start of a partially written shard."""
    groups: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(tmp, "r:") as tf:
            for m in tf:
                data = tf.extractfile(m).read() if m.isreg() else None
                if data is None or len(data) != m.size:
                    break
                key, ext = m.name.split(".", 1)
                groups.setdefault(key, {"__key__": key})[ext] = data
    except (tarfile.TarError, OSError, EOFError):
        pass  # truncated at the crash: keep what came before
    return [g for g in groups.values() if all(m in g for m in MEMBERS)]


class ShardWriter:
    """Atomic, resumable writer of ``num_samples`` samples into shards of ``samples_per_shard``.

    Sample ``i`` goes to shard ``i // samples_per_shard``; rank ``r`` of ``world_size`` owns shards with
    ``id % world_size == r``. A shard is written to ``shard_X.tar.tmp`` (each sample flushed and fsynced) and
    renamed to ``shard_X.tar`` when complete. After a crash, :meth:`pending` lists only the samples still
    missing: finished shards are skipped and the complete samples of a ``.tmp`` are kept. Use as::

        with ShardWriter(out, n, 256, rank=r, world_size=w) as writer:
            for i in writer.pending():
                writer.write(i, latent, embed, prompt)
    """

    def __init__(self, out_dir: str | os.PathLike, num_samples: int, samples_per_shard: int = 256, *,
                 rank: int = 0, world_size: int = 1):
        if num_samples < 1 or samples_per_shard < 1:
            raise ValueError(f"need num_samples >= 1 and samples_per_shard >= 1, got {num_samples}, {samples_per_shard}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n, self.per, self.rank, self.world = num_samples, samples_per_shard, rank, world_size
        self._open: tuple[int, Any, wds.TarWriter, int] | None = None  # shard id, file, writer, samples in it
        self._recovered: dict[int, list[dict[str, Any]]] = {}
        self._ref: tuple[tuple[int, ...], tuple[int, ...], str] | None = None  # shapes of an existing sample

    def _remember(self, sample: Mapping[str, Any], where: str) -> None:
        if self._ref is None:
            latent = _load_tensor(sample["latent.pt"], f"{where}.latent.pt")
            embed = _load_tensor(sample["embed.pt"], f"{where}.embed.pt")
            self._ref = (tuple(latent.shape), tuple(embed.shape), where)

    def path(self, shard: int) -> Path:
        return self.dir / f"shard_{shard:06d}.tar"

    def _tmp(self, shard: int) -> Path:
        return self.dir / f"shard_{shard:06d}.tar.tmp"

    def _indices(self, shard: int) -> range:
        return range(shard * self.per, min(self.n, (shard + 1) * self.per))

    def pending(self) -> list[int]:
        """Indices this rank still has to write, in order."""
        todo: list[int] = []
        for shard in range(self.rank, -(-self.n // self.per), self.world):
            if self.path(shard).exists():
                if self._ref is None:  # the shapes a finished shard was written with
                    first = next(_shard_samples(str(self.path(shard))), None)
                    if first is not None and all(m in first for m in MEMBERS):
                        self._remember(first, f"shard {self.path(shard)}: {first['__key__']}")
                continue
            tmp = self._tmp(shard)
            done = _recover(tmp) if tmp.exists() else []
            self._recovered[shard] = done
            if done:
                self._remember(done[0], f"shard {tmp}: {done[0]['__key__']}")
            keys = {s["__key__"] for s in done}
            missing = [i for i in self._indices(shard) if f"{i:09d}" not in keys]
            if not missing:  # crashed after the last sample, before the rename
                self._start(shard)
                self._close_open()
            todo += missing
        return todo

    def write(self, index: int, latent: Tensor, embed: Tensor, prompt: str) -> None:
        """Append sample ``index`` (``latent [C,T,H,W]``, ``embed [L,D]``) to its shard."""
        shard = index // self.per
        if shard % self.world != self.rank or not 0 <= index < self.n:
            raise ValueError(f"sample {index} is not owned by rank {self.rank} of {self.world}")
        if self._open is None or self._open[0] != shard:
            self._close_open()
            self._start(shard)
        _, f, writer, count = self._open
        shapes = (tuple(latent.shape), tuple(embed.shape))
        if self._ref is None:
            self._ref = (*shapes, f"shard {self.path(shard)}: {index:09d}")
        elif shapes != self._ref[:2]:
            raise ValueError(f"sample {index} has latent {shapes[0]} / embed {shapes[1]}, but {self._ref[2]} has "
                             f"{self._ref[0]} / {self._ref[1]}: resuming a build with another configuration? "
                             f"(use a new output directory)")
        writer.write({"__key__": f"{index:09d}", "latent.pt": _tensor_bytes(latent),
                      "embed.pt": _tensor_bytes(embed), "prompt.txt": prompt.encode("utf-8")})
        f.flush()
        os.fsync(f.fileno())
        self._open = (shard, f, writer, count + 1)
        if count + 1 == len(self._indices(shard)):
            self._close_open()

    def _start(self, shard: int) -> None:
        tmp = self._tmp(shard)
        kept = self._recovered.pop(shard, None)
        if kept is None:
            kept = _recover(tmp) if tmp.exists() else []
        fresh = tmp.with_suffix(".tmp.new")
        f = open(fresh, "wb")
        writer = wds.TarWriter(f, encoder=False)
        for sample in kept:  # rewrite the complete samples of a crashed attempt (drops a torn tail)
            writer.write(sample)
        f.flush()
        os.fsync(f.fileno())
        os.replace(fresh, tmp)
        self._open = (shard, f, writer, len(kept))

    def _close_open(self) -> None:
        if self._open is None:
            return
        shard, f, writer, count = self._open
        self._open = None
        writer.close()  # end-of-archive blocks (the file object stays ours)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        tmp = self._tmp(shard)
        if count == len(self._indices(shard)):
            os.replace(tmp, self.path(shard))

    def close(self) -> None:
        """Close the open shard (renamed only if complete; otherwise kept as .tmp for a later resume)."""
        self._close_open()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def resolve_shards(config: DataConfig) -> DataConfig:
    """``config`` with ``shards`` as an explicit sorted file list (every entry expanded); raises naming the
    patterns when none matches."""
    files = sorted(set(expand_shards(config.shards)))
    if not files:
        raise FileNotFoundError(f"no shard file matches data.shards={config.shards}")
    return config.model_copy(update={"shards": files})


def first_samples(config: DataConfig, n: int) -> dict[str, Any]:
    """The first ``n`` samples of the data in file order (for periodic samples on fixed prompts):
    ``embed [n, L, D]``, ``prompt`` (n strings) and ``latent [n, C, T, H, W]`` on CPU."""
    one = config.model_copy(update=dict(batch_size=1, num_workers=0, shuffle_buffer=1, max_epochs=1))
    samples = list(itertools.islice(ShardLoader(one, rank=0, world_size=1), n))
    if not samples:
        raise ValueError(f"no sample in {config.shards!r}")
    return {"embed": torch.cat([s["embed"] for s in samples]), "prompt": [s["prompt"][0] for s in samples],
            "latent": torch.cat([s["latent"] for s in samples])}


class DeviceData:
    """Batches of a :class:`ShardLoader` moved to ``device``; forwards the loader's (DCP Stateful) position."""

    def __init__(self, loader: ShardLoader, device: torch.device):
        self.loader, self.device = loader, device

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            yield {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state)
