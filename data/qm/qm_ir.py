"""IR reference spectra of the QM test molecules: harmonic frequencies and intensities.

Per molecule and level of theory: relax with that level (ASE BFGS), then central finite
differences of its forces and dipole moment give the Hessian and the dipole derivatives;
the mass-weighted Hessian, with translations and rotations projected out, gives the
normal modes; a mode's IR intensity is |d mu / d Q|^2 (double-harmonic approximation).
One small JSON file per molecule and level: ``<out>/test/ir/<mol_id>.<level>.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes

import qm_labels as lab

LEVELS = {"gfn1": "GFN1-xTB", "gfn2": "GFN2-xTB", "dft": lab.DFT_FIDELITY}  # file key -> fidelity
IR_SETTINGS = {
    "relax": "ASE BFGS from the molecule's reference geometry (G2/S22), fmax 1e-3 eV/A, "
             "at most 1000 steps",
    "fmax_eV_A": 1e-3,
    "displacement_A": 0.01,
    "differences": "central, +-0.01 A per Cartesian component (6N evaluations)",
    "masses": "ASE's standard atomic masses (amu)",
    "modes": "symmetrised mass-weighted Hessian; translations and rotations about the "
             "centre of mass projected out (their 6, or 5 if linear, modes are ~0 cm^-1)",
    "intensity": "|d mu/d Q|^2, double-harmonic, in km/mol (= 42.2561 x (D/A)^2/amu)",
    "saddle_restart_below_cm1": -20.0,  # a mode below this after relaxing: push and relax again
    "saddle_push_A": 0.1,  # along that mode, largest atom displacement
    "saddle_restarts_max": 2,
    "ir_active_threshold_km_mol": 0.1,  # numerical noise of forbidden modes: < 1e-3
    "dft_conv_tol_Eh": 1e-11,  # tighter than the labels' 1e-9: the differences divide by 0.02 A
}
KM_MOL_PER_E2_AMU = units._Nav / (12.0 * units._eps0 * units._c ** 2) \
    * (units._e ** 2 / units._amu) / 1000.0  # (e^2/amu) -> km/mol, ~974.9
CM1_PER_SQRT_EV_A2_AMU = np.sqrt(units._e / (1e-20 * units._amu)) / (2 * np.pi * units._c * 100)

Point = Callable[[Atoms], tuple[float, np.ndarray, np.ndarray]]  # energy eV, forces eV/A, dipole e*A


def xtb_point(fidelity: str) -> Point:
    """Energy, forces and dipole (e*A) at an xTB level, a fresh calculator per call."""
    def point(atoms: Atoms):
        out = lab.xtb_label(atoms, fidelity)
        return out.energy, out.forces, out.dipole
    return point


def dft_point() -> Point:
    """Energy, forces and dipole (converted to e*A) at PBE/def2-SVP; each call starts from
    the previous call's density (the calls are one molecule's, in a fixed order)."""
    state = {"dm": None}

    def point(atoms: Atoms):
        mf, _ = lab.dft_scf(atoms, state["dm"], conv_tol=IR_SETTINGS["dft_conv_tol_Eh"])
        state["dm"] = dm = mf.make_rdm1()
        forces = -np.asarray(mf.nuc_grad_method().kernel()) * (units.Hartree / units.Bohr)
        dipole = mf.dip_moment(mf.mol, dm, unit="Debye", verbose=0) * units.Debye
        return float(mf.e_tot) * units.Hartree, forces, np.asarray(dipole)
    return point


class PointCalculator(Calculator):
    """An ASE calculator around a :data:`Point`, for ASE's optimisers."""

    implemented_properties = ["energy", "forces", "dipole"]

    def __init__(self, point: Point):
        super().__init__()
        self.point = point

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Evaluate the point once per geometry."""
        super().calculate(atoms, properties, system_changes)
        e, f, d = self.point(self.atoms)
        self.results = {"energy": e, "forces": f, "dipole": d}


def relax(atoms: Atoms, point: Point) -> tuple[Atoms, int, float]:
    """(relaxed copy, BFGS steps, residual max force eV/A)."""
    from ase.optimize import BFGS

    a = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    a.calc = PointCalculator(point)
    opt = BFGS(a, logfile=None)
    opt.run(fmax=IR_SETTINGS["fmax_eV_A"], steps=1000)
    fmax = float(np.linalg.norm(a.get_forces(), axis=1).max())
    return Atoms(numbers=a.numbers, positions=a.positions), opt.nsteps, fmax


def derivatives(atoms: Atoms, point: Point) -> tuple[np.ndarray, np.ndarray]:
    """Central differences: (Hessian [3N, 3N] eV/A^2, symmetrised; d mu / d x [3N, 3] e)."""
    n, h = len(atoms), IR_SETTINGS["displacement_A"]
    hess, dmu = np.zeros((3 * n, 3 * n)), np.zeros((3 * n, 3))
    for r in range(3 * n):
        out = []
        for sign in (1, -1):
            a = atoms.copy()
            a.positions[r // 3, r % 3] += sign * h
            out.append(point(a))
        (_, f_plus, d_plus), (_, f_minus, d_minus) = out
        hess[r] = -(f_plus - f_minus).ravel() / (2 * h)
        dmu[r] = (d_plus - d_minus) / (2 * h)
    return 0.5 * (hess + hess.T), dmu


def rigid_basis(atoms: Atoms) -> np.ndarray:
    """Orthonormal mass-weighted translations and rotations, [3N, 6] (5 if linear)."""
    m = np.sqrt(atoms.get_masses())
    r = atoms.positions - atoms.get_center_of_mass()
    vecs = []
    for k in range(3):
        t = np.zeros((len(atoms), 3))
        t[:, k] = 1.0
        vecs.append((m[:, None] * t).ravel())
        vecs.append((m[:, None] * np.cross(np.eye(3)[k], r)).ravel())
    u, s, _ = np.linalg.svd(np.array(vecs).T, full_matrices=False)
    return u[:, s > 1e-6 * s.max()]


def normal_modes(atoms: Atoms, hess: np.ndarray, dmu: np.ndarray) -> dict:
    """Frequencies (cm^-1, imaginary as negative) and intensities (km/mol) of all 3N modes,
    ascending; the rigid-body ones (zero after the projection) listed by index."""
    w = np.repeat(atoms.get_masses() ** -0.5, 3)  # [3N] 1/sqrt(amu)
    b = rigid_basis(atoms)
    proj = np.eye(len(w)) - b @ b.T
    lam, vec = np.linalg.eigh(proj @ (w[:, None] * hess * w) @ proj)  # eV/(A^2 amu)
    freq = np.sign(lam) * np.sqrt(np.abs(lam)) * CM1_PER_SQRT_EV_A2_AMU
    dmu_dq = (dmu * w[:, None]).T @ vec  # [3, 3N] e/sqrt(amu)
    intensity = (dmu_dq ** 2).sum(0) * KM_MOL_PER_E2_AMU
    rigid = np.argsort(np.linalg.norm(b.T @ vec, axis=0))[-b.shape[1]:]
    freq[rigid] = 0.0  # zero by construction (projected out); only round-off is left
    intensity[rigid] = 0.0  # a rotating polar molecule's dipole turns; that is not a band
    return {"frequencies": freq, "intensities": intensity, "rigid": sorted(rigid.tolist()),
            "displacements": (w[:, None] * vec).T.reshape(len(w), -1, 3)}  # [3N modes, N, 3]


def minimum(atoms: Atoms, point: Point) -> tuple[Atoms, dict, dict]:
    """Relax and compute the normal modes; a symmetric start can stop BFGS on a saddle
    point, so an imaginary mode below -20 cm^-1 pushes the structure 0.1 A (largest atom)
    along that mode for a new relaxation, at most twice. Returns (structure, modes,
    {relax_steps, residual_max_force_eV_A, saddle_restarts})."""
    s, start, steps = IR_SETTINGS, atoms, 0
    for restart in range(s["saddle_restarts_max"] + 1):
        relaxed, n, fmax = relax(start, point)
        steps += n
        modes = normal_modes(relaxed, *derivatives(relaxed, point))
        k = int(np.argmin(modes["frequencies"]))
        if modes["frequencies"][k] > s["saddle_restart_below_cm1"] or restart == s["saddle_restarts_max"]:
            break
        shift = modes["displacements"][k]
        start = relaxed.copy()
        start.positions += s["saddle_push_A"] * shift / np.linalg.norm(shift, axis=1).max()
    return relaxed, modes, {"relax_steps": steps, "residual_max_force_eV_A": float(f"{fmax:.3g}"),
                            "saddle_restarts": restart}


def level_settings(level: str) -> tuple[str, dict]:
    """(code, its settings) of a level: the labels' settings (DFT: SCF tolerance aside)."""
    if level == "dft":
        keep = ("xc", "basis", "method", "density_fitting", "grids_level", "max_cycle")
        return "pyscf", {k: lab.DFT_SETTINGS[k] for k in keep} | {
            "conv_tol_Eh": IR_SETTINGS["dft_conv_tol_Eh"], "init_guess": "previous geometry's density"}
    keep = ("accuracy", "electronic_temperature_K", "max_iterations", "charge", "multiplicity")
    return "tblite", {"method": LEVELS[level]} | {k: lab.XTB_SETTINGS[k] for k in keep}


