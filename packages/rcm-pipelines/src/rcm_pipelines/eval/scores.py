"""VBench scores: the per-dimension results of the `vbench` package aggregated into Quality / Semantic / Total.

The constants are facts read from VBench's own scoring code (Vchitect/VBench ``scripts/constant.py`` and
``scripts/cal_final_score.py`` / ``scripts/cal_i2v_final_score.py``, master as of 2025-2026); the arithmetic:

    normalized_d = (raw_d - min_d) / (max_d - min_d)          (not clipped, as VBench does not clip)
    group        = sum_d weight_d * normalized_d / sum_d weight_d   over the dimensions of the group
    T2V: Total = (4 * Quality + 1 * Semantic) / 5;  I2V: Total = (1 * Quality + 1 * I2V) / 2

T2V: Quality = the 7 video-quality dimensions, Semantic = the 9 others; dynamic degree weighs 0.5, all
others 1. I2V (VBench++): "I2V" = camera motion (weight 0.1) + video-image subject / background
consistency; Quality = 6 quality dimensions (dynamic degree 0.5); temporal flickering is not scored.
Scores are reported in percent (x100), as on the VBench leaderboard.

`load_results` reads the ``*_eval_results.json`` files `vbench` writes (``{dimension: [score, per_video]}``);
`aggregate` computes the groups (a group with a missing dimension is ``None`` and the missing names are
listed, never silently zero as in VBench's script); `format_table`, `write_report` and `plot_scores` print
and write the result, with the deltas to a baseline (the teacher scored under the same harness).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "Suite",
    "T2V_QUALITY",
    "T2V_SEMANTIC",
    "I2V_QUALITY",
    "I2V_CONDITION",
    "NORMALIZE",
    "WEIGHTS",
    "dimensions",
    "Scores",
    "load_results",
    "aggregate",
    "format_table",
    "plot_scores",
    "write_report",
]

Suite = Literal["t2v", "i2v"]

T2V_QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
               "dynamic_degree", "aesthetic_quality", "imaging_quality")
"""The 7 T2V "Quality" dimensions (VBench ``QUALITY_LIST``)."""
T2V_SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
                "appearance_style", "temporal_style", "overall_consistency")
"""The 9 T2V "Semantic" dimensions (VBench ``SEMANTIC_LIST``)."""
I2V_CONDITION = ("camera_motion", "i2v_subject", "i2v_background")
"""The 3 VBench-I2V "I2V" (video-condition) dimensions (VBench ``I2V_LIST``)."""
I2V_QUALITY = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree",
               "aesthetic_quality", "imaging_quality")
"""The 6 VBench-I2V "Quality" dimensions (VBench ``I2V_QUALITY_LIST``)."""

# Per-dimension (min, max) of VBench's normalization: VBench scripts/constant.py NORMALIZE_DIC (T2V) and
# NORMALIZE_DIC_I2V (I2V); both tables agree on the dimensions they share.
NORMALIZE: dict[str, tuple[float, float]] = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
    "camera_motion": (0.0, 1.0),
    "i2v_subject": (0.1462, 1.0),
    "i2v_background": (0.2615, 1.0),
}

# Weights: VBench scripts/constant.py DIM_WEIGHT / DIM_WEIGHT_I2V (dynamic degree 0.5, I2V camera motion 0.1,
# every other dimension 1); group weights QUALITY_WEIGHT = 4, SEMANTIC_WEIGHT = 1, I2V_*_WEIGHT = 1.
WEIGHTS: dict[str, float] = {d: 1.0 for d in NORMALIZE} | {"dynamic_degree": 0.5, "camera_motion": 0.1}
_GROUPS: dict[str, dict[str, tuple[tuple[str, ...], float]]] = {
    "t2v": {"quality": (T2V_QUALITY, 4.0), "semantic": (T2V_SEMANTIC, 1.0)},
    "i2v": {"quality": (I2V_QUALITY, 1.0), "i2v": (I2V_CONDITION, 1.0)},
}


def dimensions(suite: Suite) -> tuple[str, ...]:
    """Every scored dimension of ``suite``, in table order (groups in VBench's order)."""
    if suite not in _GROUPS:
        raise ValueError(f"unknown VBench suite {suite!r}: use 't2v' or 'i2v'")
    return tuple(d for dims, _ in _GROUPS[suite].values() for d in dims)


@dataclass
class Scores:
    """Aggregated VBench scores, all in [0, 1] (x100 when printed).

    ``raw``: the vbench score of each dimension found; ``normalized``: ``(raw - min) / (max - min)``
    (unweighted); ``groups``: ``{"quality": q, "semantic" | "i2v": s, "total": t}`` with ``None`` for a group
    that misses a dimension (``total`` needs both); ``missing``: dimensions of the suite without a result.
    """

    suite: Suite
    raw: dict[str, float]
    normalized: dict[str, float]
    groups: dict[str, float | None]
    missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "raw": self.raw, "normalized": self.normalized, "groups": self.groups,
                "missing": self.missing, "weights": {d: WEIGHTS[d] for d in self.raw},
                "normalize_min_max": {d: list(NORMALIZE[d]) for d in self.raw}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scores:
        return cls(suite=data["suite"], raw=dict(data["raw"]), normalized=dict(data["normalized"]),
                   groups=dict(data["groups"]), missing=list(data.get("missing", [])))


# ------------------------------------------------------------------------------------------ reading
def _score_of(value: Any, dim: str, path: Path) -> float:
    """``[score, per_video]`` (vbench's layout) or a bare number -> float."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: dimension {dim!r} has no finite score (expected [score, per_video_results] "
                         f"or a number, got {value!r:.80})")
    return float(value)


def load_results(paths: str | Path | Sequence[str | Path]) -> dict[str, float]:
    """Raw per-dimension scores from vbench result files: files, or directories searched for
    ``*_eval_results.json``. Keys are normalized to ``snake_case`` (``"dynamic degree"`` ->
    ``dynamic_degree``). A dimension found twice with different scores is an error naming both files."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for p in map(Path, items):
        if p.is_dir():
            files += sorted(p.glob("*_eval_results.json"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"vbench results: {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no *_eval_results.json found in {', '.join(map(str, items))}")
    raw: dict[str, float] = {}
    origin: dict[str, Path] = {}
    for f in files:
        data = json.loads(f.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{f}: expected a mapping {{dimension: [score, per_video]}}, got {type(data).__name__}")
        for key, value in data.items():
            dim = key.strip().lower().replace(" ", "_").replace("-", "_")
            score = _score_of(value, key, f)
            if dim in raw and raw[dim] != score:
                raise ValueError(f"dimension {dim!r} has two scores: {raw[dim]} in {origin[dim]} and {score} in {f}")
            raw[dim], origin[dim] = score, f
    return raw


# ------------------------------------------------------------------------------------------ arithmetic
def _group(normalized: Mapping[str, float], dims: Sequence[str]) -> float | None:
    if any(d not in normalized for d in dims):
        return None
    return sum(WEIGHTS[d] * normalized[d] for d in dims) / sum(WEIGHTS[d] for d in dims)


def aggregate(raw: Mapping[str, float], suite: Suite = "t2v") -> Scores:
    """VBench's normalization, weights and group averages of ``raw`` (module docstring). Dimensions that are
    not part of ``suite`` are an error (a T2V run scored with I2V names, or a typo)."""
    known = set(dimensions(suite))
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"dimensions {unknown} are not part of the VBench {suite} suite (known: {sorted(known)})")
    normalized = {}
    for d, value in raw.items():
        lo, hi = NORMALIZE[d]
        normalized[d] = (value - lo) / (hi - lo)
    groups: dict[str, float | None] = {}
    weighted = 0.0
    for name, (dims, group_weight) in _GROUPS[suite].items():
        groups[name] = _group(normalized, dims)
        weighted = None if groups[name] is None or weighted is None else weighted + group_weight * groups[name]
    total_weight = sum(w for _, w in _GROUPS[suite].values())
    groups["total"] = None if weighted is None else weighted / total_weight
    missing = [d for d in dimensions(suite) if d not in raw]
    ordered = {d: raw[d] for d in dimensions(suite) if d in raw}
    return Scores(suite, ordered, {d: normalized[d] for d in ordered}, groups, missing)


# ------------------------------------------------------------------------------------------ output
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _delta(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{100 * (a - b):+.2f}"


def format_table(scores: Scores, baseline: Scores | None = None, *, names: tuple[str, str] = ("ours", "teacher")
                 ) -> str:
    """A text table: raw and normalized score of every dimension, then the groups (percent); with
    ``baseline``, its raw score and the delta ``ours - baseline`` (percentage points)."""
    head = ["dimension", f"{names[0]} raw", "normalized"] + ([f"{names[1]} raw", "delta"] if baseline else [])
    rows = []
    for d in dimensions(scores.suite):
        if d not in scores.raw and (baseline is None or d not in baseline.raw):
            continue
        row = [d, _pct(scores.raw.get(d)), _pct(scores.normalized.get(d))]
        if baseline is not None:
            row += [_pct(baseline.raw.get(d)), _delta(scores.raw.get(d), baseline.raw.get(d))]
        rows.append(row)
    group_rows = []
    for g, value in scores.groups.items():
        row = [g.upper() if g == "i2v" else g.capitalize(), _pct(value), ""]
        if baseline is not None:
            row += [_pct(baseline.groups.get(g)), _delta(value, baseline.groups.get(g))]
        group_rows.append(row)
    widths = [max(len(str(r[i])) for r in [head, *rows, *group_rows]) for i in range(len(head))]

    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    rule = "-" * len(line(head))
    out = [line(head), rule, *map(line, rows), rule, *map(line, group_rows)]
    if scores.missing:
        out.append(f"missing dimensions (their group and Total are not computed): {', '.join(scores.missing)}")
    out.append("Quality/Semantic/Total: VBench normalization (raw - min) / (max - min) and weights "
               "(dynamic degree 0.5" + (", camera motion 0.1" if scores.suite == "i2v" else "") + "); "
               + ("Total = (4 Quality + Semantic) / 5" if scores.suite == "t2v" else "Total = (Quality + I2V) / 2"))
    return "\n".join(out)


def plot_scores(scores: Scores, path: str | Path, baseline: Scores | None = None, *,
                names: tuple[str, str] = ("ours", "teacher"), title: str = "VBench") -> Path:
    """A bar-chart PNG: raw score per dimension and the groups (percent), side by side with ``baseline``."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    labels = [d for d in dimensions(scores.suite) if d in scores.raw or (baseline and d in baseline.raw)]
    labels += [g for g in scores.groups]
    series = [(names[0], scores)] + ([(names[1], baseline)] if baseline is not None else [])

    def value(s: Scores, key: str) -> float:
        v = s.groups.get(key) if key in s.groups else s.raw.get(key)
        return float("nan") if v is None else 100 * v

    x = np.arange(len(labels))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(8.0, 0.55 * len(labels)), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, (name, s) in enumerate(series):
        ax.bar(x + (k - (len(series) - 1) / 2) * width, [value(s, key) for key in labels], width, label=name)
    ax.set_xticks(x, [lab.replace("_", " ") for lab in labels], rotation=60, ha="right", fontsize=8)
    ax.axvline(len(labels) - len(scores.groups) - 0.5, color="gray", linewidth=0.8)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_report(scores: Scores, out_dir: str | Path, baseline: Scores | None = None, *,
                 names: tuple[str, str] = ("ours", "teacher"), extra: Mapping[str, Any] | None = None,
                 stem: str = "vbench_scores") -> dict[str, Path]:
    """Write ``<stem>.json`` (scores, baseline, deltas, ``extra``), ``<stem>.txt`` (the table) and
    ``<stem>.png`` (the bar chart) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"scores": scores.as_dict(), **(dict(extra) if extra else {})}
    if baseline is not None:
        keys = list(scores.raw) + list(scores.groups)
        ours = scores.raw | scores.groups
        theirs = baseline.raw | baseline.groups
        data["baseline"] = {"name": names[1], "scores": baseline.as_dict()}
        data["delta"] = {k: (None if ours.get(k) is None or theirs.get(k) is None else ours[k] - theirs[k])
                         for k in keys}
    table = format_table(scores, baseline, names=names)
    paths = {"json": out / f"{stem}.json", "table": out / f"{stem}.txt", "png": out / f"{stem}.png"}
    paths["json"].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    paths["table"].write_text(table + "\n")
    plot_scores(scores, paths["png"], baseline, names=names)
    return paths
