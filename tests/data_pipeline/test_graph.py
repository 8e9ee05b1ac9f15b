"""neighbor_list against ASE's neighbor_list on every geometry the loader meets."""

from __future__ import annotations

import os

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.geometry import cellpar_to_cell
from ase.neighborlist import neighbor_list as ase_neighbor_list

from data_pipeline.graph import neighbor_list


def edge_set(edge_index, shifts) -> set[tuple[int, ...]]:
    return set(zip(edge_index[0].tolist(), edge_index[1].tolist(), *shifts.T.tolist()))


def assert_matches_ase(positions, cell, pbc, cutoff, ase_cell=None):
    """Same edges as ASE (as a set, no duplicates), same distances, all below the cutoff.

    ``ase_cell`` is the cell handed to ASE where ours is one ASE cannot take.
    """
    positions, cell = np.asarray(positions, float), np.asarray(cell, float)
    edge_index, shifts = neighbor_list(positions, cell, pbc, cutoff)
    atoms = Atoms("H" * len(positions), positions=positions, pbc=pbc,
                  cell=cell if ase_cell is None else ase_cell)
    ai, aj, a_shifts, a_dist = ase_neighbor_list("ijSd", atoms, cutoff, self_interaction=False)
    ours = edge_set(edge_index, shifts)
    assert ours == edge_set(np.stack((ai, aj)), a_shifts)
    assert len(ours) == edge_index.shape[1]  # no duplicate edges

    i, j = edge_index
    dist = np.linalg.norm(positions[j] - positions[i] + shifts @ cell, axis=1)
    ase_dist = dict(zip(zip(ai.tolist(), aj.tolist(), *a_shifts.T.tolist()), a_dist))
    expected = np.array([ase_dist[e] for e in zip(i.tolist(), j.tolist(), *shifts.T.tolist())])
    np.testing.assert_allclose(dist, expected.reshape(dist.shape), rtol=0, atol=1e-10)
    assert (dist < cutoff).all()
    assert not (shifts[:, ~np.asarray(pbc, bool)] != 0).any()  # no shift along open axes
    return edge_index, shifts


def random_cell(rng) -> np.ndarray:
    """A triclinic cell with all angles 25-40 degrees away from 90 (drawn until valid)."""
    while True:
        lengths = rng.uniform(3.0, 6.0, 3)
        angles = 90 + rng.choice([-1, 1], 3) * rng.uniform(25, 40, 3)
        try:
            cell = cellpar_to_cell(np.concatenate([lengths, angles]))
        except AssertionError:  # ASE's way of saying the angles make no cell
            continue
        if np.linalg.det(cell) > 0.3 * lengths.prod():  # flatter cells only slow the test
            return cell


@pytest.mark.parametrize("seed", range(6))
def test_random_triclinic(seed):
    rng = np.random.default_rng(seed)
    cell = random_cell(rng)
    positions = rng.uniform(0, 1, (int(rng.integers(3, 10)), 3)) @ cell
    assert_matches_ase(positions, cell, [True] * 3, rng.uniform(3.0, 6.0))


def test_strongly_sheared_cell():
    cell = np.array([[3.0, 0, 0], [2.9, 0.4, 0], [-2.5, 1.1, 2.0]])  # gamma ~ 8 degrees
    positions = np.random.default_rng(0).uniform(0, 1, (4, 3)) @ cell
    assert_matches_ase(positions, cell, [True] * 3, 5.0)


def test_cutoff_larger_than_cell():
    cell = np.eye(3) * 2.5
    edge_index, shifts = assert_matches_ase([[0, 0, 0], [1.2, 1.3, 1.1]], cell, [True] * 3, 6.0)
    assert np.abs(shifts).max() >= 2  # several image layers
    assert ((edge_index[0] == edge_index[1]) & shifts.any(axis=1)).any()  # self images


@pytest.mark.parametrize("pbc,third", [
    ([True, True, False], 0.0),  # slab, zero c vector
    ([True, True, False], 15.0),  # slab with a vacuum c vector
    ([True, False, True], 4.0),  # slab open along b
    ([True, False, False], 0.0),  # wire
    ([False, False, True], 0.0),  # wire along c
])
def test_mixed_periodicity(pbc, third):
    rng = np.random.default_rng(1)
    cell = np.array([[4.0, 0, 0], [1.0, 3.5, 0], [0.5, 0.3, 3.0]])
    cell[~np.array(pbc)] *= third / 3.0  # open rows zero, or scaled
    positions = rng.uniform(-1, 2, (8, 3)) * [4, 4, 4]  # spread past the cell, both signs
    assert_matches_ase(positions, cell, pbc, 5.0)


def test_open_rows_are_ignored():
    """A slab's c row may be anything, even in the a-b plane (ASE cannot invert that)."""
    rng = np.random.default_rng(2)
    cell = np.array([[4.0, 0, 0], [0, 4.0, 0], [0, 0, 0.0]])
    positions = rng.uniform(0, 4, (6, 3))
    reference = neighbor_list(positions, cell, [True, True, False], 5.0)
    for c in ([1.0, 1.0, 0.0], [0.0, 0.0, 1e-9], [3.0, -2.0, 40.0]):
        cell[2] = c
        got = neighbor_list(positions, cell, [True, True, False], 5.0)
        assert all(np.array_equal(a, b) for a, b in zip(got, reference))


def test_molecule_without_cell():
    rng = np.random.default_rng(3)
    positions = rng.uniform(-4, 2, (12, 3))  # all-negative coordinates too
    edge_index, shifts = assert_matches_ase(positions, np.zeros((3, 3)), [False] * 3, 3.0)
    assert not shifts.any()
    far = np.array([[0, 0, 0], [1.0, 0, 0], [500.0, -800.0, 1e4]])  # a far atom: no edges
    edge_index, _ = neighbor_list(far, np.zeros((3, 3)), False, 3.0)
    assert edge_set(edge_index, np.zeros((2, 3), int)) == {(0, 1, 0, 0, 0), (1, 0, 0, 0, 0)}


