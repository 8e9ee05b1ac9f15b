"""The physics suite: one set of checks run by the tests on every model family and size,
and by ``mlip-pretrain release verify`` on every fidelity of a release.

Each check takes a :class:`~models.potential.Potential`, a :class:`Probe` (the structures
and fidelity it runs on) and a :class:`Tolerance`, and raises :class:`CheckFailed` (an
AssertionError) with the measured error: in float64 with :data:`FP64`, or in float32
weights with ``precision = "bf16"`` and :data:`BF16` (``BF16_CHECKS``: finite differences
of a bf16 energy measure its rounding, not its derivative, so those two are left out).
:func:`default_probe` is the tests' structures (a triclinic Cu/Ni crystal, an Al slab
with mixed periodicity, ethanol); :func:`probe_for` builds the same shapes from the
elements a release's fidelity covers. :data:`CHECKS` are the conservative derivatives'
invariants; :func:`check_direct_heads` covers a model's direct heads.

Device: batches are built on the model's device (``MLIP_TEST_DEVICE`` chooses it in the
tests, e.g. ``cuda`` from ``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
from ase import Atoms
from ase.build import bulk, molecule

from data_pipeline import keys as K
from data_pipeline.batch import atoms_batch, to_torch


class CheckFailed(AssertionError):
    """A physics check failed; the message has the numbers."""


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
DEVICE = torch.device(os.environ.get("MLIP_TEST_DEVICE", "cpu"))


@dataclasses.dataclass
class Probe:
    """What the checks run on: a triclinic periodic crystal (8 atoms), a slab-like cell
    periodic in two directions, a molecule, the two elements of the cutoff dimer, the
    fidelity id of every structure and a second id for the mixed batch."""

    crystal: Atoms
    slab: Atoms
    molecule: Atoms
    dimer: tuple[str, str]
    fidelity: int = 0
    other: int = 0

    @property
    def structures(self) -> list[Atoms]:
        return [self.crystal, self.slab, self.molecule]


def default_probe(fidelity: int = 0, other: int = 1) -> Probe:
    """A triclinic Cu/Ni crystal, an Al slab with mixed periodicity and ethanol."""
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
    return Probe(crystal, slab, mol, ("Cu", "Ni"), fidelity, other)


def probe_for(elements: list[str], fidelity: int = 0, other: int = 0) -> Probe:
    """:func:`default_probe`'s shapes made of ``elements`` (cycled over the atoms): the
    checks are invariants of the model's mathematics, so any covered element serves."""
    from ase.data import atomic_numbers  # noqa: PLC0415

    zs = [atomic_numbers[e] for e in elements] or [1]
    base = default_probe(fidelity, other)
    for atoms in base.structures:
        atoms.numbers = np.array([zs[k % len(zs)] for k in range(len(atoms))])
    names = list(elements) or ["H"]
    return dataclasses.replace(base, dimer=(names[0], names[1 % len(names)]))


