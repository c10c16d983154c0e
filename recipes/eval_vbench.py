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

from pathlib import Path
from typing import Literal

from pydantic import model_validator

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
from rcm_pipelines.eval.harness import (
    SEED_RULE,
    load_baseline,
    make_videos,
    resolve_prompt_file,
    score_dimensions,
    wait_for,
    write_manifest,
)
from rcm_pipelines.eval.score import ScoreSpec, run_vbench
from rcm_pipelines.eval.scores import aggregate, dimensions, format_table, load_results, write_report
from rcm_pipelines.eval.suite import SuiteEntry, load_suite, plan_videos, rank_slice
from rcm_pipelines.pipeline import SamplerSpec, VideoPipeline, VideoSpec, encode_texts
from rcm_pipelines.timing import StageTimer
from rcm_recipes.config import RecipeConfig, load_presets, parse_config, run_main
from rcm_recipes.rundir import open_run
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
        self.video.check_vae_frames()
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


PRESETS: dict[str, EvalVBenchConfig] = load_presets(EvalVBenchConfig, "eval_vbench")
"""Named starting points: configs/eval_vbench/<name>.yaml; paths are relative to the working directory (I2V: a
VBench clone in ./VBench)."""


# ------------------------------------------------------------------------------------------ stages
def _suite(cfg: EvalVBenchConfig) -> list[SuiteEntry]:
    entries = load_suite(resolve_prompt_file(cfg.suite, cfg.prompt_file, cfg.score.python), suite=cfg.suite, dimensions=cfg.dimensions,
                         augmented=cfg.augmented_prompts, image_dir=cfg.image_dir)
    return entries[: cfg.max_prompts] if cfg.max_prompts is not None else entries


_FREE = ("stage", "device", "output_dir", "dimensions", "max_prompts", "samples_per_prompt", "score", "name",
         "baseline", "baseline_name", "wait_timeout_s")
"""Settings that do not change a video already made (what is sampled, scored or reported may)."""


def _paths(cfg: EvalVBenchConfig) -> dict[str, Path]:
    out = Path(cfg.output_dir)
    return {"out": out, "videos": out / "videos", "tmp": out / ".tmp", "results": out / "vbench_results"}


def sample(cfg: EvalVBenchConfig) -> dict:
    """Make this rank's missing videos. Returns ``{"rank", "world", "assigned": [paths], "written": [paths],
    "skipped": n}``."""
    rank, world = launch_rank_world()
    p = _paths(cfg)
    entries = _suite(cfg)
    videos = plan_videos(entries, p["videos"], samples=cfg.samples_per_prompt, seed=cfg.seed)
    p["videos"].mkdir(parents=True, exist_ok=True)
    # the videos already there were made with the stored config: another sampler or model would mix two runs
    open_run(p["out"], cfg, ignore=_FREE, write=rank == 0)
    if rank == 0:
        write_manifest(videos, p["out"] / "manifest.json", suite=cfg.suite)
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
    pipe = VideoPipeline(cfg.sampler, cfg.video, mode=cfg.suite, dit=cfg.dit, vae=cfg.vae, clip=cfg.clip,
                         device=device, dtype=dtype, timer=timer)
    result["written"] = make_videos(pipe, todo, texts, emb, neg, tmp_dir=p["tmp"], fps=cfg.video.fps, rank=rank,
                                    world=world)
    pipe.free()
    return result


def score(cfg: EvalVBenchConfig) -> Path:
    """Run vbench on the videos (rank 0); returns the results folder."""
    p = _paths(cfg)
    if not p["videos"].is_dir() or not any(p["videos"].iterdir()):
        raise FileNotFoundError(f"no videos in {p['videos']}: run --stage=sample first")
    info = resolve_prompt_file(cfg.suite, cfg.prompt_file, cfg.score.python)
    return run_vbench(cfg.score, suite=cfg.suite, videos_dir=p["videos"].resolve(), info_json=info.resolve(),
                      out_dir=p["results"],
                      dimensions=score_dimensions(cfg.suite, cfg.dimensions, cfg.score.dimensions))


def report(cfg: EvalVBenchConfig) -> dict:
    """Aggregate ``vbench_results/`` (with deltas to the baseline), print the table, write JSON + PNG."""
    p = _paths(cfg)
    if not p["results"].is_dir():
        raise FileNotFoundError(f"no vbench results in {p['results']}: run --stage=score first")
    scores = aggregate(load_results(p["results"]), cfg.suite)
    base = None
    if cfg.baseline is not None:
        if Path(cfg.baseline).exists():
            base = load_baseline(cfg.baseline, cfg.suite)
        else:
            print(f"baseline {cfg.baseline} does not exist: reporting without deltas", flush=True)
    names = (cfg.name or p["out"].name, cfg.baseline_name)
    harness = {"samples_per_prompt": cfg.samples_per_prompt, "seed": cfg.seed,
               "seed_rule": SEED_RULE, "augmented_prompts": cfg.augmented_prompts,
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
        wait_for([v.path for v in plan_videos(_suite(cfg), _paths(cfg)["videos"], samples=cfg.samples_per_prompt,
                                                 seed=cfg.seed)], cfg.wait_timeout_s)
    if cfg.stage in ("all", "score"):
        out["results"] = score(cfg)
    out["report"] = report(cfg)
    return out


def main(argv: list[str] | None = None) -> dict:
    return run(parse_config(EvalVBenchConfig, argv, presets=PRESETS, prog="eval_vbench.py"))


if __name__ == "__main__":
    run_main(main)
