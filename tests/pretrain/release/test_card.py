"""The model card's compute (device-hours over every job segment with its own ranks) and
its held-out errors by element and force magnitude."""

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


def _bin(lo, hi, atoms, mae=None):
    return {"lo": lo, "hi": hi, "atoms": atoms, **({"forces_mae": mae} if mae is not None else {})}


def test_held_out_metrics_list_force_errors_by_element_and_magnitude():
    """Per fidelity, one row of per-element force MAEs (elements in periodic-table order, '-'
    where the fidelity has none) and one of force-band MAEs with their atom counts."""
    from pretrain.release.card import metrics_lines

    bins = [_bin(0.0, 1.0, 3, 0.01), _bin(1.0, None, 0)]
    held = {"data": {"folder": "test", "content_hash": "b" * 64, "records": 4}, "groups": [],
            "strata": {"PBE": {"elements": {"O": {"atoms": 2, "forces_mae": 0.02},
                                            "H": {"atoms": 4, "forces_mae": 0.01}},
                               "force_bins": bins, "pressure_bins": []},
                       "r2SCAN": {"elements": {"Cu": {"atoms": 1, "forces_mae": 0.5}},
                                  "force_bins": [_bin(0.0, 1.0, 0), _bin(1.0, None, 1, 0.5)], "pressure_bins": []}}}
    lines = metrics_lines(held, {"data": {"content_hash": "a" * 64}})
    rows = [ln for ln in lines[lines.index("### Force errors by element and by force magnitude"):]
            if ln.startswith("| ")]
    assert rows == ["| fidelity | H | O | Cu |", "| PBE | 10.00 | 20.00 | - |", "| r2SCAN | - | - | 500.00 |",
                    "| fidelity | 0-1 | 1 and up |", "| PBE | 10.00 (3) | - (0) |", "| r2SCAN | - (0) | 500.00 (1) |"]
    del held["strata"]
    assert not any(ln.startswith("###") for ln in metrics_lines(held, {"data": {}}))


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
