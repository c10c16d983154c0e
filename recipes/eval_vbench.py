"""VBench evaluation: sample the VBench prompt suite with any sampler, score it with `vbench`, aggregate.

    # sample on 8 GPUs (each rank a disjoint slice of the prompts; rerun to resume), then score and report
    torchrun --nproc_per_node=8 recipes/eval_vbench.py --preset teacher-t2v-1.3B --stage=sample
    uv run recipes/eval_vbench.py --preset teacher-t2v-1.3B --stage=score --score.python=~/vbench-env/bin/python
    torchrun --nproc_per_node=8 recipes/eval_vbench.py --preset rcm-t2v-1.3B --stage=sample
    uv run recipes/eval_vbench.py --preset rcm-t2v-1.3B --stage=score --score.python=~/vbench-env/bin/python
    # (--stage=all does the three in one command; under torchrun rank 0 waits for the other ranks' videos)

Stages: ``sample`` writes ``<output_dir>/videos/{prompt}-{index}.mp4`` (VBench's layout: nothing else in that
folder), seeds ``seed + 1000 * prompt_position + index`` (positions in the suite file), one video at a time,
atomically (temp file outside ``videos/``, then a rename), skipping videos that exist; ``manifest.json``
lists every video with its prompt, the text sampled and its seed. ``score`` runs the `vbench` package (in its
own environment, ``--score.python``) into ``<output_dir>/vbench_results/``. ``report`` aggregates those results
into Quality / Semantic / Total (VBench's normalization and weights), prints the table and writes
``vbench_scores.{json,txt,png}``, with deltas to ``--baseline`` (the teacher's output_dir, scored by this same
harness). ``all`` = sample, score, report.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Literal

from pydantic import model_validator
from tqdm import tqdm

from rcm_kernels.devices import resolve_device
from rcm_pipelines.components import (
    CLIPSpec,
    DiTSpec,
    DType,
    TextEncoderSpec,
    VAESpec,
    dit_config,
    resolve_dtype,
)
from rcm_pipelines.eval.score import ScoreSpec, run_vbench
from rcm_pipelines.eval.scores import Scores, aggregate, dimensions, format_table, load_results, write_report
from rcm_pipelines.eval.suite import SuiteEntry, Video, find_vbench_file, load_suite, plan_videos, rank_slice
from rcm_pipelines.eval.videos import write_video_atomic
from rcm_pipelines.pipeline import SamplerSpec, VideoPipeline, VideoSpec, encode_texts
from rcm_pipelines.timing import StageTimer
from rcm_recipes.config import RecipeConfig, parse_config, run_main, write_config
from rcm_train.runtime import launch_rank_world


class EvalVBenchConfig(RecipeConfig):
    """Sample the VBench prompt suite (T2V or I2V), score it with vbench and report Quality / Semantic / Total."""

    stage: Literal["all", "sample", "score", "report"] = "all"
    """sample: make the videos (torchrun: ranks split the prompts); score: run vbench; report: aggregate."""
    suite: Literal["t2v", "i2v"] = "t2v"
    """VBench T2V (16 dimensions) or VBench-I2V (image suite; needs prompt_file and image_dir)."""
    prompt_file: str | None = None
    """VBench info JSON (VBench_full_info.json / vbench2_i2v_full_info.json); None: the vbench package's own
    (found in this environment or in score.python's)."""
    dimensions: list[str] = []
    """Sample (and score) only the prompts of these dimensions (empty: the whole suite)."""
    augmented_prompts: str | None = None
    """Sample augmented prompts: a .txt with one line per suite entry in file order (VBench's
    all_dimension_aug_wanx_seed42.txt) or a .json {original: augmented}; files keep the original names."""
    image_dir: str | None = None
    """I2V: folder of the image suite's crops for the video aspect ratio (e.g. .../crop/16-9)."""
    samples_per_prompt: int = 5
    """Videos per prompt (vbench reads indices 0..4; VBench asks for 25 for temporal_flickering only with its
    static filter, which this harness does not run)."""
    max_prompts: int | None = None
    """Only the first N prompts of the (filtered) suite (smoke runs; not a VBench number)."""
    seed: int = 0
    """Base seed: video (p, s) uses seed + 1000 p + s (p = the prompt's position in the suite file)."""
    sampler: SamplerSpec = SamplerSpec()
    """The sampler (rcm / euler / unipc / causal) and its settings."""
    video: VideoSpec = VideoSpec()
    """Size, frame count and fps."""
    dit: DiTSpec = DiTSpec()
    """The diffusion transformer (student for rcm / causal, teacher for euler / unipc)."""
    vae: VAESpec = VAESpec()
    """The VAE."""
    text_encoder: TextEncoderSpec = TextEncoderSpec()
    """umT5 encoder and tokenizer."""
    clip: CLIPSpec = CLIPSpec()
    """CLIP image encoder (Wan2.1 I2V DiTs only)."""
    device: str = "auto"
    """auto: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    dtype: DType = "auto"
    """DiT dtype; auto: bf16 on CUDA, float32 on CPU."""
    output_dir: str = "outputs/vbench/run"
    """videos/, manifest.json, config.yaml, vbench_results/, vbench_scores.{json,txt,png}."""
    name: str | None = None
    """Label of this run in tables and plots (default: the output_dir's name)."""
    score: ScoreSpec = ScoreSpec()
    """How vbench runs (its interpreter, GPUs, options)."""
    baseline: str | None = None
    """The teacher's output_dir (or a folder / file of vbench results) to report deltas against."""
    baseline_name: str = "teacher"
    """Label of the baseline."""
    wait_timeout_s: float = 48 * 3600.0
    """stage=all under torchrun: how long rank 0 waits for the other ranks' videos before scoring."""

    @model_validator(mode="after")
    def _check(self) -> EvalVBenchConfig:
        self.sampler.check()
        if self.suite == "i2v" and self.image_dir is None:
            raise ValueError("suite='i2v' needs image_dir (set --image_dir=the image suite's crop folder)")
        if self.samples_per_prompt < 1:
            raise ValueError(f"samples_per_prompt must be >= 1, got {self.samples_per_prompt}")
        known = set(dimensions(self.suite)) | {"temporal_flickering"}
        bad = [d for d in [*self.dimensions, *self.score.dimensions] if d not in known]
        if bad:
            raise ValueError(f"unknown {self.suite} dimension(s) {bad} in dimensions / score.dimensions; "
                             f"known: {sorted(known)}")
        return self


def _preset(**kw) -> EvalVBenchConfig:
    return EvalVBenchConfig.model_validate(kw)


_TEACHER_DIR = "outputs/vbench/teacher-t2v-1.3B"
PRESETS: dict[str, EvalVBenchConfig] = {
    "teacher-t2v-1.3B": _preset(sampler=SamplerSpec(kind="unipc"), output_dir=_TEACHER_DIR,
                                dit=DiTSpec(config="t2v-1.3B", path="checkpoints/Wan2.1-T2V-1.3B.pth")),
    "rcm-t2v-1.3B": _preset(output_dir="outputs/vbench/rcm-t2v-1.3B", baseline=_TEACHER_DIR,
                            dit=DiTSpec(config="t2v-1.3B", path="checkpoints/rCM_Wan2.1_T2V_1.3B_480p.pt")),
    "causal-rcm-t2v-1.3B": _preset(
        sampler=SamplerSpec(kind="causal"), output_dir="outputs/vbench/causal-rcm-t2v-1.3B", baseline=_TEACHER_DIR,
        dit=DiTSpec(config="t2v-1.3B", path="outputs/causal_distill/1.3B-causal-rcm/student_ema.safetensors")),
    "teacher-i2v-14B-480p": _preset(
        suite="i2v", sampler=SamplerSpec(kind="unipc"), output_dir="outputs/vbench/teacher-i2v-14B",
        prompt_file="VBench/vbench2_beta_i2v/vbench2_i2v_full_info.json",
        image_dir="VBench/vbench2_beta_i2v/data/crop/16-9",
        dit=DiTSpec(config="i2v-14B", path="checkpoints/Wan2.1-I2V-14B-480P.pth")),
}
"""Named starting points; paths are relative to the working directory (I2V: a VBench clone in ./VBench)."""


# ------------------------------------------------------------------------------------------ helpers
def _prompt_file(cfg: EvalVBenchConfig) -> Path:
    if cfg.prompt_file is not None:
        return Path(cfg.prompt_file)
    try:
        return find_vbench_file(cfg.suite)
    except FileNotFoundError:
        if cfg.score.python is None:
            raise
    # ask the vbench environment where its package lives (without importing it)
    code = ("import importlib.util as u; s = u.find_spec('vbench'); "
            "print(list(s.submodule_search_locations)[0] if s else '')")
    found = subprocess.run([cfg.score.python, "-c", code], capture_output=True, text=True).stdout.strip()
    path = Path(found) / "VBench_full_info.json" if found and cfg.suite == "t2v" else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no prompt file: set --prompt_file (score.python={cfg.score.python} has no "
                                "vbench/VBench_full_info.json)")
    return path


def _suite(cfg: EvalVBenchConfig) -> list[SuiteEntry]:
    entries = load_suite(_prompt_file(cfg), suite=cfg.suite, dimensions=cfg.dimensions,
                         augmented=cfg.augmented_prompts, image_dir=cfg.image_dir)
    return entries[: cfg.max_prompts] if cfg.max_prompts is not None else entries


def _paths(cfg: EvalVBenchConfig) -> dict[str, Path]:
    out = Path(cfg.output_dir)
    return {"out": out, "videos": out / "videos", "tmp": out / ".tmp", "results": out / "vbench_results"}


def _write_manifest(cfg: EvalVBenchConfig, videos: list[Video], path: Path) -> None:
    rows = [{"file": v.path.name, "prompt": v.entry.prompt, "text": v.entry.text, "sample": v.sample,
             "seed": v.seed, "prompt_index": v.entry.index, "dimensions": list(v.entry.dimensions),
             "image": str(v.entry.image) if v.entry.image else None} for v in videos]
    path.write_text(json.dumps({"suite": cfg.suite, "seed_rule": "seed + 1000 * prompt_index + sample",
                                "videos": rows}, indent=1, ensure_ascii=False) + "\n")


class _Eta:
    """Progress lines with an ETA for logs (the tqdm bar covers terminals)."""

    def __init__(self, rank: int, total: int, every_s: float = 30.0):
        self.rank, self.total, self.every_s = rank, total, every_s
        self.start = self.last = time.perf_counter()
        self.done = 0

    def step(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done == self.total:
            per = (now - self.start) / self.done
            eta = time.strftime("%H:%M:%S", time.gmtime(per * (self.total - self.done)))
            print(f"[rank {self.rank}] {self.done}/{self.total} videos, {per:.1f} s/video, ETA {eta}", flush=True)
            self.last = now


# ------------------------------------------------------------------------------------------ stages
def sample(cfg: EvalVBenchConfig) -> dict:
    """Make this rank's missing videos. Returns ``{"rank", "world", "assigned": [paths], "written": [paths],
    "skipped": n}``."""
    rank, world = launch_rank_world()
    p = _paths(cfg)
    entries = _suite(cfg)
    videos = plan_videos(entries, p["videos"], samples=cfg.samples_per_prompt, seed=cfg.seed)
    p["videos"].mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_config(cfg, p["out"] / "config.yaml")
        _write_manifest(cfg, videos, p["out"] / "manifest.json")
    mine = {e.index for e in rank_slice(entries, rank, world)}
    assigned = [v for v in videos if v.entry.index in mine]
    todo = [v for v in assigned if not v.path.is_file()]
    result = {"rank": rank, "world": world, "assigned": [v.path for v in assigned], "written": [],
              "skipped": len(assigned) - len(todo)}
    print(f"[rank {rank}/{world}] {len(assigned)} videos assigned ({len(mine)} prompts), "
          f"{result['skipped']} already done, {len(todo)} to make", flush=True)
    if not todo:
        return result
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    timer = StageTimer(device, verbose=rank == 0)
    texts = list(dict.fromkeys(v.entry.text for v in todo))
    emb, neg = encode_texts(cfg.text_encoder, texts, text_len=dit_config(cfg.dit).text_len, device=device,
                            sampler=cfg.sampler, timer=timer)
    row = {t: i for i, t in enumerate(texts)}
    sampler = VideoPipeline(cfg.sampler, cfg.video, mode=cfg.suite, dit=cfg.dit, vae=cfg.vae, clip=cfg.clip,
                          device=device, dtype=dtype, timer=timer)
    eta = _Eta(rank, len(todo))
    cond, cond_of = None, None
    with tqdm(total=len(todo), desc=f"rank {rank}/{world} videos", disable=None, position=rank) as bar:
        for v in todo:
            if cond_of != v.entry.index:
                cond, cond_of = sampler.condition(v.entry.image), v.entry.index
            i = row[v.entry.text]
            latent = sampler.latent(emb[i : i + 1], neg, cond, v.seed)
            write_video_atomic(sampler.decode(latent)[0], v.path, p["tmp"], fps=cfg.video.fps)
            result["written"].append(v.path)
            bar.update()
            eta.step()
    sampler.free()
    return result


def _wait_for(paths: list[Path], timeout_s: float, poll_s: float = 30.0) -> None:
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


def _score_dimensions(cfg: EvalVBenchConfig) -> list[str]:
    dims = cfg.score.dimensions or [d for d in dimensions(cfg.suite) if not cfg.dimensions or d in cfg.dimensions]
    return [d for d in dims if d != "temporal_flickering" or cfg.suite == "t2v"]


def score(cfg: EvalVBenchConfig) -> Path:
    """Run vbench on the videos (rank 0); returns the results folder."""
    p = _paths(cfg)
    if not p["videos"].is_dir() or not any(p["videos"].iterdir()):
        raise FileNotFoundError(f"no videos in {p['videos']}: run --stage=sample first")
    info = _prompt_file(cfg)
    return run_vbench(cfg.score, suite=cfg.suite, videos_dir=p["videos"].resolve(), info_json=info.resolve(),
                      out_dir=p["results"], dimensions=_score_dimensions(cfg))


def _load_baseline(path: str, suite: str) -> Scores:
    p = Path(path)
    if p.is_dir() and (p / "vbench_scores.json").is_file():
        p = p / "vbench_scores.json"
    if p.is_file() and p.name == "vbench_scores.json":
        return Scores.from_dict(json.loads(p.read_text())["scores"])
    if p.is_dir() and (p / "vbench_results").is_dir():
        p = p / "vbench_results"
    return aggregate(load_results(p), suite)


def report(cfg: EvalVBenchConfig) -> dict:
    """Aggregate ``vbench_results/`` (with deltas to the baseline), print the table, write JSON + PNG."""
    p = _paths(cfg)
    if not p["results"].is_dir():
        raise FileNotFoundError(f"no vbench results in {p['results']}: run --stage=score first")
    scores = aggregate(load_results(p["results"]), cfg.suite)
    base = None
    if cfg.baseline is not None:
        if Path(cfg.baseline).exists():
            base = _load_baseline(cfg.baseline, cfg.suite)
        else:
            print(f"baseline {cfg.baseline} does not exist: reporting without deltas", flush=True)
    names = (cfg.name or p["out"].name, cfg.baseline_name)
    harness = {"samples_per_prompt": cfg.samples_per_prompt, "seed": cfg.seed,
               "seed_rule": "seed + 1000 * prompt_index + sample", "augmented_prompts": cfg.augmented_prompts,
               "sampler": cfg.sampler.model_dump(mode="json"), "video": cfg.video.model_dump(mode="json"),
               "imaging_quality_preprocessing_mode": cfg.score.imaging_quality_preprocessing_mode,
               "i2v_ratio": cfg.score.i2v_ratio if cfg.suite == "i2v" else None}
    paths = write_report(scores, p["out"], base, names=names, extra={"name": names[0], "harness": harness})
    print(format_table(scores, base, names=names), flush=True)
    print(f"wrote {paths['json']}, {paths['table']}, {paths['png']}", flush=True)
    return {"scores": scores, "baseline": base, "paths": paths}


def run(cfg: EvalVBenchConfig) -> dict:
    out: dict = {}
    rank, world = launch_rank_world()
    if cfg.stage in ("all", "sample"):
        out["sample"] = sample(cfg)
    if rank != 0 or cfg.stage == "sample":
        return out
    if cfg.stage == "all" and world > 1:
        _wait_for([v.path for v in plan_videos(_suite(cfg), _paths(cfg)["videos"], samples=cfg.samples_per_prompt,
                                                 seed=cfg.seed)], cfg.wait_timeout_s)
    if cfg.stage in ("all", "score"):
        out["results"] = score(cfg)
    out["report"] = report(cfg)
    return out


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(EvalVBenchConfig, argv, presets=PRESETS, prog="eval_vbench.py"))


if __name__ == "__main__":
    run_main(main)
