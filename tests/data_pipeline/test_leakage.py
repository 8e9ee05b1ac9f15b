"""Train/test leakage counted exactly on built folders: copies at the same and at another
fidelity, a near copy, a molecule by formula, and new structures."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from data_pipeline.build import build
from data_pipeline.build.recipe import load_recipe
from data_pipeline.leakage import leakage, leakage_table
from tests.synthetic import labelled_frames, random_cluster, label, write_frames

KEYS = {"energy_key": "REF_energy", "forces_key": "REF_forces", "stress_key": "REF_stress"}


def _labelled(atoms):
    out = label(atoms, "emt")
    atoms.info["REF_energy"] = out["energy"]
    atoms.arrays["REF_forces"] = np.asarray(out["forces"])
    if "stress" in out:
        atoms.info["REF_stress"] = np.asarray(out["stress"])
    return atoms


def _copy(atoms, seed: int):
    out = atoms[np.random.default_rng(seed).permutation(len(atoms))]
    out.info = dict(atoms.info)
    out.translate([0.9, -1.7, 0.4])
    if atoms.pbc.any():
        out.wrap()
    return out


def _build(root, name, sources, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"root": str(root), "shards": 2, "sources": [
        {"path": p, "dataset": "d", "fidelity": f, **KEYS} for p, f in sources]}))
    build(load_recipe(path), tmp_path / name, workers=2, progress=False)
    return tmp_path / name


@pytest.fixture(scope="module")
def folders(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leak")
    train = labelled_frames(20, seed=21, method="emt", max_atoms=16)
    rng = np.random.default_rng(3)
    molecule = _labelled(random_cluster(rng, max_atoms=8))
    isomer = molecule.copy()
    isomer.rattle(0.1, seed=4)  # same formula, another geometry
    _labelled(isomer)
    near = train[5].copy()
    near.positions[1, 2] += 1e-7
    new = labelled_frames(5, seed=22, method="emt", max_atoms=16)
    write_frames(tmp / "train-emt.extxyz", train[:15] + [molecule])
    write_frames(tmp / "train-asap.extxyz", train[15:])
    # held out at EMT: 3 copies, 1 near copy, 2 copies of structures trained only at EMT-asap,
    # an isomer of a training molecule, and 5 new structures
    write_frames(tmp / "test-emt.extxyz", [_copy(train[i], i) for i in (0, 3, 7)] + [near]
                 + [_copy(train[i], i) for i in (15, 16)] + [isomer] + new)
    train_folder = _build(tmp, "train", [("train-emt.extxyz", "EMT"), ("train-asap.extxyz", "EMT-asap")], tmp)
    test_folder = _build(tmp, "test", [("test-emt.extxyz", "EMT")], tmp)
    return train_folder, test_folder


def test_leakage_is_counted_exactly(folders):
    train, test = folders
    report = leakage(test, train, progress=False)
    c = report["fidelities"]["EMT"]
    assert c == {"records": 12, "exact_same_fidelity": 3, "near_same_fidelity": 1, "exact_other_fidelity": 2,
                 "near_other_fidelity": 0, "molecules": 1, "molecules_formula_in_training": 1}
    assert report["leaked_same_fidelity"] == 4 and int(report["leaked"].sum()) == 4
    sources = {e["source_id"]: e for e in report["examples"]}
    assert sources["test-emt.extxyz#0"]["train"] == "train-emt.extxyz#0"
    assert sources["test-emt.extxyz#3"]["kind"] == "near"
    assert not sources["test-emt.extxyz#4"]["same_fidelity"]
    assert "3 exact and 1 near copies" in leakage_table(report)


def test_training_data_against_itself_leaks_everything(folders):
    train, _ = folders
    report = leakage(train, train, progress=False)
    assert report["leaked_same_fidelity"] == report["eval"]["records"] == 21
