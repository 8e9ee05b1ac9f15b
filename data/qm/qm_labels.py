"""Labellers for the QM dataset: GFN1/GFN2-xTB (tblite), PBE/def2-SVP (pyscf), EMT (ASE).

Every labeller returns energies in eV, forces in eV/A and stress in eV/A^3 (ASE sign
convention); the settings each one uses are in :data:`XTB_SETTINGS`, :data:`DFT_SETTINGS`
and are written to the dataset's ``stats.json``.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
from ase import Atoms, units

XTB_METHODS = {"GFN1-xTB": "gfn1", "GFN2-xTB": "gfn2"}  # fidelity label -> key prefix
XTB_SETTINGS = {"accuracy": 1.0, "electronic_temperature_K": 300.0, "max_iterations": 250,
                "charge": 0, "multiplicity": 1}
DFT_FIDELITY = "PBE/def2-SVP"
DFT_SETTINGS = {"xc": "PBE", "basis": "def2-SVP", "method": "RKS (restricted, singlet)",
                "density_fitting": False, "grids_level": 2, "conv_tol_Eh": 1e-9,
                "conv_tol_grad": "pyscf default (sqrt(conv_tol))", "max_cycle": 100,
                "init_guess": "minao for a molecule's first frame, then the previous frame's "
                              "converged density (same molecule, same atom order)",
                "forces": "analytic nuclear gradients (pyscf grad.RKS)"}


class MissingCode(RuntimeError):
    """A labelling code is not installed; the message says what to install."""


def require(module: str, package: str) -> None:
    """Import ``module`` or raise :class:`MissingCode` naming the pip command."""
    try:
        __import__(module)
    except ImportError as err:
        raise MissingCode(
            f"make_qm.py needs {package} ({err}); install the optional extra with "
            f"`pip install -e '.[qm]'` (or `pip install {package}`) into the venv and rerun"
        ) from None


def versions() -> dict[str, str]:
    """Installed versions of the codes that produce the labels."""
    out = {}
    for pkg in ("tblite", "pyscf", "ase", "numpy", "scipy"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def xtb_calculator(fidelity: str):
    """A fresh tblite ASE calculator for ``GFN1-xTB`` or ``GFN2-xTB`` (neutral singlet)."""
    from tblite.ase import TBLite

    method = {"GFN1-xTB": "GFN1-xTB", "GFN2-xTB": "GFN2-xTB"}[fidelity]
    s = XTB_SETTINGS
    return TBLite(method=method, accuracy=s["accuracy"], max_iterations=s["max_iterations"],
                  electronic_temperature=s["electronic_temperature_K"], charge=s["charge"],
                  multiplicity=s["multiplicity"], verbosity=0)


def xtb_label(atoms: Atoms, fidelity: str) -> tuple[float, np.ndarray]:
    """(energy eV, forces eV/A) of a molecule at an xTB level, with a fresh calculator
    (so a label never depends on which frames came before it)."""
    a = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    a.calc = xtb_calculator(fidelity)
    return float(a.get_potential_energy()), np.asarray(a.get_forces(), dtype=np.float64)


def dft_label(atoms: Atoms, dm0=None) -> tuple[float, np.ndarray, np.ndarray, int]:
    """(energy eV, forces eV/A, converged density matrix, SCF cycles) at PBE/def2-SVP.

    Raises RuntimeError when the SCF does not converge (the caller drops and counts it).
    """
    from pyscf import dft, gto

    s = DFT_SETTINGS
    mol = gto.M(atom=[(int(z), tuple(p)) for z, p in zip(atoms.numbers, atoms.positions)],
                basis=s["basis"], unit="Angstrom", charge=0, spin=0, verbose=0)
    mf = dft.RKS(mol)
    mf.xc = s["xc"]
    mf.grids.level = s["grids_level"]
    mf.conv_tol = s["conv_tol_Eh"]
    mf.max_cycle = s["max_cycle"]
    counter = {"n": 0}
    mf.callback = lambda env: counter.__setitem__("n", counter["n"] + 1)
    energy = mf.kernel(dm0=dm0)
    if not mf.converged:
        raise RuntimeError(f"SCF not converged in {s['max_cycle']} cycles")
    grad = mf.nuc_grad_method().kernel()  # Hartree/Bohr, [n_atoms, 3]
    forces = -np.asarray(grad) * (units.Hartree / units.Bohr)
    return float(energy) * units.Hartree, forces, mf.make_rdm1(), counter["n"]


def emt_label(atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
    """(energy eV, forces eV/A, stress Voigt eV/A^3) with ASE's EMT."""
    from ase.calculators.emt import EMT

    a = atoms.copy()
    a.calc = EMT()
    return (float(a.get_potential_energy()), np.asarray(a.get_forces(), dtype=np.float64),
            np.asarray(a.get_stress(voigt=True), dtype=np.float64))
