"""The manifest's coverage against direct counts and ASE distances of the input structures."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from data_pipeline.build.coverage import GPA_PER_EV_A3

QUANTITIES = ("nearest_distance", "volume_per_atom", "pressure", "force")


def ase_nearest(atoms) -> float:
    """Smallest distance between two atoms or an atom and an image, by ASE's neighbour list
    (NaN for a lone free atom)."""
    from ase.neighborlist import neighbor_list

    if len(atoms) < 2 and not atoms.pbc.any():
        return math.nan
    cutoff = 4.0
    while not len(d := neighbor_list("d", atoms, cutoff)):
        cutoff *= 2
    return float(d.min())


def kept_inputs(root, out) -> dict[str, list]:
    """Per fidelity the input frames that reached the shards (all minus rejects.jsonl's)."""
    import ase.io

    rejected = {(r["file"], r["index"]) for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    fidelity = {"a.extxyz": "EMT", "b.extxyz": "EMT-b"}
    kept: dict[str, list] = {}
    for name, fid in fidelity.items():
        frames = ase.io.read(root / name, ":")
        kept[fid] = [a for i, a in enumerate(frames) if (name, i) not in rejected]
    return kept


def test_counts_match_the_inputs(coverage_built):
    root, out, m = coverage_built
    assert m["rejects"]["by_reason"] == {"reference_outlier": 1}  # the outlier is not counted below
    kept = kept_inputs(root, out)
    for fid, frames in kept.items():
        cov = m["coverage"]["fidelities"][fid]
        assert cov["structures"] == len(frames) and cov["atoms"] == sum(len(a) for a in frames)
        symbols = [set(a.get_chemical_symbols()) for a in frames]
        atoms = {}
        for a in frames:
            for s in a.get_chemical_symbols():
                atoms[s] = atoms.get(s, 0) + 1
        assert cov["elements"] == {s: {"atoms": atoms[s], "structures": sum(s in e for e in symbols)}
                                   for s in cov["elements"]}
        assert set(cov["elements"]) == set(atoms)
        from ase.data import atomic_numbers

        pairs = {}
        for present in symbols:
            for a, b in itertools.combinations(sorted(present, key=atomic_numbers.get), 2):
                pairs[f"{a}-{b}"] = pairs.get(f"{a}-{b}", 0) + 1
        assert cov["pairs"] == pairs
        expected = {"nearest_distance": sum(len(a) > 1 or a.pbc.any() for a in frames),
                    "volume_per_atom": sum(a.pbc.all() for a in frames),
                    "pressure": sum("REF_stress" in a.info for a in frames),
                    "force": cov["atoms"]}
        for q in QUANTITIES:
            h = cov[q]
            assert h["count"] == expected[q], (fid, q)
            assert h["below"] + sum(h["counts"]) + h["above"] == h["count"]
            assert len(h["counts"]) == len(m["coverage"]["edges"][q]) - 1
    assert m["coverage"]["fidelities"]["EMT"]["pairs"]["O-Cu"] == 1


def test_ranges_match_ase(coverage_built):
    root, out, m = coverage_built
    for fid, frames in kept_inputs(root, out).items():
        cov = m["coverage"]["fidelities"][fid]
        near = [d for d in map(ase_nearest, frames) if d == d]
        bulk = [a.get_volume() / len(a) for a in frames if a.pbc.all()]
        pressure = [-np.sum(a.info["REF_stress"][:3]) / 3 * GPA_PER_EV_A3 for a in frames if "REF_stress" in a.info]
        force = np.concatenate([np.linalg.norm(a.arrays["REF_forces"], axis=1) for a in frames])
        for q, values in zip(QUANTITIES, (near, bulk, pressure, force)):
            assert (cov[q]["min"], cov[q]["max"]) == pytest.approx((min(values), max(values)), rel=1e-9), (fid, q)
    # the one-atom cell's neighbour is its own image: a / sqrt(2), the smallest in the data
    assert m["coverage"]["fidelities"]["EMT"]["nearest_distance"]["min"] <= 3.61 / math.sqrt(2) + 1e-9


def test_same_coverage_with_1_or_2_workers(coverage_built, tmp_path):
    from data_pipeline.build import build
    from tests.conftest import coverage_recipe

    root, _, m = coverage_built
    one = build(coverage_recipe(root, shards=3), tmp_path / "one", workers=1, progress=False)
    assert one["coverage"] == m["coverage"]


def test_screen_distances_are_exact(tmp_path):
    """The screen's nearest-neighbour distances (random triclinic cells, slabs and clusters
    near the limits) and the k-d tree's for the rest equal ASE's, for every valid record."""
    from ase import Atoms

    from data_pipeline.build.coverage import nearest_distance
    from data_pipeline.build.recipe import ValidationConfig
    from data_pipeline.build.screen import screen_many
    from data_pipeline.build.validate import Rejected, check_fully
    from tests.data_pipeline.build.test_validate import _screen_case

    rng = np.random.default_rng(7)
    limits = ValidationConfig(max_atoms=20, min_distance=0.6, max_abs_energy_per_atom=20.0, max_force=3.0,
                              max_abs_stress=0.3)
    recs = [_screen_case(rng, limits) for _ in range(400)]
    _, screened = screen_many(recs, limits)
    checked = settled = 0
    for rec, d in zip(recs, screened):
        try:
            check_fully(rec, limits, False)
        except Rejected:
            continue
        truth = ase_nearest(Atoms(numbers=rec.numbers, positions=rec.positions, cell=rec.cell, pbc=rec.pbc))
        np.testing.assert_allclose(nearest_distance(rec), truth, rtol=1e-9)
        checked += 1
        if d == d:
            np.testing.assert_allclose(d, truth, rtol=1e-9)
            settled += 1
    assert checked > 60 and settled > 30, (checked, settled)
