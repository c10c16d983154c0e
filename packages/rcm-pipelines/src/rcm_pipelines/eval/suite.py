"""The VBench prompt suites as work lists: prompts, images, file names, seeds and the split over ranks.

Facts this module follows (Vchitect/VBench, checked against the ``vbench`` 0.1.5 wheel):

* T2V prompts: ``vbench/VBench_full_info.json`` inside the ``vbench`` package: a list of
  ``{"prompt_en": str, "dimension": [str, ...], ...}``, 946 entries, 944 distinct prompts (two prompts
  appear under two dimension sets; they name the same files, so they are sampled once, dimensions merged).
  Its order equals VBench's ``prompts/all_dimension.txt``, and the Wan2.1 augmented prompt list
  ``prompts/augmented_prompts/Wan2.1-T2V-1.3B/all_dimension_aug_wanx_seed42.txt`` is aligned with it line by
  line, which is the ``.txt`` format `load_suite` accepts for augmented prompts.
* I2V (VBench++ / VBench-I2V): ``vbench2_beta_i2v/vbench2_i2v_full_info.json`` of the VBench repository
  (not shipped in the wheel: give its path), entries also carry ``"image_name"``; the images are the
  image suite's crops (``crop/{1-1,8-5,7-4,16-9}/<image_name>``, downloaded with the repository's
  ``vbench2_beta_i2v/download_data.sh``).
* File names: ``{prompt}-{index}.mp4`` with ``index`` in 0..4 (VBench ``prompts/README.md`` "Name the videos
  in the form of ``$prompt-$index.mp4``", and ``VBench.build_full_info_json`` looks up exactly
  ``f"{prompt}-{i}{postfix}"`` for ``i in range(5)``, taking ``postfix`` from the first file it lists, which
  is why the videos directory must hold nothing but the videos). The *original* prompt names the file even
  when an augmented prompt was sampled (vbench matches names against its own prompt list).

Seeds: sample ``s`` of the prompt at position ``p`` of the suite file gets ``seed + 1000 * p + s``, whatever
the subset, the number of ranks or the resume state, so any video can be regenerated alone
(``generate.py --seed=<that seed> --num_samples=1`` with the same settings draws the same noise).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MAX_SAMPLES",
    "SuiteEntry",
    "Video",
    "find_vbench_file",
    "load_suite",
    "video_filename",
    "sample_seed",
    "rank_slice",
    "plan_videos",
]

MAX_SAMPLES = 1000
"""Samples per prompt are < this, so seeds of different (prompt, sample) pairs never collide."""
_VBENCH_T2V_FILE = ("vbench", "VBench_full_info.json")
_VBENCH_I2V_FILE = ("vbench2_beta_i2v", "vbench2_i2v_full_info.json")
_FILENAME_BYTES = 255  # longest file name of common file systems (ext4, xfs, NTFS in UTF-16 units)


@dataclass(frozen=True)
class SuiteEntry:
    """One prompt of a suite: ``index`` is its first position in the suite file (it drives the seeds)."""

    index: int
    prompt: str
    """The original prompt (names the files; what vbench scores against)."""
    text: str
    """What the text encoder reads: ``prompt`` or its augmented version."""
    dimensions: tuple[str, ...]
    image: Path | None = None
    """I2V: the conditioning image."""


@dataclass(frozen=True)
class Video:
    """One video to make: sample ``sample`` of ``entry``, written to ``path`` with noise seed ``seed``."""

    entry: SuiteEntry
    sample: int
    seed: int
    path: Path


def find_vbench_file(suite: str) -> Path:
    """The prompt file shipped inside the installed ``vbench`` package (T2V: ``VBench_full_info.json``;
    I2V: ``vbench2_i2v_full_info.json`` when present). Locates the package without importing it (its
    import pulls in its whole model stack)."""
    package, name = _VBENCH_T2V_FILE if suite == "t2v" else _VBENCH_I2V_FILE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no prompt file given and the '{package}' package is not installed in this environment: set "
            f"--prompt_file=PATH to {name} (from the VBench repository, github.com/Vchitect/VBench), or "
            "--score.python=PYTHON of the environment where vbench is installed (its package ships the T2V "
            "VBench_full_info.json)")
    for location in spec.submodule_search_locations:
        path = Path(location) / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"the installed '{package}' package has no {name}: set --prompt_file=PATH (the file is "
                            f"{package}/{name} in the VBench repository)")


def _read_augmented(path: Path, raw: list[dict]) -> dict[str, str]:
    """``{original prompt: augmented}`` from a ``.json`` mapping or a ``.txt`` aligned with the suite file."""
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"augmented prompts {path}: a .json file must map each original prompt to its text")
        return data
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) != len(raw):
        raise ValueError(f"augmented prompts {path} has {len(lines)} lines but the suite file has {len(raw)} entries; "
                         "a .txt must have one line per suite entry, in the suite's order")
    out: dict[str, str] = {}
    for item, text in zip(raw, lines):
        if not text:
            raise ValueError(f"augmented prompts {path}: empty line for prompt {item['prompt_en']!r}")
        out.setdefault(item["prompt_en"], text)
    return out


def _check_name(prompt: str, where: str) -> None:
    if "/" in prompt or "\0" in prompt or not prompt.strip():
        raise ValueError(f"{where}: prompt {prompt!r} cannot name a file ({{prompt}}-{{index}}.mp4): it is empty or "
                         "holds '/' or NUL")
    if len(video_filename(prompt, MAX_SAMPLES - 1).encode("utf-8")) > _FILENAME_BYTES:
        raise ValueError(f"{where}: prompt {prompt[:60]!r}... is too long to name a file ({{prompt}}-{{index}}.mp4 "
                         f"must stay within {_FILENAME_BYTES} bytes)")


def load_suite(path: str | Path | None, *, suite: str = "t2v", dimensions: Sequence[str] = (),
               augmented: str | Path | None = None, image_dir: str | Path | None = None) -> list[SuiteEntry]:
    """The prompts of a VBench info file (``None``: the installed package's), in file order, one entry per
    distinct prompt (dimensions merged), keeping those that belong to any of ``dimensions`` (all when
    empty). ``augmented``: texts to sample instead of the prompts (see `_read_augmented`); ``image_dir``:
    I2V images (each entry's ``image_name`` must exist there)."""
    file = Path(path) if path is not None else find_vbench_file(suite)
    if not file.is_file():
        raise FileNotFoundError(f"prompt file {file} does not exist (--prompt_file)")
    raw = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(raw, list) or not all(isinstance(x, dict) and isinstance(x.get("prompt_en"), str) for x in raw):
        raise ValueError(f"{file}: expected a list of {{'prompt_en': str, 'dimension': [...]}} entries (VBench format)")
    aug = _read_augmented(Path(augmented), raw) if augmented is not None else None
    if suite == "i2v" and image_dir is None:
        raise ValueError("the I2V suite needs image_dir (the folder of the image suite's crops, e.g. crop/16-9)")
    first: dict[str, int] = {}
    dims: dict[str, list[str]] = {}
    images: dict[str, str | None] = {}
    for i, item in enumerate(raw):
        prompt = item["prompt_en"]
        _check_name(prompt, f"{file} entry {i}")
        first.setdefault(prompt, i)
        dims.setdefault(prompt, [])
        dims[prompt] += [d for d in item.get("dimension", []) if d not in dims[prompt]]
        if suite == "i2v":
            if not isinstance(item.get("image_name"), str):
                raise ValueError(f"{file} entry {i} ({prompt!r}) has no 'image_name': not an I2V suite file")
            if images.setdefault(prompt, item["image_name"]) != item["image_name"]:
                raise ValueError(f"{file}: prompt {prompt!r} appears with two images")
    entries = []
    for prompt, i in first.items():
        if dimensions and not set(dimensions) & set(dims[prompt]):
            continue
        if aug is not None and prompt not in aug:
            raise ValueError(f"augmented prompts {augmented} have no text for prompt {prompt!r}")
        image = None
        if suite == "i2v":
            image = Path(image_dir) / images[prompt]
            if not image.is_file():
                raise FileNotFoundError(f"I2V image {image} (for prompt {prompt!r}) does not exist (--image_dir)")
        entries.append(SuiteEntry(i, prompt, aug[prompt] if aug is not None else prompt, tuple(dims[prompt]), image))
    if not entries:
        raise ValueError(f"{file}: no prompt belongs to the dimensions {list(dimensions)}")
    return entries


def video_filename(prompt: str, sample: int, ext: str = ".mp4") -> str:
    """``{prompt}-{sample}{ext}``: the name vbench looks up (module docstring)."""
    return f"{prompt}-{sample}{ext}"


def sample_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The noise seed of sample ``sample`` of the prompt at position ``prompt_index`` of the suite file."""
    if not 0 <= sample < MAX_SAMPLES:
        raise ValueError(f"sample index {sample} must lie in [0, {MAX_SAMPLES})")
    return seed + MAX_SAMPLES * prompt_index + sample


def rank_slice(items: Sequence, rank: int, world: int) -> list:
    """Items ``rank, rank + world, ...``: disjoint over ranks, covering all, balanced to within one."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} must lie in [0, world size {world})")
    return list(items[rank::world])


def plan_videos(entries: Sequence[SuiteEntry], videos_dir: str | Path, *, samples: int, seed: int,
                ext: str = ".mp4") -> list[Video]:
    """Every video of ``entries``: ``samples`` per prompt, in entry order then sample order."""
    if not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples per prompt must lie in [1, {MAX_SAMPLES}], got {samples}")
    d = Path(videos_dir)
    return [Video(e, s, sample_seed(seed, e.index, s), d / video_filename(e.prompt, s, ext))
            for e in entries for s in range(samples)]
