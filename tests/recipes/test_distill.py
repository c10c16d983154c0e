"""recipes/distill.py on one CPU process (a world of one: the FSDP2 + DCP code path of N GPUs) with the tiny
network: teachers written as net.-prefixed .safetensors and DCP, shards written with rcm_train's writer.

What is checked: the presets mirror docs/recipes_distill_generate.md, distill.py; each method runs the closures it should (read back from
metrics.jsonl); samples are written as mp4 with the documented grid; the exported student loads strictly;
a run stopped and resumed ends bit-identical to an uninterrupted one (models, EMA, optimizer state, RNG and
data position all restored); finished stages are skipped on a rerun.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import _fixtures
import distill
import pytest
import torch
from safetensors.torch import save_file

from rcm_nets.checkpoint import load_checkpoint
from rcm_nets.wan import MeanFlowWanDiT, WanDiT
from rcm_pipelines.components import MissingFileError
from rcm_pipelines.testing import TINY_VAE, write_tiny_assets
from rcm_pipelines.video import read_video
from rcm_recipes.config import ConfigError, field_paths, resolve_config
from rcm_train.checkpoint import load_part
from rcm_train.data import ShardWriter

_one_thread = _fixtures._one_thread  # shared autouse pytest fixture (module scope)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill_inputs")
    assets = write_tiny_assets(d / "assets")
    teacher = torch.load(assets.t2v, weights_only=True)
    save_file({f"net.{k}": v for k, v in teacher.items()}, d / "teacher.safetensors")
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({f"net.{k}": v for k, v in teacher.items()}, checkpoint_id=str(d / "teacher.dcp"), no_dist=True)
    g = torch.Generator().manual_seed(0)
    with ShardWriter(d / "data", 6, 2) as writer:  # latents [16, 2, 4, 4], embeddings [16 rows, 32]
        for i in writer.pending():
            writer.write(i, torch.randn(16, 2, 4, 4, generator=g).bfloat16(),
                         torch.randn(16, 32, generator=g).bfloat16(), f"prompt {i}")
    torch.save(torch.randn(16, 32, generator=g).bfloat16(), d / "negative.pt")
    return {"dir": d, "assets": assets, "teacher": teacher}


def _args(files, out, *extra, teacher="teacher.safetensors", shards="data/shard_*.tar"):
    d = files["dir"]
    return ["--preset=tiny-rcm", f"--model.path={d / teacher}", f"--data.shards={d / shards}",
            f"--negative_embed_path={d / 'negative.pt'}", f"--sample.vae.path={files['assets'].vae}",
            f"--sample.vae.arch={json.dumps(TINY_VAE)}", f"--output_dir={out}", "--run.logger.every=1", *extra]


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _part(ckpt, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_part(ckpt, name)


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as e:
        distill.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    groups = {"model", "data", "stage1", "stage2", "stage3", "optimizer", "fake_score_optimizer", "run", "run.train",
              "run.train.schedule", "run.checkpoint", "run.logger", "parallel", "parallel.mesh", "sample", "sample.vae",
              "parallel.student", "parallel.fake_score", "parallel.teacher"}
    groups |= {f"stage{i}.{g}" for i in (1, 2, 3) for g in ("objective", "schedule", "meanflow")}
    for path in field_paths(distill.DistillConfig):
        if path not in groups:  # sibling blocks (stage1..3; student / fake_score / teacher) are listed once
            assert _fixtures.help_lists(text, path), path
    assert "--stage1.iterations" not in text and "--parallel.student.sac " not in text
    assert not _fixtures.help_lists(text, "parallel.student.nope")  # the matcher can say no
    assert "tiny-staged" in text and "14B-rcm" in text


def test_bad_fields_and_invalid_combinations(capsys):
    with pytest.raises(SystemExit) as e:
        distill.main(["--stage1.objective.cm_typ=dcm"])
    assert e.value.code == 2
    assert "did you mean 'stage1.objective.cm_type'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="did you mean 'tiny-rcm'"):
        resolve_config(distill.DistillConfig, ["--preset=tiny-rmc"], presets=distill.PRESETS)
    with pytest.raises(ConfigError, match=r"pure DMD.*schedule\.tangent_warmup=0"):
        resolve_config(distill.DistillConfig, ["--preset=tiny-dmd", "--stage1.schedule.tangent_warmup=3"],
                       presets=distill.PRESETS)
    with pytest.raises(ConfigError, match="no stage to run"):
        resolve_config(distill.DistillConfig, ["--stage1.iterations=0"])
    with pytest.raises(ConfigError, match="trains nothing"):
        resolve_config(distill.DistillConfig, ["--preset=tiny-scm", "--stage1.objective.loss_scale=0"],
                       presets=distill.PRESETS)


def test_presets_mirror_the_reference_experiments():
    p = distill.PRESETS
    small, big = p["1.3B-rcm"], p["14B-rcm"]
    s, b = small.stage1, big.stage1
    assert (s.objective.p_g_mean, s.objective.p_g_std, s.objective.p_d_shift) == (0.7, 1.6, 5.0)
    assert (b.objective.p_g_mean, b.objective.p_d_shift) == (1.5, 5.0)
    assert (s.schedule.tangent_warmup, s.schedule.student_update_freq) == (1000, 5)
    assert (b.schedule.tangent_warmup, b.schedule.student_update_freq) == (0, 10)
    assert (small.optimizer.lr, small.fake_score_optimizer.lr, big.optimizer.lr, big.fake_score_optimizer.lr) == \
        (2e-6, 4e-7, 1e-6, 1e-7)
    assert small.optimizer.betas == (0.0, 0.999) and small.optimizer.weight_decay == 0.01
    assert (small.parallel.mesh.fsdp_shard_size, small.parallel.mesh.cp, big.parallel.mesh.fsdp_shard_size,
            big.parallel.mesh.cp) == \
        (4, 1, 32, 8)
    assert (small.parallel.student.sac, big.parallel.student.sac) == ("block_wise", "mm_only")
    assert (small.data.num_frames, big.data.num_frames) == (20, 21)
    assert (small.sample.sigma_max, big.sample.sigma_max) == (80.0, 200.0)
    assert (small.run.train.checkpoint_every, big.run.train.checkpoint_every) == (500, 250)
    assert s.iterations == b.iterations == 100_000 and s.objective.guidance == 5.0
    assert (s.objective.loss_scale, s.objective.loss_scale_dmd, s.fake_score) == (100.0, 1.0, True)
    assert p["1.3B-scm"].stage1.fake_score is False
    assert p["1.3B-dcm"].stage1.objective.cm_type == "dcm" and not p["1.3B-dcm"].stage1.fake_score
    dmd = p["1.3B-dmd"].stage1
    assert dmd.objective.loss_scale == 0 and dmd.objective.dmd_fix_timesteps and dmd.schedule.tangent_warmup == 0
    st = p["1.3B-staged"]
    assert [x.name for x in st.stages()] == ["dcm", "scm", "rcm"]
    assert sum(x.iterations for x in st.stages()) == 100_000
    fast = p["1.3B-rcm-fast"]  # 1.3B-rcm with the measured fastest layout: only output_dir and parallel differ
    assert fast.model_copy(update=dict(output_dir=small.output_dir, parallel=small.parallel)) == small
    for net in (fast.parallel.student, fast.parallel.fake_score):
        assert (net.sac, net.sac_blocks, net.compile) == ("attn_only", 18, True)
    assert fast.parallel.teacher.compile and fast.parallel.teacher.param_dtype is None
    debug = p["1.3B-rcm-debug"]
    assert (debug.stage1.iterations, debug.run.train.checkpoint_every, debug.sample.every,
            debug.stage1.schedule.tangent_warmup) == (25, 10, 6, 8)


def test_presets_are_yaml_files_that_config_reads():
    """Every preset is configs/distill/<name>.yaml; the same file given to --config resolves to the preset."""
    root = Path(distill.__file__).resolve().parents[1] / "configs" / "distill"
    assert sorted(p.stem for p in root.glob("*.yaml")) == sorted(distill.PRESETS)
    for name in ("tiny-rcm", "1.3B-meanflow", "14B-staged"):
        via_file = resolve_config(distill.DistillConfig, [f"--config={root / name}.yaml"])
        assert via_file == distill.PRESETS[name]


def test_rcm_end_to_end_and_exact_resume(files, tmp_path):
    sched = ["--stage1.schedule.tangent_warmup=1", "--stage1.schedule.student_update_freq=2",
             "--run.train.checkpoint_every=2", "--sample.every=2"]
    a = tmp_path / "a"
    res = distill.main(_args(files, a, "--stage1.iterations=4", *sched))
    assert (a / "config.yaml").is_file()
    for it in (0, 2, 4):  # every 2 iterations and at the end; rows: (student, EMA) x (1, 2, 4 steps)
        assert read_video(a / "logs" / "rcm" / "media" / f"samples_{it:09d}.mp4").shape == (5, 6 * 32, 2 * 32, 3)
    keys = set().union(*[m.keys() for m in _metrics(a / "logs" / "rcm" / "metrics.jsonl")])
    assert {"scm/loss", "dmd/loss", "critic/loss", "grad_norm/student", "grad_norm/fake_score"} <= keys
    student = WanDiT.from_config("tiny")
    load_checkpoint(student, res["student_ema"])  # strict, official keys
    load_checkpoint(student, res["student"])
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, files["teacher"][k].bfloat16().float())]
    assert moved  # it trained

    b = tmp_path / "b"
    distill.main(_args(files, b, "--stage1.iterations=2", *sched))  # stop at 2 ...
    res_b = distill.main(_args(files, b, "--stage1.iterations=4", "--allow_config_change=true", *sched))  # ... to 4
    assert res_b["stages"]["rcm"].iteration == 4
    ka, kb = res["stages"]["rcm"].checkpoint, res_b["stages"]["rcm"].checkpoint
    for part in ("student", "student_ema", "fake_score", "student_optim"):
        pa, pb = _part(ka, part), _part(kb, part)
        assert pa.keys() == pb.keys()
        bad = [k for k in pa if isinstance(pa[k], torch.Tensor) and not torch.equal(pa[k], pb[k])]
        assert not bad, (part, bad[:3])


def test_staged_from_dcp_teacher_and_rerun_skips(files, tmp_path, capsys):
    out = tmp_path / "staged"
    args = _args(files, out, "--preset=tiny-staged", "--stage1.iterations=2", "--stage2.iterations=2",
                 "--stage3.iterations=3", "--stage3.schedule.student_update_freq=2", "--sample.every=0",
                 teacher="teacher.dcp")
    res = distill.main(args)
    assert list(res["stages"]) == ["dcm", "scm", "rcm"]
    closures = {}
    for name in res["stages"]:
        keys = set().union(*[m.keys() for m in _metrics(out / "logs" / name / "metrics.jsonl")])
        closures[name] = sorted(k.split("/")[0] for k in keys if k.endswith("/loss"))
        assert (out / name / "student_ema.safetensors").is_file()
    assert closures == {"dcm": ["dcm"], "scm": ["scm"], "rcm": ["critic", "dmd", "scm"]}
    # each stage starts from the previous stage's student: stage 2 moved away from stage 1's final weights,
    # which differ from the teacher
    s1, s2 = (_part(res["stages"][n].checkpoint, "student") for n in ("dcm", "scm"))
    assert any(not torch.equal(s1[k], files["teacher"][k]) for k in s1)
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)
    capsys.readouterr()
    again = distill.main(args)
    text = capsys.readouterr().out
    assert all(f"stage {n}: complete" in text for n in ("dcm", "scm", "rcm"))
    assert again["student"] == res["student"]


def test_meanflow_preset_end_to_end(files, tmp_path):
    """tiny-meanflow: a MeanFlowWanDiT student starts from the teacher (interval embedding added, zero output),
    trains with the MeanFlow objective (exact JVP), samples with the MeanFlow sampler and exports; the export
    holds exactly the teacher's keys plus the interval embedding's, and the student moved."""
    out = tmp_path / "mf"
    args = ["--preset=tiny-meanflow", *_args(files, out, "--stage1.iterations=3", "--run.train.checkpoint_every=3",
                                             "--sample.every=3", "--sample.steps=[1,2]")[1:]]
    res = distill.main(args)
    keys = set().union(*[m.keys() for m in _metrics(out / "logs" / "meanflow" / "metrics.jsonl")])
    assert "meanflow/loss" in keys and "critic/loss" not in keys
    assert read_video(out / "logs" / "meanflow" / "media" / "samples_000000003.mp4").shape[1] == 4 * 32
    student = MeanFlowWanDiT.from_config("tiny")
    load_checkpoint(student, res["student"])  # strict
    sd = student.state_dict()
    assert set(sd) - set(files["teacher"]) == set(MeanFlowWanDiT.new_keys())
    assert any(not torch.equal(sd[k], files["teacher"][k].bfloat16().float()) for k in files["teacher"])


def test_missing_inputs_are_named(files, tmp_path):
    with pytest.raises(MissingFileError, match=r"--model\.path"):
        distill.main(_args(files, tmp_path / "x", teacher="nope.pth"))
    with pytest.raises(FileNotFoundError, match=r"data\.shards"):
        distill.main(_args(files, tmp_path / "y", shards="none_*.tar"))


@pytest.mark.slow
def test_context_parallel_two_processes_match_one(files, tmp_path):
    """torchrun, 2 CPU processes, Ulysses CP = 2 (tokens split over the ranks, seams swapped, randomness shared
    by the step generators): every logged loss and gradient norm equals the 1-process run's. Tolerance 1e-5
    relative: the same math, only the float summation order differs (all-to-all, sharded reductions)."""
    common = ["--stage1.iterations=4", "--stage1.schedule.tangent_warmup=1", "--sample.every=0",
              "--run.train.checkpoint_every=4"]
    distill.main(_args(files, tmp_path / "one", *common))
    script = Path(distill.__file__)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           *_args(files, tmp_path / "cp2", *common, "--parallel.mesh.cp=2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=script.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mesh (replicate, shard, cp) = (1, 1, 2)" in proc.stdout
    one, cp2 = (_metrics(tmp_path / d / "logs" / "rcm" / "metrics.jsonl") for d in ("one", "cp2"))
    assert [m["iteration"] for m in one] == [m["iteration"] for m in cp2] == [1, 2, 3, 4]
    for a, b in zip(one, cp2):
        keys = [k for k in a if k.endswith("/loss") or k.startswith("grad_norm/")]
        assert keys and set(keys) <= set(b)
        for k in keys:
            assert b[k] == pytest.approx(a[k], rel=1e-5), (a["iteration"], k)


def test_run_directory_never_lies(files, tmp_path):
    """Before: config.yaml was written before anything was checked, so a rerun with another lr or teacher (or one
    that failed on a missing teacher) rewrote it to claim settings its weights were not trained with."""
    from rcm_recipes.rundir import RunConfigMismatch

    out = tmp_path / "run"
    base = ["--stage1.iterations=1", "--sample.every=0"]
    distill.main(_args(files, out, *base))
    stored = (out / "config.yaml").read_bytes()
    assert sorted(p.name for p in (out / "attempts").iterdir()) == ["001.yaml"]
    for extra in ([], ["--allow_config_change=true"]):  # the optimizer is held by the checkpoints: never changes
        with pytest.raises(RunConfigMismatch, match=r"optimizer.lr: 0.0001 -> 0.001.*new output directory"):
            distill.main(_args(files, out, *base, "--optimizer.lr=1e-3", *extra))
    with pytest.raises(RunConfigMismatch, match=r"1 field\(s\) differ: stage1.iterations: 1 -> 2.*allow_config_change"):
        distill.main(_args(files, out, "--stage1.iterations=2", "--sample.every=0"))
    with pytest.raises(MissingFileError, match="model.path"):  # fails before the directory is touched
        distill.main(_args(files, out, *base, "--allow_config_change=true", teacher="absent.safetensors"))
    assert (out / "config.yaml").read_bytes() == stored
    assert sorted(p.name for p in (out / "attempts").iterdir()) == ["001.yaml"]
    res = distill.main(_args(files, out, "--stage1.iterations=2", "--sample.every=0", "--allow_config_change=true"))
    assert res["stages"]["rcm"].iteration == 2
    assert "iterations: 2" in (out / "config.yaml").read_text()
    assert sorted(p.name for p in (out / "attempts").iterdir()) == ["001.yaml", "002.yaml"]
    assert (out / "attempts" / "001.yaml").read_bytes() == stored  # the history stays readable
