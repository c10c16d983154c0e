"""Step schedules: the one check that a schedule is strictly decreasing inside its time range, and per-block
schedules of causal generation (a flat list shared by every block, or one list per block).

Used by the rCM sampler (TrigFlow times in ``[0, pi/2]``), the self-forcing rollout (TrigFlow times in
``(0, pi/2]``) and streaming generation (rectified-flow times in ``(0, 1]``).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_schedule", "block_schedule", "block_schedules"]


def check_schedule(times: Sequence[float], *, low: float, high: float, what: str = "schedule",
                   include_low: bool = False) -> list[float]:
    """``times`` as floats, after checking they are non-empty, strictly decreasing and inside
    ``(low, high]`` (``[low, high]`` with ``include_low``); raises ``ValueError`` naming ``what``."""
    out = [float(v) for v in times]
    inside = (lambda v: low <= v <= high) if include_low else (lambda v: low < v <= high)
    if not out or not all(map(inside, out)) or any(a <= b for a, b in zip(out, out[1:])):
        bracket = "[" if include_low else "("
        raise ValueError(f"{what} {out} must be strictly decreasing times in {bracket}{low:g}, {high:g}]")
    return out


def block_schedule(schedule: Sequence[float] | Sequence[Sequence[float]], index: int) -> list[float]:
    """The schedule of block ``index``: a flat schedule is shared by every block; a list of schedules is per
    block, its last entry repeated for later blocks."""
    if len(schedule) and isinstance(schedule[0], Sequence):
        return [float(v) for v in schedule[min(index, len(schedule) - 1)]]
    return [float(v) for v in schedule]


def block_schedules(schedule: Sequence[float] | Sequence[Sequence[float]], num_blocks: int, *, low: float,
                    high: float, what: str = "schedule") -> list[list[float]]:
    """:func:`block_schedule` of every block, each checked by :func:`check_schedule`."""
    if len(schedule) == 0:
        raise ValueError(f"{what} is empty")
    return [check_schedule(block_schedule(schedule, i), low=low, high=high, what=what) for i in range(num_blocks)]
