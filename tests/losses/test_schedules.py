"""The one schedule check and per-block schedule selection."""

import math

import pytest

from rcm_losses.schedules import block_schedule, block_schedules, check_schedule


@pytest.mark.parametrize("times", [[], [0.5, 0.5], [0.4, 0.6], [1.2, 0.5], [0.5, 0.0]])
def test_check_schedule_refuses(times):
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_schedule(times, low=0.0, high=1.0, what="x")


def test_check_schedule_accepts_and_includes_low_when_asked():
    assert check_schedule([1.0, 0.5], low=0.0, high=1.0) == [1.0, 0.5]
    assert check_schedule([math.pi / 2, 0.0], low=0.0, high=math.pi / 2, include_low=True) == [math.pi / 2, 0.0]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_schedule([1.0, 0.0], low=0.0, high=1.0)


def test_block_schedule_flat_and_per_block_with_last_repeated():
    assert block_schedule([0.9, 0.5], 7) == [0.9, 0.5]
    per_block = [[0.9, 0.6, 0.3], [0.8, 0.4]]
    assert block_schedule(per_block, 0) == [0.9, 0.6, 0.3]
    assert block_schedule(per_block, 1) == block_schedule(per_block, 5) == [0.8, 0.4]
    assert block_schedules(per_block, 3, low=0, high=1) == [[0.9, 0.6, 0.3], [0.8, 0.4], [0.8, 0.4]]
    with pytest.raises(ValueError, match="empty"):
        block_schedules([], 2, low=0, high=1)
