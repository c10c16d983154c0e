"""VBench score aggregation (rcm_recipes.vbench) against hand-computed scores from synthetic result files.

The raw scores are chosen so that each normalized score is a round number: raw = min + n * (max - min) with
VBench's constants (scripts/constant.py, typed again below as the test's own reference). Expected groups are
written out by hand from those n; the only tolerance is float rounding (1e-12).
"""

import json
import math
import random

import pytest
from PIL import Image

from rcm_pipelines.eval.scores import (
    I2V_CONDITION,
    I2V_QUALITY,
    T2V_QUALITY,
    T2V_SEMANTIC,
    Scores,
    aggregate,
    format_table,
    load_results,
    write_report,
)

# VBench scripts/constant.py NORMALIZE_DIC / DIM_WEIGHT, written independently of the module under test.
REF_MIN_MAX = {
    "subject consistency": (0.1462, 1.0), "background consistency": (0.2615, 1.0),
    "temporal flickering": (0.6293, 1.0), "motion smoothness": (0.706, 0.9975), "dynamic degree": (0.0, 1.0),
    "aesthetic quality": (0.0, 1.0), "imaging quality": (0.0, 1.0), "object class": (0.0, 1.0),
    "multiple objects": (0.0, 1.0), "human action": (0.0, 1.0), "color": (0.0, 1.0),
    "spatial relationship": (0.0, 1.0), "scene": (0.0, 0.8222), "appearance style": (0.0009, 0.2855),
    "temporal style": (0.0, 0.364), "overall consistency": (0.0, 0.364),
}
# normalized score n of each dimension; raw = min + n (max - min)
N_T2V = {"subject consistency": 0.5, "background consistency": 1.0, "temporal flickering": 0.0,
         "motion smoothness": 0.5, "dynamic degree": 0.8, "aesthetic quality": 0.6, "imaging quality": 0.7,
         "object class": 0.9, "multiple objects": 0.5, "human action": 0.8, "color": 0.85,
         "spatial relationship": 0.6, "scene": 0.5, "appearance style": 0.5, "temporal style": 0.5,
         "overall consistency": 0.75}
# Quality: weights 1 except dynamic degree 0.5 -> (0.5 + 1 + 0 + 0.5 + 0.5*0.8 + 0.6 + 0.7) / 6.5
QUALITY = 3.7 / 6.5
# Semantic: all weights 1 -> (0.9 + 0.5 + 0.8 + 0.85 + 0.6 + 0.5 + 0.5 + 0.5 + 0.75) / 9
SEMANTIC = 5.9 / 9
TOTAL = (4 * QUALITY + SEMANTIC) / 5
TOL = 1e-12  # float rounding only


def _raw(name):
    lo, hi = REF_MIN_MAX[name]
    return lo + N_T2V[name] * (hi - lo)


def _vbench_file(path, scores):
    """A result file in vbench's layout: {dimension: [score, [per-video results]]}."""
    data = {k: [v, [{"video_path": f"/v/{k}-0.mp4", "video_results": v}]] for k, v in scores.items()}
    path.write_text(json.dumps(data))


@pytest.fixture
def t2v_results(tmp_path):
    names = list(N_T2V)
    # three files as three vbench runs write them; keys with underscores (vbench's own) and one with spaces
    _vbench_file(tmp_path / "a_eval_results.json", {n.replace(" ", "_"): _raw(n) for n in names[:5]})
    _vbench_file(tmp_path / "b_eval_results.json", {n.replace(" ", "_"): _raw(n) for n in names[5:12]})
    _vbench_file(tmp_path / "c_eval_results.json", {n: _raw(n) for n in names[12:]})
    (tmp_path / "a_full_info.json").write_text("[]")  # vbench's other output: must be ignored
    return tmp_path


def test_t2v_groups_match_hand_computation(t2v_results):
    raw = load_results(t2v_results)
    assert set(raw) == set(T2V_QUALITY) | set(T2V_SEMANTIC) and len(raw) == 16
    s = aggregate(raw, "t2v")
    assert s.missing == []
    for name, n in N_T2V.items():
        assert s.normalized[name.replace(" ", "_")] == pytest.approx(n, abs=TOL)
    assert s.groups["quality"] == pytest.approx(QUALITY, abs=TOL)
    assert s.groups["semantic"] == pytest.approx(SEMANTIC, abs=TOL)
    assert s.groups["total"] == pytest.approx(TOTAL, abs=TOL)
    assert math.isclose(TOTAL, 0.5864957264957265, abs_tol=1e-15)  # the hand value, printed once


def _vbench_formula(raw_spaced):
    """VBench's cal_final_score.py arithmetic, written out independently."""
    weight = {k: (0.5 if k == "dynamic degree" else 1.0) for k in REF_MIN_MAX}
    norm = {k: (raw_spaced[k] - lo) / (hi - lo) * weight[k] for k, (lo, hi) in REF_MIN_MAX.items()}
    quality_keys = ["subject consistency", "background consistency", "temporal flickering", "motion smoothness",
                    "aesthetic quality", "imaging quality", "dynamic degree"]
    semantic_keys = [k for k in REF_MIN_MAX if k not in quality_keys]
    q = sum(norm[k] for k in quality_keys) / sum(weight[k] for k in quality_keys)
    s = sum(norm[k] for k in semantic_keys) / sum(weight[k] for k in semantic_keys)
    return q, s, (q * 4 + s * 1) / 5


