"""Reference audit: a corrupted energy is rejected, mixed settings and offsets are flagged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from data_pipeline.build import build
from data_pipeline.build.audit import _Tables, fit_fidelity, flag_groups
from data_pipeline.build.recipe import load_recipe
from data_pipeline.build.stats import RecordTable
from data_pipeline.manifest import summary_table
from tests.synthetic import labelled_frames, write_frames

EMT_KEYS = {"energy_key": "REF_energy", "forces_key": "REF_forces", "stress_key": "REF_stress"}


def _recipe(tmp_path, name: str) -> object:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"root": str(tmp_path), "shards": 2, "sources": [
        {"path": f"{name}/*.extxyz", "dataset": "emt", "fidelity": "EMT", **EMT_KEYS}]}))
    return load_recipe(path)


def test_corrupted_energy_is_rejected_and_references_are_the_clean_ones(ray_local, tmp_path):
    frames = labelled_frames(40, seed=7, method="emt", max_atoms=16)
    write_frames(tmp_path / "clean" / "a.extxyz", frames[:17] + frames[18:])
    frames[17].info["REF_energy"] = 1e7  # a corrupted total energy
    write_frames(tmp_path / "dirty" / "a.extxyz", frames)
    (tmp_path / "dirty" / "b.extxyz").write_text("")  # an input that yields no frame
    clean = build(_recipe(tmp_path, "clean"), tmp_path / "out-clean", workers=2, progress=False)
    dirty = build(_recipe(tmp_path, "dirty"), tmp_path / "out-dirty", workers=2, progress=False)

    assert dirty["records"] == clean["records"] == 39
    assert dirty["rejects"]["by_reason"] == {"reference_outlier": 1}
    (line,) = (tmp_path / "out-dirty" / "rejects.jsonl").read_text().splitlines()
    reject = json.loads(line)
    assert reject["file"] == "dirty/a.extxyz" and reject["index"] == 17
    assert "median" in reject["detail"] and "MAD" in reject["detail"]
    ref_clean, ref_dirty = clean["element_references"]["EMT"], dirty["element_references"]["EMT"]
    for symbol, energy in ref_clean["energies"].items():
        assert ref_dirty["energies"][symbol] == pytest.approx(energy, abs=1e-9), symbol
    assert ref_dirty["rms_residual"] == pytest.approx(ref_clean["rms_residual"], rel=1e-9)
    assert ref_dirty["outliers"]["rejected"] == 1 and ref_dirty["outliers"]["converged"]
    r_dirty, r_clean = (m["groups"][0]["residual_per_atom"] for m in (dirty, clean))
    for key in ("structures", "median", "mad", "mean", "std", "max"):
        assert r_dirty[key] == pytest.approx(r_clean[key], rel=1e-9, abs=1e-12), key

    assert dirty["units"] == {"energy": "eV", "forces": "eV/A", "stress": "eV/A^3", "stress_sign": "ase"}
    assert dirty["label_units"][0]["factors"] == {"energy": 1.0, "forces": 1.0, "stress": 1.0}
    assert dirty["empty_inputs"] == ["dirty/b.extxyz"]
    assert any("dirty/b.extxyz" in w for w in dirty["warnings"])
    text = summary_table(dirty)
    assert "reference_outlier=1" in text and "WARNING: dirty/b.extxyz" in text
    assert "outliers: 1 rejected beyond 50 scaled MADs" in text


def _tables(shifts: dict[str, tuple[float, float]], n: int = 300, seed: int = 0) -> _Tables:
    """One unit per dataset: linear energies plus noise, a fraction shifted per atom."""
    rng = np.random.default_rng(seed)
    refs = {13: -3.7, 28: -5.4, 8: -4.9}
    units = []
    for uid, (dataset, (fraction, shift)) in enumerate(shifts.items()):
        table = RecordTable()
        for i in range(n):
            z = rng.choice(list(refs), size=int(rng.integers(2, 20)))
            e = sum(refs[k] for k in z) + len(z) * (rng.normal(0, 0.05) + shift * (rng.random() < fraction))
            table.add(i, z, e, None, None)
        units.append((uid, dataset, table.to_arrays()))
    return _Tables(units, lambda t: t)


def test_mixed_settings_form_clusters_and_are_flagged():
    fit = fit_fidelity(_tables({"mixed": (0.4, 1.5)}), 1e-8, 50.0, 0.01)
    warnings = flag_groups("PBE", fit.groups, 0.01)
    assert fit.groups["mixed"]["flags"] == ["clusters"] and "two clusters" in warnings[0]
    assert fit.groups["mixed"]["clusters"]["fractions"][1] == pytest.approx(0.4, abs=0.06)
    plain = fit_fidelity(_tables({"plain": (0.0, 0.0)}), 1e-8, 50.0, 0.01)
    assert flag_groups("PBE", plain.groups, 0.01) == [] and not plain.drops


def test_a_dataset_offset_from_the_others_is_flagged():
    fit = fit_fidelity(_tables({"a": (0.0, 0.0), "b": (0.0, 0.0), "c": (1.0, 0.8)}), 1e-8, 50.0, 0.01)
    flag_groups("PBE", fit.groups, 0.01)
    assert [d for d, g in fit.groups.items() if "offset" in g.get("flags", [])] == ["c"]
    assert fit.groups["c"]["offset"] == pytest.approx(0.8, abs=0.1)


def test_force_only_records_with_other_elements_get_no_reference():
    rng = np.random.default_rng(1)
    table = RecordTable()
    for i in range(40):
        z = rng.choice([13, 28], size=int(rng.integers(2, 9)))
        table.add(i, z, -3.7 * (z == 13).sum() - 5.4 * (z == 28).sum(), None, None)
    table.add(40, np.array([8, 8, 13]), None, np.zeros((3, 3)), None)  # forces only, with O
    fit = fit_fidelity(_Tables([(0, "d", table.to_arrays())], lambda t: t), 1e-8, 50.0, 0.01)
    fitted = dict(zip(fit.elements.tolist(), fit.fitted.tolist()))
    assert fitted == {8: False, 13: True, 28: True} and fit.n == 40
    np.testing.assert_allclose(fit.coef[fit.fitted], [-3.7, -5.4], atol=1e-6)


def _emt_labelled(atoms):
    from ase.calculators.emt import EMT

    atoms.calc = EMT()
    atoms.info["REF_energy"] = float(atoms.get_potential_energy())
    atoms.arrays["REF_forces"] = atoms.get_forces()
    if atoms.pbc.all():
        atoms.info["REF_stress"] = atoms.get_stress()
    atoms.calc = None
    return atoms


def test_physically_different_records_are_kept_and_a_corrupted_one_rejected(ray_local, tmp_path):
    """Isolated atoms, a cluster, a surface and rattled hot cells are far from the median
    of near-equilibrium bulk data, but valid: they are kept (out of the reference fit,
    reported), while a corrupted energy is still rejected."""
    from ase import Atoms
    from ase.build import bulk, fcc111
    from ase.cluster import Icosahedron

    bulk_frames = labelled_frames(40, seed=11, method="emt", max_atoms=16)
    special = [_emt_labelled(Atoms("Cu")), _emt_labelled(Atoms("Ni")), _emt_labelled(Icosahedron("Cu", 2)),
               _emt_labelled(fcc111("Cu", size=(2, 2, 3), vacuum=6.0, periodic=True))]
    for seed in range(3):  # hot, strongly rattled cells
        hot = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
        hot.rattle(0.15, seed=seed)
        special.append(_emt_labelled(hot))
    corrupted = _emt_labelled(bulk("Cu", "fcc", a=3.6, cubic=True))
    corrupted.info["REF_energy"] = 1e7
    write_frames(tmp_path / "mixed" / "a.extxyz", bulk_frames + special + [corrupted])
    manifest = build(_recipe(tmp_path, "mixed"), tmp_path / "out", workers=2, progress=False)

    assert manifest["records"] == len(bulk_frames) + len(special)  # nothing valid lost
    assert manifest["rejects"]["by_reason"] == {"reference_outlier": 1}
    (line,) = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert json.loads(line)["index"] == len(bulk_frames) + len(special)
    outliers = manifest["element_references"]["EMT"]["outliers"]
    named = {e["index"] for e in outliers["unusual_examples"]}
    first = len(bulk_frames)
    assert first + 1 in named, outliers  # the isolated Ni atom (+4.3 eV/atom): out of the fit, kept
    assert outliers["unusual"] == len(outliers["unusual_examples"]) >= 1
    assert any("kept, left out of the reference fit" in w for w in manifest["warnings"])
    assert "kept out of the fit" in summary_table(manifest)

    recipe = _recipe(tmp_path, "mixed")
    recipe.reference_outlier_bound = None  # the MAD rule alone: the isolated atoms are lost again
    strict = build(recipe, tmp_path / "out-strict", workers=2, progress=False)
    assert strict["rejects"]["by_reason"]["reference_outlier"] == 1 + outliers["unusual"]
    assert strict["records"] == manifest["records"] - outliers["unusual"]
