"""Big text files split into byte-range work units at frame starts; shard runs."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.build.driver import shard_runs
from data_pipeline.build.sources.extxyz import read_extxyz
from data_pipeline.build.sources.splits import split_points
from tests.synthetic import labelled_frames, write_frames


def _read_split(path, unit_bytes):
    points = split_points(path, unit_bytes) + [path.stat().st_size]
    frames = [f for a, b in zip(points, points[1:]) for _, f in read_extxyz(path, a, b)]
    return points, frames


@pytest.mark.parametrize("unit_bytes", [1 << 16, 100_003])
def test_split_units_read_every_frame_once(tmp_path, unit_bytes):
    path = write_frames(tmp_path / "a.extxyz", labelled_frames(250, seed=3, max_atoms=16))
    whole = [f for _, f in read_extxyz(path)]
    points, frames = _read_split(path, unit_bytes)
    assert len(points) >= 4 and len(frames) == len(whole)
    for a, b in zip(frames, whole):
        np.testing.assert_array_equal(a.positions, b.positions)
        assert a.info["REF_energy"] == b.info["REF_energy"]
        np.testing.assert_array_equal(a.arrays["REF_forces"], b.arrays["REF_forces"])


def test_plain_xyz_whose_comments_are_lone_integers(tmp_path):
    """Comment lines that look like atom counts (a frame number) do not fool the split."""
    rng = np.random.default_rng(0)
    lines = []
    for k in range(3000):
        n = int(rng.integers(1, 6))
        lines += [str(n), str(k % 7)] + [f"Cu {x:.6f} {y:.6f} {z:.6f}" for x, y, z in rng.normal(0, 3, (n, 3))]
    path = tmp_path / "a.xyz"
    path.write_text("\n".join(lines) + "\n")
    whole = [f for _, f in read_extxyz(path)]
    points, frames = _read_split(path, 1 << 16)
    assert len(points) > 1 and len(frames) == len(whole) == 3000
    for a, b in zip(frames, whole):
        np.testing.assert_array_equal(a.positions, b.positions)


def test_shard_runs_are_balanced_consecutive_and_touch_few_units():
    counts = [5, 0, 17, 3, 40, 1, 0, 9]
    runs = shard_runs(counts, 7)
    sizes = [sum(b - a for _, a, b in run) for run in runs]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == sum(counts)
    flat = [(u, r) for run in runs for u, a, b in run for r in range(a, b)]
    assert flat == [(u, r) for u, c in enumerate(counts) for r in range(c)]  # global order kept
    assert sum(len(run) for run in runs) <= len([c for c in counts if c]) + len(runs)
