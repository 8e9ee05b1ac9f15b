"""Manifest statistics: elemental references recovered, parallel moments exact."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.build.audit import _Tables, fit_fidelity
from data_pipeline.build.recipe import ExtraConfig
from data_pipeline.build.stats import ExtraStats, GroupStats, RecordTable, extra_stats


def test_elemental_references_recovered_from_known_energies(ray_local, tmp_path):
    """Energies = sum of known per-element energies + small noise -> the fit returns them."""
    import yaml

    from data_pipeline.build import build
    from data_pipeline.build.recipe import load_recipe
    from tests.synthetic import LINEAR_REFERENCES, labelled_frames, write_frames

    for k in range(2):
        write_frames(tmp_path / "raw" / f"p{k}.extxyz", labelled_frames(150, 10 + k, "linear", 0.3, 24))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"shards": 2, "sources": [
        {"path": "raw/*.extxyz", "dataset": "lin", "fidelity": "toy", "energy_key": "REF_energy",
         "forces_key": "REF_forces", "stress_key": "REF_stress"}]}))
    m = build(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", workers=2, progress=False)
    ref = m["element_references"]["toy"]
    for symbol, energy in ref["energies"].items():
        assert energy == pytest.approx(LINEAR_REFERENCES[symbol], abs=0.01), symbol
    assert ref["rms_residual"] < 0.1 and ref["structures"] == 300


def test_fit_handles_large_total_energies_without_cancellation():
    """All-electron molecular totals (thousands of eV per atom) with a rare heavy element."""
    rng = np.random.default_rng(0)
    truth = {1: -13.6, 6: -1029.0, 8: -2041.0, 16: -10829.0}
    table = RecordTable()
    for i in range(400):
        numbers = rng.choice([1, 6, 8], size=int(rng.integers(3, 30)))
        if i % 100 == 0:  # sulfur in 4 of 400 molecules: a ridge sized to H would bias it
            numbers = np.append(numbers, 16)
        table.add(i, numbers, sum(truth[z] for z in numbers) + rng.normal(0, 1e-3), None, None)
    fit = fit_fidelity(_Tables([(0, "mol", table.to_arrays())], lambda t: t), 1e-8, 50.0, 0.01)
    np.testing.assert_allclose(fit.coef, [-13.6, -1029.0, -2041.0, -10829.0], atol=2e-3)
    assert fit.n == 400 and 5e-4 < fit.rms < 2e-3 and not fit.drops


def test_group_stats_merge_equals_one_pass():
    rng = np.random.default_rng(1)
    records = [(rng.integers(1, 5, int(rng.integers(1, 9))), float(rng.normal(-1e4, 50)),
                rng.normal(size=(3, 3))) for _ in range(50)]
    whole, parts = GroupStats(), [GroupStats(), GroupStats(), GroupStats()]
    for k, (z, e, f) in enumerate(records):
        whole.add(z, e, f, None)
        parts[k % 3].add(z, e, f, None)
    merged = GroupStats()
    for p in parts:
        merged.merge(p)
    a, b = whole.to_json(), merged.to_json()
    assert a["structures"] == b["structures"] and a["elements"] == b["elements"]
    assert a["energy_per_atom_mean"] == pytest.approx(b["energy_per_atom_mean"], rel=1e-12)
    assert a["energy_per_atom_std"] == pytest.approx(b["energy_per_atom_std"], rel=1e-9)
    epa = [e / len(z) for z, e, _ in records]
    assert a["energy_per_atom_std"] == pytest.approx(np.std(epa), rel=1e-9)


def test_extra_stats_merged_from_parts_equal_one_pass():
    """Per-record moments of an extra, merged over tables of any split and a keep mask,
    give numpy's count, mean, RMS and std of the kept records' values (an offset mean, so
    a sum of squares would cancel)."""
    rng = np.random.default_rng(2)
    spec = ExtraConfig(key="q", name="charges")
    sizes = rng.integers(1, 9, 40)
    values = [rng.normal(50.0, 0.1, n) if k % 5 else None for k, n in enumerate(sizes)]  # every 5th absent
    keep = rng.random(40) < 0.8
    merged = ExtraStats()
    for lo, hi in ((0, 7), (7, 8), (8, 30), (30, 40)):
        table = RecordTable([spec])
        for k in range(lo, hi):
            table.add(k, np.full(sizes[k], 29), -1.0, None, None,
                      {} if values[k] is None else {"charges": values[k]})
        merged.merge(extra_stats(table.to_arrays(), keep[lo:hi], "charges"))
    kept = [k for k in range(40) if keep[k]]
    x = np.concatenate([values[k] for k in kept if values[k] is not None])
    entry, warning = merged.to_json(spec, "e")
    assert warning is None
    assert entry == {"records": sum(values[k] is not None for k in kept),
                     "absent": sum(values[k] is None for k in kept), "per": "atom", "shape": [], "unit": "e",
                     "mean": pytest.approx(x.mean(), rel=1e-14),
                     "rms": pytest.approx(np.sqrt(np.mean(x * x)), rel=1e-14),
                     "std": pytest.approx(x.std(), rel=1e-9)}


def test_extras_of_differing_layouts_are_reported():
    """An undeclared layout that differs between records (a 3-vector per structure of a
    3-atom molecule reads as per atom): per "mixed", no shape, and a warning."""
    spec = ExtraConfig(key="v")
    table = RecordTable([spec])
    table.add(0, np.array([1, 1, 8]), -1.0, None, None, {"v": np.ones(3)})
    table.add(1, np.array([1, 1, 8, 8]), -1.0, None, None, {"v": np.ones(3)})
    entry, warning = extra_stats(table.to_arrays(), np.ones(2, bool), "v").to_json(spec, None)
    assert (entry["per"], entry["shape"], entry["records"]) == ("mixed", None, 2)
    assert "'v'" in warning and "per atom shape []: 1 records" in warning
    assert "per structure shape [3]: 1 records" in warning
