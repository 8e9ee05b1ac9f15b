"""The time limit keeps room for what really follows a step: whole loop iterations (the
evaluation and checkpoint that fall in them) and a checkpoint save, estimated before the
first one is timed."""

from __future__ import annotations

import time

import pytest

from pretrain.preemption import StopFlag, estimate_save_seconds


def _flag(limit: float, elapsed: float, save_estimate: float = 0.0) -> StopFlag:
    flag = StopFlag(limit, save_estimate)
    flag.start = time.monotonic() - elapsed  # as if the process started ``elapsed`` s ago
    flag.close()
    return flag


def test_an_iteration_with_an_evaluation_counts_whole():
    """Steps of 1 s, but one iteration also evaluated for 30 s: with 50 s left the next
    iteration may evaluate again, so the run stops now."""
    flag = _flag(limit=100.0, elapsed=50.0)
    assert flag.wanted(1.0) == 0.0
    assert flag.wanted(31.0) == 1.0 and "time limit" in flag.reason


def test_the_first_save_is_estimated_before_one_was_timed():
    """20 s left, 1 s iterations, no save timed yet: a 30 s estimated save does not fit."""
    assert _flag(100.0, 80.0, save_estimate=0.0).wanted(1.0) == 0.0
    assert _flag(100.0, 80.0, save_estimate=30.0).wanted(1.0) == 1.0
    timed = _flag(100.0, 80.0, save_estimate=30.0)
    timed.saved(5.0)  # a measured save replaces the estimate
    assert timed.wanted(1.0) == 0.0


@pytest.mark.parametrize("stage,ranks,expected_gb", [(0, 4, 16.0), (1, 4, 10.0), (3, 4, 4.0)])
def test_save_estimate_follows_what_each_rank_writes(stage, ranks, expected_gb):
    """1e9 parameters with EMA: fp32 weights 4 GB, AdamW moments 8 GB, EMA 4 GB; ZeRO-1
    shards the moments, ZeRO-3 everything."""
    seconds = estimate_save_seconds(10**9, ranks, stage, ema=True, write_bytes_per_s=1e9, fixed_s=0.0)
    assert seconds == pytest.approx(expected_gb)
