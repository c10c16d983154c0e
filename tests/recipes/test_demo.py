"""The CPU demo recipe: its CLI, and a reduced end-to-end run (the `ci` preset) checking every output."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import demo
import imageio.v3 as iio
import pytest
import yaml
from _fixtures import help_lists

from rcm_recipes.config import ConfigError, field_paths, load_config_file, preset_diff, resolve_config


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split()) + " "
    leaves = [p for p in field_paths(demo.DemoConfig) if help_lists(text, p)]  # sibling blocks: brace form
    nested = {"data", "text", "net", "teacher", "distill", "eval", "teacher.optimizer", "teacher.objective",
              "distill.schedule", "distill.student_optimizer", "distill.critic_optimizer", "distill.objective",
              "meanflow", "meanflow.optimizer", "meanflow.objective"}
    missing = [p for p in field_paths(demo.DemoConfig) if p not in leaves and p not in nested]
    assert not missing, missing
    for doc in ["Training iterations.", "Prompts (one sample each) per method", "Hidden width.",
                "The rCM objective (sCM + DMD)", "Teacher CFG scale", "ci"]:
        assert doc in text, doc


def test_bad_fields_are_named():
    with pytest.raises(ConfigError, match=r"'distill\.iteratons'.*did you mean 'distill\.iterations'"):
        resolve_config(demo.DemoConfig, ["--distill.iteratons=3"], presets=demo.PRESETS)
    with pytest.raises(ConfigError, match=r"'eval\.num_samples'.*multiple of 12"):
        resolve_config(demo.DemoConfig, ["--eval.num_samples=10"])
    with pytest.raises(ConfigError, match=r"divisible by net\.patch_size"):
        resolve_config(demo.DemoConfig, ["--data.size=18"])



def test_presets_are_yaml_files_that_config_reads():
    """Every preset is configs/demo/<name>.yaml holding only values that differ from the defaults; the same file
    given to --config resolves to the preset. Reference values: the Python presets before the move."""
    root = Path(demo.__file__).resolve().parents[1] / "configs" / "demo"
    assert sorted(p.stem for p in root.glob("*.yaml")) == sorted(demo.PRESETS) == ["ci", "default"]
    base = demo.DemoConfig().model_dump(mode="json")
    for name, preset in demo.PRESETS.items():
        data = load_config_file(root / f"{name}.yaml")
        assert preset_diff(base, data) == data, name  # nothing equal to a default
        assert resolve_config(demo.DemoConfig, [f"--config={root / name}.yaml"]) == preset, name
    assert demo.PRESETS["default"] == demo.DemoConfig()
    ci = demo.PRESETS["ci"]
    assert (ci.out_dir, ci.teacher.iterations, ci.teacher.batch_size, ci.distill.iterations) == \
        ("outputs/demo_ci", 400, 16, 40)
    assert (ci.distill.schedule.tangent_warmup, ci.distill.schedule.student_update_freq) == (10, 2)
    assert (ci.eval.num_samples, ci.eval.teacher_steps) == (24, 20)

@pytest.mark.slow
def test_ci_demo_end_to_end(tmp_path):
    """The reduced demo (~1-2 min on 2 cores): every output exists and reads back, and distillation made
    the student's samples better than before it (the full demo's stronger claims need full training)."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(Path(demo.__file__)), "--preset", "ci", f"--out_dir={out}",
                           "--progress=false", "--meanflow.enabled=true", "--meanflow.iterations=20"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["config.yaml", "grid.mp4", "grid.gif", "loss_curves.png", "metrics.json",
                 "teacher.safetensors", "student.safetensors", "meanflow_student.safetensors"]:
        assert (out / name).is_file(), name
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["out_dir"] == str(out) and resolved["teacher"]["iterations"] == 400  # the ci preset
    report = json.loads((out / "metrics.json").read_text())
    methods = report["methods"]
    for name in ["data_heldout", "teacher_20", "teacher_4", "student_1", "student_2", "student_4", "meanflow_1",
                 "meanflow_2"]:
        assert name in methods, name
    assert methods["meanflow_1"]["network_evaluations"] == 1 and math.isfinite(methods["meanflow_1"]["frechet_distance"])
    assert methods["data_heldout"]["prompt_accuracy"] == 1.0
    fd = lambda name: methods[name]["frechet_distance"]
    # Distillation made the one- and two-step samplers better than the teacher's weights in the same
    # sampler (measured on this preset: 1 step ~370 vs ~500, 2 steps ~340 vs ~560).
    assert fd("student_1") < fd("untrained_student_1")
    assert fd("student_2") < fd("untrained_student_2")
    grid_mp4, grid_gif = iio.imread(out / "grid.mp4", plugin="FFMPEG"), iio.imread(out / "grid.gif", index=None)
    assert grid_mp4.shape[0] == grid_gif.shape[0] == resolved["data"]["frames"]  # a grid frame per video frame
    assert iio.imread(out / "loss_curves.png").std() > 5
    assert "student_close_to_teacher" in proc.stdout


def test_grid_shows_both_shapes_when_there_are_enough():
    from rcm_recipes.demo_eval import _grid_columns
    from rcm_recipes.shapes import balanced_prompts

    prompts = balanced_prompts(96)
    cols = _grid_columns(prompts, 7)
    assert [prompts[i].shape for i in cols] == ["square"] * 4 + ["disk"] * 3 and len(set(cols)) == 7
    assert _grid_columns(balanced_prompts(24), 8) == list(range(8))  # squares only: the first prompts
