"""Physics checks a released model must pass, on structures of the elements it covers.

Run by ``mlip-pretrain release verify`` in float64, per fidelity: energy invariant and
forces equivariant under a random rotation; forces equal to central finite differences of
the energy; stress equal to the finite-difference strain derivative of the energy over
the volume (on a periodic cell). Each check raises :class:`CheckFailed` with its numbers.
"""

from __future__ import annotations

import numpy as np

TOL = 1e-6  # float64: agreement to ~1e-9 is typical; 1e-6 leaves room for big models


class CheckFailed(AssertionError):
    """A physics check of a release failed; the message has the numbers."""


def _structures(elements: list[str], seed: int):
    """A small cluster (no cell) and a periodic 4-atom cell of ``elements``."""
    from ase import Atoms  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    symbols = [elements[k % len(elements)] for k in range(5)]
    grid = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]], float) * 1.6
    cluster = Atoms(symbols, positions=grid + rng.normal(0, 0.1, grid.shape))
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    cell = np.eye(3) * 3.9 + rng.normal(0, 0.05, (3, 3))
    bulk = Atoms(symbols[:4], scaled_positions=frac + rng.normal(0, 0.01, frac.shape), cell=cell, pbc=True)
    return cluster, bulk


def _energy(model, atoms, fidelity: str) -> float:
    return float(model.evaluate([atoms], fidelity)["energy"][0])


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def check_rotation(model, atoms, fidelity: str, rng) -> float:
    """Relative error of energy invariance and force equivariance under a rotation."""
    rot = _rotation(rng)
    a = model.evaluate([atoms], fidelity)
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T
    if atoms.pbc.any():
        moved.cell = atoms.cell.array @ rot.T
    b = model.evaluate([moved], fidelity)
    scale = max(1.0, float(np.abs(a["forces"]).max()))
    err = max(abs(float(a["energy"][0] - b["energy"][0])) / max(1.0, abs(float(a["energy"][0]))),
              float(np.abs(a["forces"] @ rot.T - b["forces"]).max()) / scale)
    if err > TOL:
        raise CheckFailed(f"rotation: energy/forces change by {err:.2e} (relative) > {TOL:g}")
    return err


def check_forces_fd(model, atoms, fidelity: str, h: float = 1e-4) -> float:
    """Max |F - (-dE/dx)| over every component, central differences of step ``h`` A."""
    forces = model.evaluate([atoms], fidelity)["forces"]
    fd = np.zeros_like(forces)
    for i in range(len(atoms)):
        for c in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[i, c] += h
            minus.positions[i, c] -= h
            fd[i, c] = -(_energy(model, plus, fidelity) - _energy(model, minus, fidelity)) / (2 * h)
    err = float(np.abs(forces - fd).max()) / max(1.0, float(np.abs(forces).max()))
    if err > 1e3 * TOL:
        raise CheckFailed(f"forces vs finite differences: relative error {err:.2e} > {1e3 * TOL:g}")
    return err


def check_stress_fd(model, atoms, fidelity: str, h: float = 1e-5) -> float:
    """Max |sigma - (1/V) dE/d eps| over the six Voigt components."""
    from models.potential import VOIGT  # noqa: PLC0415

    stress = model.evaluate([atoms], fidelity, stress=True)["stress"][0]
    volume = atoms.get_volume()
    fd = np.zeros(6)
    for k, (a, b) in enumerate(VOIGT):
        energies = []
        for sign in (1, -1):
            eps = np.zeros((3, 3))
            eps[a, b] = eps[b, a] = sign * h
            strained = atoms.copy()
            strained.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            energies.append(_energy(model, strained, fidelity))
        # a symmetric off-diagonal strain of h moves both (a,b) and (b,a): dE/d eps_ab counts twice
        fd[k] = (energies[0] - energies[1]) / (2 * h) / volume / (1 if a == b else 2)
    err = float(np.abs(stress - fd).max()) / max(1e-3, float(np.abs(stress).max()))
    if err > 1e3 * TOL:
        raise CheckFailed(f"stress vs finite differences: relative error {err:.2e} > {1e3 * TOL:g}")
    return err


def release_checks(model, config: dict, seed: int = 0) -> list[str]:
    """Run every check for every fidelity of a (float64) model; lines for the report."""
    from models.release_format import ReleaseError  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    lines = []
    for entry in config["fidelities"]:
        name, elements = entry["name"], entry.get("elements") or ["H"]
        cluster, bulk = _structures(list(elements), seed)
        try:
            rot = max(check_rotation(model, cluster, name, rng), check_rotation(model, bulk, name, rng))
            fd = check_forces_fd(model, cluster, name)
            st = check_stress_fd(model, bulk, name)
        except CheckFailed as err:
            raise ReleaseError(f"physics check failed for fidelity {name!r}: {err}") from None
        lines.append(f"physics: {name} ({' '.join(elements)}): rotation {rot:.1e}, forces vs FD "
                     f"{fd:.1e}, stress vs FD {st:.1e} (relative)")
    return lines