def batch_of(model, atoms_list: list[Atoms], fidelity: int | list[int] = 0) -> dict[str, torch.Tensor]:
    """``atoms_list`` as a float64 batch on the model's device (the model computes its edge
    vectors in its own precision; the derivatives come back in float64)."""
    batch = to_torch(atoms_batch(atoms_list, model.cutoff, fidelity, float_dtype="float64"))
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def predict(model, batch, stress=True) -> dict[str, torch.Tensor]:
    """Conservative energy, forces and (``stress``) stress, detached."""
    with torch.enable_grad():
        out = model(batch, forces=True, stress=stress, create_graph=False)
    return {k: v.detach() for k, v in out.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def expect(ok: bool, message: str) -> None:
    """Raise :class:`CheckFailed` with ``message`` unless ``ok`` (not ``assert``: kept under -O)."""
    if not ok:
        raise CheckFailed(message)


def voigt_to_matrix(s: torch.Tensor) -> torch.Tensor:
    xx, yy, zz, yz, xz, xy = s.unbind(-1)
    return torch.stack([torch.stack([xx, xy, xz], -1), torch.stack([xy, yy, yz], -1),
                        torch.stack([xz, yz, zz], -1)], -2)


def check_rotation_translation(model, probe: Probe, tol: Tolerance = FP64) -> float:
    """Energy invariant, forces and stress equivariant under a rotation and a translation."""
    batch = batch_of(model, probe.structures, probe.fidelity)
    ref = predict(model, batch)
    R = torch.tensor(_random_rotation(7), dtype=torch.float64)
    out = predict(model, moved(batch, R, shift=(1.5, -2.0, 0.7)))
    sig, sig_ref = voigt_to_matrix(out["stress"]), voigt_to_matrix(ref["stress"])
    errors = {"energy not invariant": rel(out["energy"], ref["energy"]),
              "forces not equivariant": rel(out["forces"], ref["forces"] @ R.T.to(ref["forces"].dtype)),
              "stress not equivariant": rel(sig, R.to(sig.dtype) @ sig_ref @ R.T.to(sig.dtype))}
    for what, err in errors.items():
        expect(err < tol.rel, f"rotation: {what}: relative error {err:.2e} > {tol.rel:g}")
    return max(errors.values())


def check_permutation(model, probe: Probe, tol: Tolerance = FP64) -> float:
    """Energy invariant and forces permuted with the atoms."""
    atoms = probe.crystal
    perm = np.random.default_rng(1).permutation(len(atoms))
    ref = predict(model, batch_of(model, [atoms], probe.fidelity))
    out = predict(model, batch_of(model, [atoms[perm]], probe.fidelity))
    e, f = rel(out["energy"], ref["energy"]), rel(out["forces"], ref["forces"][perm])
    expect(e < tol.rel, f"permutation: energy changes by {e:.2e} (relative) > {tol.rel:g}")
    expect(f < tol.rel, f"permutation: forces do not permute with atoms ({f:.2e} > {tol.rel:g})")
    return max(e, f)


def check_forces_finite_difference(model, probe: Probe, tol: Tolerance = FP64, h: float = 1e-5) -> float:
    """Forces equal to central finite differences of the energy (step ``h`` A)."""
    atoms = probe.molecule
    forces = predict(model, batch_of(model, [atoms], probe.fidelity), stress=False)["forces"]
    worst = 0.0
    for a, c in ((0, 0), (3, 1), (5, 2)):
        energies = []
        for sign in (1, -1):
            shifted = atoms.copy()
            shifted.positions[a, c] += sign * h
            energies.append(predict(model, batch_of(model, [shifted], probe.fidelity), stress=False)["energy"][0])
        fd = float(-(energies[0] - energies[1]) / (2 * h))
        err = abs(fd - float(forces[a, c])) / max(1.0, abs(fd))
        expect(err < tol.fd, f"forces vs finite differences: force[{a},{c}] {float(forces[a, c]):.8g}, "
                             f"finite difference {fd:.8g} (relative {err:.2e} > {tol.fd:g})")
        worst = max(worst, err)
    return worst


def check_stress_finite_difference(model, probe: Probe, tol: Tolerance = FP64, h: float = 1e-5) -> float:
    """Stress equal to the finite-difference strain derivative of the energy over the volume."""
    atoms = probe.crystal
    stress = predict(model, batch_of(model, [atoms], probe.fidelity))["stress"][0]
    volume = atoms.get_volume()
    worst = 0.0
    for v, (a, c) in enumerate(((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))):
        energies = []
        for sign in (1, -1):
            eps = np.eye(3)
            eps[a, c] += sign * h / (1 if a == c else 2)
            eps[c, a] += 0 if a == c else sign * h / 2
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ eps, scale_atoms=True)
            energies.append(predict(model, batch_of(model, [strained], probe.fidelity), stress=False)["energy"][0])
        fd = float((energies[0] - energies[1]) / (2 * h) / volume)
        err = abs(fd - float(stress[v])) / max(1.0, abs(fd))
        expect(err < tol.fd, f"stress vs finite differences: stress[{v}] {float(stress[v]):.8g}, "
                             f"finite difference {fd:.8g} (relative {err:.2e} > {tol.fd:g})")
        worst = max(worst, err)
    return worst


def check_batched_equals_single(model, probe: Probe, tol: Tolerance = FP64) -> float:
    """A batch of structures (two fidelities mixed) gives what each gives alone."""
    fids = [probe.fidelity, probe.other, probe.fidelity]
    together = predict(model, batch_of(model, probe.structures, fids))
    start, worst = 0, 0.0
    for g, atoms in enumerate(probe.structures):
        alone = predict(model, batch_of(model, [atoms], fids[g]))
        n = len(atoms)
        e = rel(together["energy"][g:g + 1], alone["energy"])
        f = rel(together["forces"][start:start + n], alone["forces"])
        expect(e < tol.rel and f < tol.rel, f"batched vs single: structure {g} differs "
                                            f"(energy {e:.2e}, forces {f:.2e} > {tol.rel:g})")
        worst, start = max(worst, e, f), start + n
    return worst


def _dimers(probe: Probe, distances) -> list[Atoms]:
    return [Atoms("".join(probe.dimer), positions=[[0, 0, 0], [r, 0, 0]]) for r in distances]


def check_smooth_cutoff(model, probe: Probe, tol: Tolerance = FP64, delta: float = 1e-4) -> float:
    """A dimer's energy and force are continuous as the atoms cross the cutoff."""
    cutoff = model.cutoff
    inside, outside = (predict(model, batch_of(model, _dimers(probe, [r]), probe.fidelity), stress=False)
                       for r in (cutoff - delta, cutoff + delta))
    jump = abs(float(inside["energy"][0] - outside["energy"][0]))
    force = float(inside["forces"].abs().max())
    expect(jump < tol.jump, f"cutoff: energy jumps by {jump:.3g} eV at {cutoff} A (> {tol.jump:g})")
    expect(force < tol.vanish, f"cutoff: force {force:.3g} eV/A does not vanish at {cutoff} A (> {tol.vanish:g})")
    return max(jump, force)


