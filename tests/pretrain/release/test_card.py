"""The model card's compute: device-hours over every job segment with its own ranks."""

from __future__ import annotations

import json

import pytest

from pretrain.release.card import device_seconds


def _log(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_device_hours_use_each_segments_world_size(tmp_path):
    """A job on 1 rank to step 4 (10 s), then an elastic resume on 2 ranks (6 s): 22 rank-s,
    not (10 + 6) s x the last world size."""
    log = _log(tmp_path / "metrics.jsonl", [
        {"step": 2, "elapsed_s": 5.0, "world_size": 1}, {"step": 4, "elapsed_s": 10.0, "world_size": 1},
        {"step": 6, "elapsed_s": 3.0, "world_size": 2}, {"step": 8, "elapsed_s": 6.0, "world_size": 2}])
    assert device_seconds(log, 8, world=2) == pytest.approx(10 * 1 + 6 * 2)
    assert device_seconds(log, 4, world=2) == pytest.approx(10 * 1)


def test_logs_without_world_sizes_count_the_final_world(tmp_path):
    log = _log(tmp_path / "metrics.jsonl", [{"step": 2, "elapsed_s": 5.0}, {"step": 4, "elapsed_s": 2.0}])
    assert device_seconds(log, 4, world=3) == pytest.approx((5 + 2) * 3)
    assert device_seconds(tmp_path / "missing.jsonl", 4, world=3) == 0.0


def test_known_limits_name_rare_elements_pairs_and_ranges(coverage_built):
    """The card's known limits from the training manifest's coverage: the rare element and
    pair, per fidelity, and the ranges seen; a manifest without coverage says to rebuild."""
    from pretrain.release.card import coverage_limit_lines

    _, _, m = coverage_built
    lines = coverage_limit_lines(m["coverage"])
    emt = next(ln for ln in lines if ln.startswith("  - EMT:"))
    assert "O (1)" in emt and "O-Cu (1)" in emt
    near = m["coverage"]["fidelities"]["EMT"]["nearest_distance"]
    assert f"nearest-neighbour distance {near['min']:.4g} to {near['max']:.4g} A" in emt
    assert "pressure" in emt and "volume per atom" in emt
    assert any(ln.startswith("  - EMT-b:") for ln in lines)
    assert "rebuild the data" in coverage_limit_lines(None)[0]
