"""The VBench harness's steps between the suite and the scores: where the prompt file is, the manifest, making
the videos of one rank, waiting for the other ranks, which dimensions to score and reading a baseline.

``recipes/eval_vbench.py`` strings them together (sample -> score -> report); each step is a plain function
of explicit arguments, so another driver (a cluster launcher, a notebook) can call them in its own order.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from ..pipeline import VideoPipeline
from ..progress import Progress
from .scores import Scores, aggregate, dimensions, load_results
from .suite import Video, find_vbench_file
from .videos import write_video_atomic

__all__ = ["SEED_RULE", "resolve_prompt_file", "write_manifest", "make_videos", "wait_for", "score_dimensions",
           "load_baseline"]

SEED_RULE = "seed + 1000 * prompt_index + sample"
"""How each video's seed is derived (stored in the manifest and the report)."""


def resolve_prompt_file(suite: str, prompt_file: str | None, score_python: str | None) -> Path:
    """``prompt_file`` if given, else the ``vbench`` package's own suite file, found in this environment or, by
    asking that interpreter (without importing vbench), in ``score_python``'s."""
    if prompt_file is not None:
        return Path(prompt_file)
    try:
        return find_vbench_file(suite)
    except FileNotFoundError:
        if score_python is None:
            raise
    code = ("import importlib.util as u; s = u.find_spec('vbench'); "
            "print(list(s.submodule_search_locations)[0] if s else '')")
    found = subprocess.run([score_python, "-c", code], capture_output=True, text=True).stdout.strip()
    path = Path(found) / "VBench_full_info.json" if found and suite == "t2v" else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no prompt file: set --prompt_file (score.python={score_python} has no "
                                "vbench/VBench_full_info.json)")
    return path


def write_manifest(videos: Sequence[Video], path: Path, *, suite: str) -> None:
    """``manifest.json``: every planned video with its prompt, the text sampled, its seed and dimensions."""
    rows = [{"file": v.path.name, "prompt": v.entry.prompt, "text": v.entry.text, "sample": v.sample,
             "seed": v.seed, "prompt_index": v.entry.index, "dimensions": list(v.entry.dimensions),
             "image": str(v.entry.image) if v.entry.image else None} for v in videos]
    path.write_text(json.dumps({"suite": suite, "seed_rule": SEED_RULE, "videos": rows}, indent=1,
                               ensure_ascii=False) + "\n")


def make_videos(pipe: VideoPipeline, todo: Sequence[Video], texts: Sequence[str], embeds, negative, *,
                tmp_dir: Path, fps: int, rank: int = 0, world: int = 1) -> list[Path]:
    """Sample and write ``todo`` one video at a time, atomically (``tmp_dir`` then a rename); ``embeds[i]`` is
    the embedding of ``texts[i]``. The image condition is computed once per prompt. Returns the paths written."""
    row = {t: i for i, t in enumerate(texts)}
    cond, cond_of, written = None, None, []
    with Progress(len(todo), f"[rank {rank}/{world}] videos", unit="video", position=rank) as bar:
        for v in todo:
            if cond_of != v.entry.index:
                cond, cond_of = pipe.condition(v.entry.image), v.entry.index
            i = row[v.entry.text]
            latent = pipe.latent(embeds[i : i + 1], negative, cond, v.seed)
            written.append(write_video_atomic(pipe.decode(latent)[0], v.path, tmp_dir, fps=fps))
            bar.update()
    return written


def wait_for(paths: Sequence[Path], timeout_s: float, poll_s: float = 30.0) -> None:
    """Block until every path exists (the other ranks' videos), printing progress; error after ``timeout_s``."""
    start = time.monotonic()
    while True:
        missing = sum(not p.is_file() for p in paths)
        if not missing:
            return
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{missing} of {len(paths)} videos still missing after {timeout_s:.0f} s "
                               "(wait_timeout_s): did another rank fail? Rerun --stage=sample to resume")
        print(f"[rank 0] waiting for {missing}/{len(paths)} videos of the other ranks", flush=True)
        time.sleep(poll_s)


def score_dimensions(suite: str, sampled: Sequence[str], requested: Sequence[str]) -> list[str]:
    """What to score: ``requested`` if given, else the suite's dimensions (only the ``sampled`` ones when the
    suite was filtered); temporal_flickering only for T2V."""
    dims = list(requested) or [d for d in dimensions(suite) if not sampled or d in sampled]
    return [d for d in dims if d != "temporal_flickering" or suite == "t2v"]


def load_baseline(path: str | Path, suite: str) -> Scores:
    """A baseline's scores: a run directory (its ``vbench_scores.json`` or ``vbench_results/``), the json, or a
    folder of vbench result files."""
    p = Path(path)
    if p.is_dir() and (p / "vbench_scores.json").is_file():
        p = p / "vbench_scores.json"
    if p.is_file() and p.name == "vbench_scores.json":
        return Scores.from_dict(json.loads(p.read_text())["scores"])
    if p.is_dir() and (p / "vbench_results").is_dir():
        p = p / "vbench_results"
    return aggregate(load_results(p), suite)
