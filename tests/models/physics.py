"""The physics suite: checks every model family and size must pass (float64, and bf16).

Each check takes a :class:`~models.potential.Potential` and raises AssertionError with
the measured error: in float64 with :data:`FP64` tolerances, or in float32 weights with
``precision = "bf16"`` and :data:`BF16` tolerances (``BF16_CHECKS``: finite differences
of a bf16 energy measure its rounding, not its derivative, so those two are left out).
``tests/models/test_physics.py`` runs them for each family and named size.

Device: batches are built on :data:`DEVICE`, ``MLIP_TEST_DEVICE`` from the environment
(default ``cpu``; ``cuda`` runs the suite on a GPU, e.g. from ``benchmarks/gpu_check.py``);
the model must be on the same device.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule

from data_pipeline import keys as K
from data_pipeline.stream.collate import collate_atoms, to_torch



@dataclasses.dataclass(frozen=True)
class Tolerance:
    """What a check accepts at one precision."""

    rel: float  # relative error of invariance, equivariance and batched-vs-single checks
    fd: float  # forces / stress against finite differences, relative to max(1, |fd|)
    jump: float  # eV: energy difference across the cutoff
    vanish: float  # eV/A: force at the cutoff
    extensive: float  # relative: supercell energy against the sum of its cells
    direct: float  # relative error of the direct heads' equivariance


FP64 = Tolerance(rel=1e-6, fd=1e-5, jump=1e-6, vanish=1e-4, extensive=1e-6, direct=1e-6)
#: bf16 autocast (fp32 geometry): 2^-8 rounding of each contraction's inputs over a few layers;
#: a jump of 1e-3 eV is bf16 noise on ~eV energies (the geometry itself is checked for fp32
#: by tests/models/test_precision.py)
BF16 = Tolerance(rel=1e-2, fd=float("nan"), jump=1e-3, vanish=1e-3, extensive=1e-3, direct=5e-2)
TOL = FP64.rel
DEVICE = torch.device(os.environ.get("MLIP_TEST_DEVICE", "cpu"))


def structures(cutoff: float) -> list[Atoms]:
    """A triclinic periodic alloy, a slab-like mixed-pbc cell and a molecule."""
    rng = np.random.default_rng(0)
    crystal = bulk("Cu", "fcc", a=3.6).repeat((2, 2, 2))
    crystal.set_cell(crystal.cell.array @ (np.eye(3) + 0.05 * rng.standard_normal((3, 3))),
                     scale_atoms=True)
    crystal.numbers[::3] = 28
    crystal.rattle(0.1, seed=1)
    slab = bulk("Al", "fcc", a=4.05, cubic=True).repeat((1, 1, 2))
    slab.pbc = (True, True, False)
    slab.rattle(0.1, seed=2)
    mol = molecule("CH3CH2OH")
    mol.rattle(0.05, seed=3)
    return [crystal, slab, mol]


def batch_of(atoms_list: list[Atoms], cutoff: float, fidelity=0) -> dict[str, torch.Tensor]:
    batch = to_torch(collate_atoms(atoms_list, cutoff, fidelity, float_dtype="float64"))
    return {k: v.to(DEVICE) for k, v in batch.items()}


def predict(model, batch, stress=True) -> dict[str, torch.Tensor]:
    out = model(batch, forces=True, stress=stress, create_graph=False)
    return {k: v.detach() for k, v in out.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def voigt_to_matrix(s: torch.Tensor) -> torch.Tensor:
    xx, yy, zz, yz, xz, xy = s.unbind(-1)
    return torch.stack([torch.stack([xx, xy, xz], -1), torch.stack([xy, yy, yz], -1),
                        torch.stack([xz, yz, zz], -1)], -2)


def check_rotation_translation(model, cutoff, tol: Tolerance = FP64):
    batch = batch_of(structures(cutoff), cutoff)
    ref = predict(model, batch)
    R = torch.tensor(_random_rotation(7), dtype=torch.float64)
    out = predict(model, moved(batch, R, shift=(1.5, -2.0, 0.7)))
    assert rel(out["energy"], ref["energy"]) < tol.rel, f"energy not invariant: {rel(out['energy'], ref['energy'])}"
    assert rel(out["forces"], ref["forces"] @ R.T) < tol.rel, "forces not equivariant"
    sig, sig_ref = voigt_to_matrix(out["stress"]), voigt_to_matrix(ref["stress"])
    assert rel(sig, R @ sig_ref @ R.T) < tol.rel, "stress not equivariant"


def check_permutation(model, cutoff, tol: Tolerance = FP64):
    atoms = structures(cutoff)[0]
    perm = np.random.default_rng(1).permutation(len(atoms))
    ref, out = predict(model, batch_of([atoms], cutoff)), predict(model, batch_of([atoms[perm]], cutoff))
    assert rel(out["energy"], ref["energy"]) < tol.rel, "energy changes under permutation"
    assert rel(out["forces"], ref["forces"][perm]) < tol.rel, "forces do not permute with atoms"


def check_forces_finite_difference(model, cutoff, h=1e-5, tol: Tolerance = FP64):
    atoms = structures(cutoff)[2]
    forces = predict(model, batch_of([atoms], cutoff), stress=False)["forces"]
    for a, c in ((0, 0), (3, 1), (5, 2)):
        energies = []
        for sign in (1, -1):
            shifted = atoms.copy()
            shifted.positions[a, c] += sign * h
            energies.append(predict(model, batch_of([shifted], cutoff), stress=False)["energy"][0])
        fd = -(energies[0] - energies[1]) / (2 * h)
        assert abs(fd - forces[a, c]) < tol.fd * max(1.0, abs(float(fd))), \
            f"force[{a},{c}] {float(forces[a, c]):.8g} vs finite difference {float(fd):.8g}"


def check_stress_finite_difference(model, cutoff, h=1e-5, tol: Tolerance = FP64):
    atoms = structures(cutoff)[0]
    stress = predict(model, batch_of([atoms], cutoff))["stress"][0]
    volume = atoms.get_volume()
    for v, (a, c) in enumerate(((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))):
        energies = []
        for sign in (1, -1):
            eps = np.eye(3)
            eps[a, c] += sign * h / (1 if a == c else 2)
            eps[c, a] += 0 if a == c else sign * h / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ eps, scale_atoms=True)
            energies.append(predict(model, batch_of([strained], cutoff), stress=False)["energy"][0])
        fd = (energies[0] - energies[1]) / (2 * h) / volume
        assert abs(fd - stress[v]) < tol.fd * max(1.0, abs(float(fd))), \
            f"stress[{v}] {float(stress[v]):.8g} vs finite difference {float(fd):.8g}"


def check_batched_equals_single(model, cutoff, tol: Tolerance = FP64):
    atoms_list = structures(cutoff)
    together = predict(model, batch_of(atoms_list, cutoff, fidelity=[0, 1, 0]))
    start = 0
    for g, atoms in enumerate(atoms_list):
        alone = predict(model, batch_of([atoms], cutoff, fidelity=[0, 1, 0][g]))
        n = len(atoms)
        assert rel(together["energy"][g:g + 1], alone["energy"]) < tol.rel, f"structure {g}: energy"
        assert rel(together["forces"][start:start + n], alone["forces"]) < tol.rel, f"structure {g}: forces"
        start += n


def check_smooth_cutoff(model, cutoff, delta=1e-4, tol: Tolerance = FP64):
    """A dimer's energy and force are continuous as the atoms cross the cutoff."""
    def dimer(r):
        return predict(model, batch_of([Atoms("CuNi", positions=[[0, 0, 0], [r, 0, 0]])], cutoff),
                       stress=False)
    inside, outside = dimer(cutoff - delta), dimer(cutoff + delta)
    assert abs(float(inside["energy"][0] - outside["energy"][0])) < tol.jump, "energy jumps at the cutoff"
    assert float(inside["forces"].abs().max()) < tol.vanish, "force does not vanish at the cutoff"


