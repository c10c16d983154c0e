"""Networks of different sizes in one causal run (recipes/causal_distill.py, preset ``causal-tiny-sizes``): a
narrow tiny student (width 32, 2 heads) distilled from wide tiny teachers (width 64, 4 heads) through every
stage, end to end on CPU; plus the stage-list and size checks, each naming the field or stage."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import causal_distill
import pytest
import torch
from _causal_assets import tiny_net, write_data
from safetensors.torch import load_file

from rcm_nets.wan.configs import get_config
from rcm_train.objectives.causal import CausalObjectiveConfig, CausalStageConfig, check_causal_stages

NARROW = dict(dim=32, ffn_dim=64, num_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sizes_assets")
    torch.save(tiny_net(0).state_dict(), d / "wide.pth")
    torch.save(tiny_net(1, **NARROW).state_dict(), d / "narrow.pth")
    write_data(d)
    return d


def _args(assets, out, *extra):
    return ["--preset=causal-tiny-sizes", f"--output_dir={out}", f"--data.shards={assets / 'data' / 'shard_*.tar'}",
            f"--model.teacher.path={assets / 'wide.pth'}", f"--model.student.path={assets / 'narrow.pth'}",
            f"--negative_embed_path={assets / 'negative.pt'}", *extra]


@pytest.mark.slow
def test_narrow_student_from_wide_teachers_end_to_end(assets, tmp_path):
    """teacher_tf trains a wide causal teacher from the wide teacher; tf_dcm starts the narrow student from its
    own file and distils it against the wide causal teacher; tf_scm and sf_dmd (wide real score and fake
    score) continue it. Every loss is finite; the exports have each network's width; the student moved away
    from its first weights (so the narrow file, not a wide one, was where it started: shapes would not load)."""
    out = tmp_path / "run"
    res = causal_distill.main(_args(assets, out))
    for stage, keys in (("teacher_tf", ["flow"]), ("tf_dcm", ["tf_dcm"]), ("tf_scm", ["tf_scm"]),
                        ("sf_dmd", ["sf_dmd", "critic"])):
        rows = [json.loads(x) for x in (out / "logs" / stage / "metrics.jsonl").read_text().splitlines()]
        for key in keys:
            vals = [r[f"{key}/loss"] for r in rows if f"{key}/loss" in r]
            assert vals and all(math.isfinite(v) for v in vals), (stage, key)
    assert list((out / "logs" / "sf_dmd" / "media").glob("samples_*.mp4"))  # the narrow student streams
    teacher, student = load_file(res["causal_teacher"]), load_file(res["student"])
    assert teacher["blocks.0.self_attn.q.weight"].shape == (64, 64)
    assert student["blocks.0.self_attn.q.weight"].shape == (32, 32)
    first = torch.load(assets / "narrow.pth", weights_only=True)
    moved = max((student[k].float() - first[k].float()).abs().max().item() for k in first)
    assert moved > 0
    assert load_file(out / "tf_dcm" / "student.safetensors")["head.head.weight"].shape[1] == 32


def test_stage_and_size_checks_name_the_culprit(assets, tmp_path):
    wide, narrow = get_config("tiny"), get_config("tiny", **NARROW)
    arch = {"student": narrow, "causal_teacher": wide, "teacher": wide, "fake_score": wide}
    flow, cm = CausalObjectiveConfig(flow="tf"), CausalObjectiveConfig(cm="dcm")
    check_causal_stages([CausalStageConfig(name="a", iterations=1, init="teacher", objective=flow),
                         CausalStageConfig(name="b", iterations=1, init="student", objective=cm)], arch)
    with pytest.raises(ValueError, match="stage 'b' trains the student but init='causal_teacher' has another"):
        check_causal_stages([CausalStageConfig(name="a", iterations=1, init="teacher", objective=flow),
                             CausalStageConfig(name="b", iterations=1, init="causal_teacher", objective=cm)], arch)
    with pytest.raises(ValueError, match="stage 'b': init='previous' but no earlier stage trains the student"):
        check_causal_stages([CausalStageConfig(name="a", iterations=1, init="teacher", objective=flow),
                             CausalStageConfig(name="b", iterations=1, objective=cm)], arch)
    with pytest.raises(ValueError, match="stage names must differ"):
        check_causal_stages([CausalStageConfig(name="a", iterations=1, init="student", objective=cm)] * 2, arch)
    cfg = causal_distill.PRESETS["causal-tiny-sizes"]
    with pytest.raises(ValueError, match=r"cp=4 must divide the 2 attention heads of model.student"):
        causal_distill.CausalDistillConfig.model_validate(
            cfg.model_dump() | {"parallel": {"mesh": {"cp": 4}}})
    with pytest.raises(ValueError, match=r"model.student: latent channels"):
        causal_distill.CausalDistillConfig.model_validate(
            cfg.model_dump() | {"model": cfg.model.model_dump() | {"student": {"config": "tiny", "overrides": {"in_dim": 8},
                                                                               "path": "x"}}})


def test_missing_weights_are_named_before_training(assets, tmp_path):
    """Each role's file is checked before the first stage: a missing student file stops the run at once
    (it is read only by stage 2), naming its field; a missing causal-teacher file is fine when a flow stage
    trains it first, and named when the cm stages need it (stage1 skipped)."""
    from rcm_pipelines.components import MissingFileError
    from rcm_train.objectives.causal import first_weights_needed

    with pytest.raises(MissingFileError, match=r"--model\.student\.path"):
        causal_distill.main(_args(assets, tmp_path / "a", "--model.student.path=absent.pth"))
    assert not (tmp_path / "a").exists()  # nothing written
    with pytest.raises(MissingFileError, match=r"--model\.causal_teacher\.path"):
        causal_distill.main(_args(assets, tmp_path / "b", "--stage1.iterations=0",
                                  "--model.causal_teacher.path=absent.pth"))
    with pytest.raises(SystemExit):  # the bidirectional teacher never stands in for a causal one
        causal_distill.main(_args(assets, tmp_path / "c", "--preset=tiny-causal-rcm", "--stage1.iterations=0"))
    assert not (tmp_path / "c").exists()
    cfg = causal_distill.PRESETS["causal-tiny-sizes"]
    assert first_weights_needed(cfg.stages()) == ["student", "teacher", "fake_score"]
    assert first_weights_needed(cfg.stages()[1:]) == ["student", "causal_teacher", "teacher", "fake_score"]


def test_release_preset_states_the_networks():
    """causal-14B-to-1.3B: 14B teacher / causal teacher / fake score, 1.3B student started from its own file,
    CP 4 (40 and 12 heads both divisible), the released learning rates."""
    cfg = causal_distill.PRESETS["causal-14B-to-1.3B"]
    assert [cfg.model.spec(r).config for r in ("teacher", "causal_teacher", "fake_score", "student")] == \
        ["t2v-14B"] * 3 + ["t2v-1.3B"]
    assert [s.init for s in cfg.stages()] == ["teacher", "student", "previous", "previous"]
    assert cfg.parallel.mesh.cp == 4 and cfg.causal_teacher_optimizer.lr == 1e-5 and cfg.optimizer.lr == 2e-6
    assert cfg.stage2.objective.cm_guidance == 3.0 and cfg.stage4.objective.dmd_guidance == 5.0


@pytest.mark.slow
def test_sizes_run_under_context_parallel_matches_one_process(assets, tmp_path):
    """torchrun, 2 CPU processes, --parallel.mesh.cp=2 (the narrow student's 2 heads, one per rank; the wide
    networks' 4 heads, two per rank; 5 frames of 4 tokens in blocks of 4 and 8 tokens) and activation
    checkpointing of the trained network (recomputes re-run the all-to-alls and cached calls): every stage's logged
    losses and gradient norms equal the 1-process run's. Tolerance 1e-4 relative: the same math in float32,
    only the summation order differs (all-to-all, sharded reductions), compounded over 7 optimizer steps."""
    common = ["--sample.every=0"]
    causal_distill.main(_args(assets, tmp_path / "one", *common))
    script = Path(causal_distill.__file__)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
           *_args(assets, tmp_path / "cp2", *common, "--parallel.mesh.cp=2", "--parallel.student.sac=block_wise")]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600, cwd=script.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "mesh (replicate, shard, cp) (1, 1, 2)" in proc.stdout
    for stage in ("teacher_tf", "tf_dcm", "tf_scm", "sf_dmd"):
        one, cp2 = ([json.loads(x) for x in (tmp_path / d / "logs" / stage / "metrics.jsonl").read_text().splitlines()]
                    for d in ("one", "cp2"))
        assert [m["iteration"] for m in one] == [m["iteration"] for m in cp2]
        for a, b in zip(one, cp2):
            keys = [k for k in a if k.endswith("/loss") or k.startswith("grad_norm/")]
            assert keys and set(keys) <= set(b)
            for k in keys:
                assert b[k] == pytest.approx(a[k], rel=1e-4), (stage, a["iteration"], k, a[k], b[k])