def spectrum(mol_id: str, atoms: Atoms, level: str) -> dict:
    """Relax ``atoms`` at ``level`` (``gfn1``, ``gfn2``, ``dft``) and return the JSON record."""
    code, settings = level_settings(level)
    point = dft_point() if level == "dft" else xtb_point(LEVELS[level])
    relaxed, modes, how = minimum(atoms, point)
    energy, _, dipole = point(relaxed)
    thr = IR_SETTINGS["ir_active_threshold_km_mol"]
    active = [i for i, x in enumerate(modes["intensities"]) if x > thr and i not in modes["rigid"]]
    return {
        "mol_id": mol_id, "level": level, "fidelity": LEVELS[level],
        "code": code, "version": lab.versions()[code],
        "settings": {"level": settings, "ir": IR_SETTINGS},
        "symbols": relaxed.get_chemical_symbols(), "numbers": relaxed.numbers.tolist(),
        "positions_A": (np.round(relaxed.positions, 8) + 0.0).tolist(),  # + 0.0: no "-0.0"
        **how, "energy_eV": round(energy, 6), "dipole_eA": (np.round(dipole, 6) + 0.0).tolist(),
        "frequencies_cm1": np.round(modes["frequencies"], 2).tolist(),
        "rigid_body_modes": modes["rigid"],
        "ir_intensities_km_mol": np.round(modes["intensities"], 3).tolist(),
        "ir_intensity_unit": "km/mol",
        "ir_active_modes": active,
        "ir_active_frequencies_cm1": [round(float(modes["frequencies"][i]), 2) for i in active],
    }


def write(path: Path, record: dict) -> int:
    """Write one record as JSON, one line per top-level key; returns its size in bytes."""
    text = "{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return len(text.encode())