@pytest.mark.parametrize("pbc", [[True] * 3, [True, True, False]])
def test_unwrapped_positions(pbc):
    rng = np.random.default_rng(4)
    cell = random_cell(rng)
    positions = rng.uniform(-2, 3, (7, 3)) @ cell  # fractional coordinates far outside [0, 1)
    assert_matches_ase(positions, cell, pbc, 4.5)


def test_single_atom_sees_only_its_images():
    cell = bulk("Cu", "fcc", a=3.6).cell.array  # primitive: 60 degree angles
    edge_index, shifts = assert_matches_ase([[0.3, 0.2, 0.1]], cell, [True] * 3, 6.0)
    assert (edge_index == 0).all() and shifts.any(axis=1).all()
    assert edge_index.shape[1] == 12 + 6 + 24 + 12 + 24  # fcc shells below 6 A


def test_zero_atoms():
    for pbc in (True, False):
        edge_index, shifts = neighbor_list(np.zeros((0, 3)), np.eye(3) * 3, pbc, 5.0)
        assert edge_index.shape == (2, 0) and edge_index.dtype == np.int64
        assert shifts.shape == (0, 3) and shifts.dtype == np.int32


@pytest.mark.parametrize("name,kwargs,repeat", [
    ("Cu", {"crystalstructure": "fcc", "a": 3.61, "cubic": True}, (2, 2, 2)),
    ("Cu", {"crystalstructure": "fcc", "a": 3.61}, (2, 2, 2)),  # primitive, triclinic
    ("Si", {"crystalstructure": "diamond", "a": 5.43, "cubic": True}, (1, 1, 1)),
    ("Mg", {"crystalstructure": "hcp", "a": 3.21, "c": 5.21}, (2, 2, 2)),
])
def test_bulk_crystals(name, kwargs, repeat):
    atoms = bulk(name, **kwargs).repeat(repeat)
    atoms.rattle(0.05, seed=5)
    assert_matches_ase(atoms.positions, atoms.cell.array, atoms.pbc, 5.0)


def test_contract_dtype_shape_order_symmetry():
    atoms = bulk("Mg", "hcp", a=3.21, c=5.21).repeat((2, 2, 1))
    atoms.rattle(0.05, seed=6)
    atoms.positions += 7.0  # unwrapped
    edge_index, shifts = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 6.0)
    assert edge_index.dtype == np.int64 and shifts.dtype == np.int32
    assert edge_index.shape == (2, len(shifts)) and shifts.shape[1] == 3
    assert edge_index.flags.c_contiguous and shifts.flags.c_contiguous
    assert np.all(np.diff(edge_index[0]) >= 0)  # sorted by centre atom
    edges = edge_set(edge_index, shifts)
    assert edges == edge_set(edge_index[::-1], -shifts)  # full list: (j, i, -S) too
    assert not ((edge_index[0] == edge_index[1]) & ~shifts.any(axis=1)).any()  # no (i, i, 0)
    again = neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, 6.0)
    assert np.array_equal(again[0], edge_index) and np.array_equal(again[1], shifts)


def test_cached_calculator_does_not_leak_between_calls():
    big = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    first = neighbor_list(big.positions, big.cell.array, True, 5.0)
    first = (first[0].copy(), first[1].copy())
    neighbor_list([[0, 0, 0], [1.0, 0, 0]], np.zeros((3, 3)), False, 5.0)  # same cutoff
    assert neighbor_list(big.positions, big.cell.array, True, 5.0)[0].shape == first[0].shape
    assert np.array_equal(first[0], neighbor_list(big.positions, big.cell, True, 5.0)[0])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_works_after_fork():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    expected = neighbor_list(atoms.positions, atoms.cell.array, True, 5.0)  # fills the cache
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the inherited cached calculator must still give the same list
        got = neighbor_list(atoms.positions, atoms.cell.array, True, 5.0)
        same = all(np.array_equal(a, b) for a, b in zip(got, expected))
        os.write(write, b"1" if same else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.waitpid(pid, 0)
    assert answer == b"1"


@pytest.mark.parametrize("args,match", [
    (([[0, 0]], np.eye(3), True, 5.0), "positions must have shape"),
    ((np.zeros(3), np.eye(3), True, 5.0), "positions must have shape"),
    ((np.zeros((1, 3)), np.eye(3)[:2], True, 5.0), "cell must have shape"),
    ((np.zeros((1, 3)), np.eye(3), [True, True], 5.0), "pbc must have shape"),
    ((np.zeros((1, 3)), np.eye(3), True, 0.0), "cutoff must be"),
    ((np.zeros((1, 3)), np.eye(3), True, -1.0), "cutoff must be"),
    ((np.zeros((1, 3)), np.eye(3), True, float("nan")), "cutoff must be"),
    (([[np.nan, 0, 0]], np.eye(3), True, 5.0), "positions contain NaN"),
    ((np.zeros((1, 3)), np.diag([3.0, 3, 0]), True, 5.0), r"cell vector 2 is zero"),
    ((np.zeros((1, 3)), np.zeros((3, 3)), [True, False, False], 5.0), r"cell vector 0 is zero"),
    ((np.zeros((1, 3)), [[3, 0, 0], [6, 0, 0], [0, 0, 0]], [True, True, False], 5.0),
     "linearly dependent"),
    ((np.zeros((1, 3)), [[3, 0, 0], [0, 3, 0], [3, 3, 0]], True, 5.0), "linearly dependent"),
])
def test_invalid_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        neighbor_list(*args)