def check_cutoff_scan(model, probe: Probe, tol: Tolerance = FP64, width: float = 0.3, h: float = 2e-3) -> float:
    """A dimer pulled through the last ``width`` A before the cutoff: each energy step is
    what its forces predict (``|dE| <= h |F|`` up to the curvature), not a staircase (bf16
    lengths resolve 4 A in 0.03 A steps), and nothing changes past the cutoff."""
    cutoff = model.cutoff
    r = np.arange(cutoff - width, cutoff + 0.05, h)
    out = predict(model, batch_of(model, _dimers(probe, r), probe.fidelity), stress=False)
    e, f = out["energy"].double().cpu().numpy(), out["forces"].double().cpu().numpy()[1::2, 0]  # dE/dr = -F
    steps, bound = np.abs(np.diff(e)), h * np.maximum(np.abs(f[1:]), np.abs(f[:-1]))
    worst = int(np.argmax(steps - 1.5 * bound))
    expect(steps[worst] <= 1.5 * bound[worst] + tol.jump,
           f"cutoff scan: energy steps by {steps[worst]:.3g} eV at r = {r[worst]:.4f} A, forces "
           f"predict {bound[worst]:.3g}")
    beyond = float(np.ptp(e[r > cutoff]))
    expect(beyond <= tol.jump, f"cutoff scan: energy changes by {beyond:.3g} eV past the cutoff")
    return max(float(steps[worst] - 1.5 * bound[worst]), beyond, 0.0)


def check_supercell_extensive(model, probe: Probe, tol: Tolerance = FP64) -> float:
    """A 2x1x1 supercell has twice its cell's energy."""
    # 16 atoms keep the l-size models (C = 256, lmax = 4: ~0.5 GB per edge feature tensor
    # at 5k edges in float64) within memory
    cell = probe.crystal
    e1 = predict(model, batch_of(model, [cell], probe.fidelity), stress=False)["energy"][0]
    e2 = predict(model, batch_of(model, [cell.repeat((2, 1, 1))], probe.fidelity), stress=False)["energy"][0]
    err = abs(float(e2 - 2 * e1)) / max(1.0, abs(float(e2)))
    expect(err < tol.extensive, f"supercell: 2x1x1 energy {float(e2):.10g} != 2 x {float(e1):.10g} "
                                f"(relative {err:.2e} > {tol.extensive:g})")
    return err


def check_direct_heads(model, probe: Probe, tol: Tolerance = FP64) -> float:
    """Direct force/stress heads (when the model has them) are equivariant too."""
    if model.force_head is None and model.stress_head is None:
        return 0.0
    batch = batch_of(model, probe.structures, probe.fidelity)
    forces, stress = model.force_head is not None, model.stress_head is not None
    with torch.enable_grad():
        ref = {k: v.detach().double() for k, v in model(batch, forces=forces, stress=stress,
                                                        create_graph=False, direct=True).items()}
        R = torch.tensor(_random_rotation(11), dtype=torch.float64)
        out = {k: v.detach().double() for k, v in model(moved(batch, R), forces=forces, stress=stress,
                                                        create_graph=False, direct=True).items()}
    R = R.to(ref["energy"].device)
    worst = 0.0
    if forces:
        worst = rel(out["forces"], ref["forces"] @ R.T)
        expect(worst < tol.direct, f"direct forces not equivariant ({worst:.2e} > {tol.direct:g})")
    if stress:
        sig, sig_ref = voigt_to_matrix(out["stress"]), voigt_to_matrix(ref["stress"])
        err = rel(sig, R @ sig_ref @ R.T)
        expect(err < tol.direct, f"direct stress not equivariant ({err:.2e} > {tol.direct:g})")
        expect(float(out["stress"][2].abs().max()) == 0.0, "direct stress: a molecule has no stress")
        worst = max(worst, err)
    return worst


CHECKS = [check_rotation_translation, check_permutation, check_forces_finite_difference,
          check_stress_finite_difference, check_batched_equals_single, check_smooth_cutoff,
          check_cutoff_scan, check_supercell_extensive, check_direct_heads]
BF16_CHECKS = [c for c in CHECKS if c not in (check_forces_finite_difference,
                                               check_stress_finite_difference)]


def run_all(model, probe: Probe, tol: Tolerance = FP64, checks=CHECKS) -> dict[str, float]:
    """Every check of ``checks`` on ``probe``; ``{check name: measured error}``. The first
    failure raises :class:`CheckFailed`."""
    return {c.__name__.removeprefix("check_"): c(model, probe, tol) for c in checks}


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