def check_cutoff_scan(model, cutoff, tol: Tolerance = FP64, width=0.3, h=2e-3):
    """A dimer pulled through the last ``width`` A before the cutoff: each energy step is
    what its forces predict (``|dE| <= h |F|`` up to the curvature), not a staircase (bf16
    lengths resolve 4 A in 0.03 A steps), and nothing changes past the cutoff."""
    r = np.arange(cutoff - width, cutoff + 0.05, h)
    batch = batch_of([Atoms("CuNi", positions=[[0, 0, 0], [x, 0, 0]]) for x in r], cutoff)
    out = predict(model, batch, stress=False)
    e, f = out["energy"].double().numpy(), out["forces"].double().numpy()[1::2, 0]  # dE/dr = -F
    steps, bound = np.abs(np.diff(e)), h * np.maximum(np.abs(f[1:]), np.abs(f[:-1]))
    worst = int(np.argmax(steps - 1.5 * bound))
    assert steps[worst] <= 1.5 * bound[worst] + tol.jump, \
        f"energy steps by {steps[worst]:.3g} eV at r = {r[worst]:.4f} A, forces predict {bound[worst]:.3g}"
    beyond = e[r > cutoff]
    assert np.ptp(beyond) <= tol.jump, f"energy changes by {np.ptp(beyond):.3g} eV past the cutoff"


