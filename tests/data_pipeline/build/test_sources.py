"""Readers: every format yields the same frames; databases split into row-range units."""

from __future__ import annotations

import numpy as np
import pytest

import data_pipeline.build.sources as sources
from data_pipeline.build.recipe import Recipe, SourceConfig
from data_pipeline.build.sources import WorkUnit, plan_units, read_unit, resolve_format
from data_pipeline.build.validate import to_record
from tests.synthetic import labelled_frames, with_calculator, write_frames


@pytest.fixture(scope="module")
def frames():
    return with_calculator(labelled_frames(12, seed=3, method="emt", clusters=0.3, max_atoms=16))


@pytest.mark.parametrize("name, fmt", [("a.extxyz", "extxyz"), ("a.traj", "ase"), ("a.db", "db"),
                                       ("a.aselmdb", "aselmdb")])
def test_formats_round_trip_the_same_labels(tmp_path, frames, name, fmt):
    path = write_frames(tmp_path / name, frames)
    assert resolve_format(path, "auto") == fmt
    got = list(read_unit(WorkUnit(0, str(path), name, fmt, 0, None if fmt not in ("db", "aselmdb") else 12)))
    assert [i for i, _ in got] == list(range(12))
    src = SourceConfig(path=name, dataset="d", fidelity="EMT")
    tol = 1e-8 if fmt == "extxyz" else 1e-12  # extxyz is text with 8 decimals
    for (i, frame), atoms in zip(got, frames):
        rec = to_record(frame, src, f"{name}#{i}")
        np.testing.assert_allclose(rec.positions, atoms.positions, rtol=0, atol=tol)
        np.testing.assert_array_equal(rec.numbers, atoms.numbers)
        assert rec.energy == pytest.approx(atoms.calc.results["energy"], abs=tol)
        np.testing.assert_allclose(rec.forces, atoms.calc.results["forces"], atol=1e-6)
        if atoms.pbc.all():
            np.testing.assert_allclose(rec.stress, atoms.calc.results["stress"], atol=1e-6)
        else:
            assert not rec.pbc.any()


def test_db_info_and_data_keys(tmp_path):
    """MACE-style REF_* labels stored as db key-value pairs and data arrays."""
    frames = labelled_frames(5, seed=4, method="emt", max_atoms=8)
    path = write_frames(tmp_path / "ref.db", frames)
    src = SourceConfig(path="ref.db", dataset="d", fidelity="EMT", energy_key="REF_energy",
                       forces_key="REF_forces")
    for (i, frame), atoms in zip(read_unit(WorkUnit(0, str(path), "ref.db", "db", 0, 5)), frames):
        rec = to_record(frame, src, f"ref.db#{i}")
        assert rec.energy == atoms.info["REF_energy"]
        np.testing.assert_allclose(rec.forces, atoms.arrays["REF_forces"], atol=1e-6)


def test_databases_split_into_row_ranges(tmp_path, frames, monkeypatch):
    write_frames(tmp_path / "big.db", frames)
    write_frames(tmp_path / "big.aselmdb", frames)
    monkeypatch.setattr(sources, "DB_ROWS_PER_UNIT", 5)
    recipe = Recipe(sources=[SourceConfig(path="big.*", dataset="d", fidelity="EMT")], root=str(tmp_path))
    units = plan_units(recipe)
    assert [(u.fmt, u.start, u.stop) for u in units] == [
        ("aselmdb", 0, 5), ("aselmdb", 5, 10), ("aselmdb", 10, 12),
        ("db", 0, 5), ("db", 5, 10), ("db", 10, 12)]
    indices = [i for u in units[:3] for i, _ in read_unit(u)]
    assert indices == list(range(12))


def test_unreadable_database_is_named(tmp_path):
    bad = tmp_path / "broken.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    recipe = Recipe(sources=[SourceConfig(path="broken.db", dataset="d", fidelity="EMT")], root=str(tmp_path))
    with pytest.raises(sources.SourceParseError, match="broken.db"):
        plan_units(recipe)
