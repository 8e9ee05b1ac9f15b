"""The ZBL short-range prior: the published universal repulsion, a smooth switch at the
pair radius, exact derivatives for direct-force models, and the physics suite with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from data_pipeline import keys as K
from data_pipeline.batch import atoms_batch, to_torch
from models.layers.zbl import COEFFICIENTS, ZBLRepulsion, zbl_energy
from pretrain.release import physics
from tests.models.test_physics import tiny_model

#: E(r) in eV of the universal ZBL potential (Ziegler, Biersack, Littmark 1985: screening
#: length 0.8854 a0 / (Z1^0.23 + Z2^0.23), the four-exponential universal screening
#: function, e^2/(4 pi eps0) = 14.399645 eV A), evaluated at 30 digits with mpmath
PUBLISHED = {("H", 1, 0.5): 5.91316152783, ("H", 1, 1.0): 1.02557498866,
             ("C", 6, 0.5): 119.908059584, ("C", 6, 1.0): 15.4097637408,
             ("Cu", 29, 0.5): 1476.03870663, ("Cu", 29, 1.0): 135.030842865}


@pytest.mark.parametrize("key", PUBLISHED, ids=lambda k: f"{k[0]}{k[0]}-{k[2]}A")
def test_zbl_matches_the_universal_potential(key):
    _, z, r = key
    got = zbl_energy(torch.tensor(z), torch.tensor(z), torch.tensor(r, dtype=torch.float64))
    assert float(got) == pytest.approx(PUBLISHED[key], rel=1e-9)


def test_zbl_limits():
    """The screening function is 1 at contact (bare Coulomb), and the repulsion falls with r."""
    assert sum(COEFFICIENTS) == pytest.approx(1.0, abs=1e-12)
    r = torch.tensor([1e-6, 0.3, 0.6, 1.2, 2.4], dtype=torch.float64)
    e = zbl_energy(torch.tensor(8), torch.tensor(8), r)
    assert float(e[0] * r[0] / (14.399645 * 64)) == pytest.approx(1.0, rel=1e-4)
    assert bool((e[1:] < e[:-1]).all())


def _dimer_energy_and_force(rep: ZBLRepulsion, pair: str, r: float) -> tuple[float, float]:
    batch = to_torch(atoms_batch([Atoms(pair, positions=[[0, 0, 0], [r, 0, 0]])], 10.0, 0, "float64"))
    pos = batch[K.POSITIONS].requires_grad_(True)
    i, j = batch[K.EDGE_INDEX]
    energy = rep(batch[K.NUMBERS], pos[j] - pos[i], batch[K.EDGE_INDEX]).sum()
    (grad,) = torch.autograd.grad(energy, pos)
    return float(energy.detach()), float(-grad[1, 0])


@pytest.mark.parametrize("pair", ["CuNi", "CH", "HH"])
def test_switch_is_smooth_at_the_pair_radius(pair):
    """Energy and force go to zero continuously at the sum of covalent radii (as the cube and
    the square of the distance to it: the envelope's first two derivatives vanish there),
    and stay zero beyond."""
    from ase.data import atomic_numbers

    rep = ZBLRepulsion()
    a, b = Atoms(pair).get_chemical_symbols()
    radius = float(rep.radii[atomic_numbers[a]] + rep.radii[atomic_numbers[b]])
    near, nearer, outside = (_dimer_energy_and_force(rep, pair, radius + d) for d in (-1e-3, -1e-4, 1e-4))
    assert 0 < nearer[0] < 1e-8 and 0 < nearer[1] < 1e-4 and outside == (0.0, 0.0)
    assert near[0] / nearer[0] == pytest.approx(1e3, rel=0.01)  # energy ~ distance^3
    assert near[1] / nearer[1] == pytest.approx(1e2, rel=0.01)  # force ~ distance^2
    half = _dimer_energy_and_force(rep, pair, 0.5 * radius)
    assert half[0] > 0 and half[1] > 0  # repulsive: the force pushes the second atom away
    full = float(zbl_energy(torch.tensor(atomic_numbers[a]), torch.tensor(atomic_numbers[b]),
                            torch.tensor(0.5 * radius, dtype=torch.float64)))
    assert 0.5 * full < half[0] < full  # the switch keeps most of it at half the radius


def test_direct_derivatives_are_the_priors_gradient():
    """A direct-force model adds the prior's forces and stress explicitly: they equal the
    autograd derivatives of the prior's energy (positions and a strain of the cell)."""
    cell = bulk("Cu", "fcc", a=2.9).repeat((2, 1, 1))  # squeezed: every neighbour is inside the radius
    cell.numbers[::2] = 28
    cell.rattle(0.05, seed=4)
    rep = ZBLRepulsion()
    batch = to_torch(atoms_batch([cell], 4.0, 0, "float64"))
    i, j = batch[K.EDGE_INDEX]
    pos = batch[K.POSITIONS].requires_grad_(True)
    strain = torch.zeros(1, 3, 3, dtype=torch.float64, requires_grad=True)
    sym = 0.5 * (strain + strain.transpose(1, 2))
    strained = pos + pos @ sym[0]
    box = batch[K.CELL] + batch[K.CELL] @ sym
    vectors = strained[j] - strained[i] + batch[K.CELL_SHIFTS] @ box[0]
    energy = rep(batch[K.NUMBERS], vectors, batch[K.EDGE_INDEX]).sum()
    d_pos, d_strain = torch.autograd.grad(energy, (pos, strain))
    plain = batch[K.POSITIONS][j] - batch[K.POSITIONS][i] + batch[K.CELL_SHIFTS] @ batch[K.CELL][0]
    forces, got_strain = rep.derivatives(batch[K.NUMBERS], plain, batch[K.EDGE_INDEX], batch[K.BATCH], 1)
    assert float(energy) > 1.0
    torch.testing.assert_close(forces, -d_pos, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_strain, d_strain, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("check", physics.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", ["esen", "mace"])
def test_physics_with_the_prior(family, check):
    model = tiny_model(family, zbl=True, direct_forces=True, direct_stress=True)
    check(model, physics.default_probe())


def test_metals_switch_off_at_their_nearest_neighbour_distance():
    """A metal's radius is the longer of its covalent radius and half its crystal's nearest-
    neighbour distance: Al's prior reaches 2.86 A (fcc nearest neighbours), not 2.42 A."""
    from ase.data import atomic_numbers, covalent_radii

    from models.layers.zbl import pair_radii

    radii = pair_radii()
    assert float(radii[13]) == pytest.approx(4.05 / 2**0.5 / 2) and float(radii[13]) > covalent_radii[13]
    for element in ("H", "C", "O", "Se", "Te"):  # molecules, chains: covalent
        assert float(radii[atomic_numbers[element]]) == covalent_radii[atomic_numbers[element]]
    assert bool((radii[1:] >= torch.as_tensor(covalent_radii[1:len(radii)])).all())


def test_prior_adds_no_parameters_and_direct_forces_include_it():
    without = tiny_model("mace", direct_forces=True)
    with_prior = tiny_model("mace", direct_forces=True, zbl=True)
    assert without.state_dict().keys() == with_prior.state_dict().keys()
    with_prior.load_state_dict(without.state_dict())
    atoms = Atoms("CuNi", positions=[[0, 0, 0], [1.2, 0.1, 0]])
    batch = physics.batch_of(with_prior, [atoms])
    a = with_prior(batch, forces=True, direct=True)["forces"]
    b = without(batch, forces=True, direct=True)["forces"]
    i, j = batch[K.EDGE_INDEX]
    vectors = batch[K.POSITIONS][j] - batch[K.POSITIONS][i]  # a molecule: no image shifts
    rep_forces, _ = with_prior.repulsion.derivatives(batch[K.NUMBERS], vectors, batch[K.EDGE_INDEX],
                                                     batch[K.BATCH], 1)
    np.testing.assert_allclose((a - b).detach().numpy(), rep_forces.numpy(), rtol=1e-10, atol=1e-10)
    assert float((a - b).abs().max()) > 1.0  # the prior pushes hard at 1.2 A


@pytest.mark.parametrize("check", physics.BF16_CHECKS, ids=lambda c: c.__name__)
def test_physics_with_the_prior_in_bf16(check):
    """bf16 autocast leaves the prior in float64 (it is geometry): the suite holds at bf16's
    tolerances with it."""
    model = tiny_model("mace", zbl=True, direct_forces=True, direct_stress=True).float()
    model.precision = "bf16"
    check(model, physics.default_probe(), physics.BF16)