def check_supercell_extensive(model, cutoff, tol: Tolerance = FP64):
    # a 2x1x1 supercell of the 8-atom cell: 16 atoms keep the l-size models (C = 256,
    # lmax = 4: ~0.5 GB per edge feature tensor at 5k edges in float64) within memory
    cell = structures(cutoff)[0]
    e1 = predict(model, batch_of([cell], cutoff), stress=False)["energy"][0]
    e2 = predict(model, batch_of([cell.repeat((2, 1, 1))], cutoff), stress=False)["energy"][0]
    assert abs(float(e2 - 2 * e1)) < tol.extensive * max(1.0, abs(float(e2))), \
        f"2x1x1 supercell energy {float(e2):.10g} != 2 x {float(e1):.10g}"


def check_direct_heads(model, cutoff, tol: Tolerance = FP64):
    """Direct force/stress heads (when the model has them) are equivariant too."""
    if model.force_head is None and model.stress_head is None:
        return
    batch = batch_of(structures(cutoff), cutoff)
    stress = model.stress_head is not None
    ref = {k: v.detach().double() for k, v in model(batch, forces=model.force_head is not None,
                                            stress=stress, direct=True).items()}
    R = torch.tensor(_random_rotation(11), dtype=torch.float64)
    out = {k: v.detach().double() for k, v in model(moved(batch, R), forces=model.force_head is not None,
                                            stress=stress, direct=True).items()}
    if model.force_head is not None:
        assert rel(out["forces"], ref["forces"] @ R.T) < tol.direct, "direct forces not equivariant"
    if stress:
        sig, sig_ref = voigt_to_matrix(out["stress"]), voigt_to_matrix(ref["stress"])
        assert rel(sig, R @ sig_ref @ R.T) < tol.direct, "direct stress not equivariant"
        assert float(out["stress"][2].abs().max()) == 0.0, "a molecule has no stress"


CHECKS = [check_rotation_translation, check_permutation, check_forces_finite_difference,
          check_stress_finite_difference, check_batched_equals_single, check_smooth_cutoff,
          check_cutoff_scan, check_supercell_extensive, check_direct_heads]
BF16_CHECKS = [c for c in CHECKS if c not in (check_forces_finite_difference,
                                               check_stress_finite_difference)]


def moved(batch: dict, R: torch.Tensor, shift=(0.0, 0.0, 0.0)) -> dict:
    """``batch`` rotated by ``R`` (positions and cell) and translated by ``shift``."""
    pos = batch[K.POSITIONS]
    R = R.to(pos.device, pos.dtype)
    shift = torch.tensor(shift, dtype=pos.dtype, device=pos.device)
    return dict(batch, **{K.POSITIONS: pos @ R.T + shift, K.CELL: batch[K.CELL] @ R.T})


def _random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q