def test_t2v_random_scores_match_vbench_formula():
    rng = random.Random(0)
    for _ in range(20):
        raw_spaced = {k: rng.uniform(lo, hi) for k, (lo, hi) in REF_MIN_MAX.items()}
        s = aggregate({k.replace(" ", "_"): v for k, v in raw_spaced.items()}, "t2v")
        q, sem, tot = _vbench_formula(raw_spaced)
        assert (s.groups["quality"], s.groups["semantic"], s.groups["total"]) == pytest.approx((q, sem, tot), abs=TOL)


def test_i2v_groups_match_hand_computation(tmp_path):
    raw = {"camera_motion": 0.3, "i2v_subject": 0.1462 + 0.9 * 0.8538, "i2v_background": 1.0,
           "subject_consistency": 0.1462 + 0.5 * 0.8538, "background_consistency": 1.0,
           "motion_smoothness": 0.706 + 0.5 * 0.2915, "dynamic_degree": 0.4, "aesthetic_quality": 0.6,
           "imaging_quality": 0.7}
    _vbench_file(tmp_path / "i2v_eval_results.json", raw)
    s = aggregate(load_results(tmp_path / "i2v_eval_results.json"), "i2v")
    i2v = (0.1 * 0.3 + 0.9 + 1.0) / 2.1  # camera motion weighs 0.1
    quality = (0.5 + 1.0 + 0.5 + 0.5 * 0.4 + 0.6 + 0.7) / 5.5  # dynamic degree weighs 0.5
    assert s.groups["i2v"] == pytest.approx(i2v, abs=TOL)
    assert s.groups["quality"] == pytest.approx(quality, abs=TOL)
    assert s.groups["total"] == pytest.approx((quality + i2v) / 2, abs=TOL)
    assert set(s.raw) == set(I2V_CONDITION) | set(I2V_QUALITY)


def test_missing_unknown_and_conflicting_dimensions(tmp_path, t2v_results):
    raw = load_results(t2v_results)
    del raw["color"]
    s = aggregate(raw, "t2v")
    assert s.missing == ["color"]
    assert s.groups["semantic"] is None and s.groups["total"] is None  # never silently 0 (VBench's script does)
    assert s.groups["quality"] == pytest.approx(QUALITY, abs=TOL)
    assert "missing dimensions" in format_table(s) and "color" in format_table(s)
    with pytest.raises(ValueError, match=r"not part of the VBench t2v suite"):
        aggregate({**raw, "camera_motion": 0.5}, "t2v")
    _vbench_file(tmp_path / "z_eval_results.json", {"color": 0.1})
    _vbench_file(tmp_path / "y_eval_results.json", {"color": 0.2})
    with pytest.raises(ValueError, match=r"'color' has two scores"):
        load_results([tmp_path / "y_eval_results.json", tmp_path / "z_eval_results.json"])
    (tmp_path / "bad_eval_results.json").write_text(json.dumps({"color": ["n/a", []]}))
    with pytest.raises(ValueError, match="no finite score"):
        load_results(tmp_path / "bad_eval_results.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*_eval_results.json"):
        load_results(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_results(tmp_path / "absent")


def test_report_with_baseline_deltas_table_json_png(tmp_path, t2v_results):
    ours = aggregate(load_results(t2v_results), "t2v")
    teacher_raw = {k: v - 0.01 for k, v in ours.raw.items()}  # every raw score 1 point lower
    teacher = aggregate(teacher_raw, "t2v")
    paths = write_report(ours, tmp_path / "report", teacher, names=("student", "teacher"), extra={"name": "student"})
    data = json.loads(paths["json"].read_text())
    assert data["delta"]["color"] == pytest.approx(0.01, abs=1e-12)
    # Total delta by hand: each normalized score moves by 0.01 / (max - min)
    dq = sum(w * 0.01 / (hi - lo) for k, (lo, hi) in REF_MIN_MAX.items()
             for w in [0.5 if k == "dynamic degree" else 1.0] if k.replace(" ", "_") in T2V_QUALITY) / 6.5
    ds = sum(0.01 / (hi - lo) for k, (lo, hi) in REF_MIN_MAX.items() if k.replace(" ", "_") in T2V_SEMANTIC) / 9
    assert data["delta"]["total"] == pytest.approx((4 * dq + ds) / 5, abs=1e-12)
    assert Scores.from_dict(data["scores"]).groups == ours.groups
    table = paths["table"].read_text()
    assert "teacher raw" in table and "+1.00" in table and f"{100 * TOTAL:.2f}" in table
    with Image.open(paths["png"]) as im:
        assert im.format == "PNG" and im.size[0] > 400
