"""Structure fingerprints: invariances, and what separates a copy from a different structure."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule

from data_pipeline.fingerprints import KEYS, fingerprints, match_atoms
from data_pipeline.schema import AtomsRecord


def keys(structures, charges=None) -> dict[str, np.ndarray]:
    return fingerprints([a.numbers for a in structures], [a.positions for a in structures],
                        [a.cell.array for a in structures], [a.pbc for a in structures], charges)


def variants(atoms, seed: int):
    """The structure, its atoms permuted, translated (and wrapped where periodic)."""
    rng = np.random.default_rng(seed)
    permuted = atoms[rng.permutation(len(atoms))]
    moved = atoms.copy()
    moved.translate(rng.normal(size=3) * 3)
    wrapped = moved.copy()
    if atoms.pbc.any():
        wrapped.wrap()
    return [atoms, permuted, moved, wrapped]


def rattled_cell():
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    a.rattle(0.05, seed=1)
    return a


def alloy():
    a = bulk("NaCl", "rocksalt", a=5.6, cubic=True).repeat((2, 1, 1))
    a.rattle(0.02, seed=2)
    return a


def slab():
    a = fcc111("Pt", size=(2, 2, 3), vacuum=6.0)
    a.rattle(0.02, seed=3)
    return a


@pytest.mark.parametrize("make", [rattled_cell, alloy, slab, lambda: molecule("CH3CH2OH"),
                                  lambda: bulk("Cu", "fcc", a=3.6, cubic=True).repeat((3, 3, 3))])
def test_order_translation_and_wrapping_give_the_same_keys(make):
    k = keys(variants(make(), seed=4))
    for name in KEYS:
        assert len(set(k[name].tolist())) == 1, name


def test_a_tiny_displacement_is_near_not_exact():
    for atoms in (molecule("CH3CH2OH"), rattled_cell(), slab()):
        moved = atoms.copy()
        moved.positions[3, 1] += 1e-7
        k = keys([atoms, moved])
        assert k["fp_exact"][0] != k["fp_exact"][1]
        assert k["fp_near_a"][0] == k["fp_near_a"][1] or k["fp_near_b"][0] == k["fp_near_b"][1]
        assert k["fp_formula"][0] == k["fp_formula"][1]


def test_rotation_is_near_and_different_structures_are_not():
    mol = molecule("CH3CH2OH")
    rotated = mol.copy()
    rotated.rotate(40, "z", center="COM")
    rotated.rotate(25, "x")
    isomer = molecule("CH3OCH3")  # same formula, another molecule
    shaken = mol.copy()
    shaken.rattle(0.01, seed=5)  # a thermal snapshot, not a copy
    charged = mol.copy()
    k = keys([mol, rotated, isomer, shaken, charged], charges=[0, 0, 0, 0, 1])
    near = lambda i, j: k["fp_near_a"][i] == k["fp_near_a"][j] or k["fp_near_b"][i] == k["fp_near_b"][j]  # noqa: E731
    assert k["fp_exact"][0] != k["fp_exact"][1] and near(0, 1)
    assert k["fp_formula"][2] == k["fp_formula"][0] and not near(0, 2)
    assert not near(0, 3)
    assert k["fp_exact"][4] != k["fp_exact"][0] and not near(0, 4)  # the charge is part of the structure


def test_a_rotated_cell_is_near_and_a_strained_one_is_not():
    cell = rattled_cell()
    rotated = cell.copy()
    rotated.rotate(30, "z", rotate_cell=True)
    strained = cell.copy()
    strained.set_cell(cell.cell * 1.01, scale_atoms=True)
    k = keys([cell, rotated, strained])
    assert k["fp_exact"][0] != k["fp_exact"][1]
    assert k["fp_near_a"][0] == k["fp_near_a"][1] or k["fp_near_b"][0] == k["fp_near_b"][1]
    assert k["fp_near_a"][0] != k["fp_near_a"][2] and k["fp_near_b"][0] != k["fp_near_b"][2]


def record(atoms, charge=0) -> AtomsRecord:
    return AtomsRecord(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell.array, pbc=atoms.pbc,
                       charge=charge)


def test_batch_and_single_records_agree():
    structures = [rattled_cell(), alloy(), slab(), molecule("H2O"), molecule("C6H6")]
    batch = keys(structures)
    for i, atoms in enumerate(structures):
        alone = keys([atoms])
        assert all(alone[name][0] == batch[name][i] for name in KEYS)


@pytest.mark.parametrize("make", [alloy, slab, lambda: molecule("CH3CH2OH"),
                                  lambda: bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))])
def test_matching_pairs_the_atoms_of_copies_and_has_no_rounding_boundary(make):
    atoms = make()
    perm = np.random.default_rng(6).permutation(len(atoms))
    copy = atoms[perm]
    copy.translate([1.1, -0.7, 2.3])
    if atoms.pbc.any():
        copy.wrap()
    copy.positions = np.round(copy.positions, 8)  # what an 8-decimal text file keeps
    order = match_atoms(record(atoms), record(copy))
    assert order is not None
    # b's atom order[i] is a's atom i: the same element, at the same place up to the cell
    assert np.array_equal(copy.numbers[order], atoms.numbers)
    moved = atoms.copy()
    moved.positions[0, 2] += 1e-7
    assert match_atoms(record(atoms), record(moved)) is None
    assert match_atoms(record(atoms), record(atoms, charge=1)) is None
