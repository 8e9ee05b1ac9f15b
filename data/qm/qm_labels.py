"""Labellers for the QM dataset: GFN1/GFN2-xTB (tblite), PBE/def2-SVP (pyscf), EMT (ASE).

Every labeller returns energies in eV, forces in eV/A and stress in eV/A^3 (ASE sign
convention); molecular labellers also return atomic partial charges (e) and the dipole
moment (xTB: e*A, as tblite's ASE calculator gives it; DFT: Debye, pyscf's unit). The
settings each one uses are in :data:`XTB_SETTINGS`, :data:`DFT_SETTINGS` and are written
to the dataset's ``stats.json``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from typing import Iterator

import numpy as np
from ase import Atoms, units

XTB_METHODS = {"GFN1-xTB": "gfn1", "GFN2-xTB": "gfn2"}  # fidelity label -> key prefix
XTB_SETTINGS = {"accuracy": 1.0, "electronic_temperature_K": 300.0, "max_iterations": 250,
                "charge": 0, "multiplicity": 1,
                "charges": "tblite's atomic charges: Mulliken populations of the SCF density (e)",
                "dipole": "tblite's molecular dipole, sum of q_i r_i plus the Mulliken atomic "
                          "dipoles (e*A: the library's e*Bohr times Bohr in its ASE calculator)"}
DFT_FIDELITY = "PBE/def2-SVP"
DFT_SETTINGS = {"xc": "PBE", "basis": "def2-SVP", "method": "RKS (restricted, singlet)",
                "density_fitting": False, "grids_level": 2, "conv_tol_Eh": 1e-9,
                "conv_tol_grad": "pyscf default (sqrt(conv_tol))", "max_cycle": 100,
                "init_guess": "minao for a molecule's first frame, then the previous frame's "
                              "converged density (same molecule, same atom order)",
                "forces": "analytic nuclear gradients (pyscf grad.RKS)",
                "charges": "meta-Lowdin populations of the converged density (pyscf "
                           "mulliken_meta), e",
                "dipole": "pyscf dip_moment of the converged density, Debye (stored in Debye; "
                          "the recipes convert it); neutral, so independent of the origin"}


@dataclasses.dataclass
class Labels:
    """One structure's labels at one level of theory."""

    energy: float  # eV
    forces: np.ndarray  # [n_atoms, 3] eV/A
    charges: np.ndarray  # [n_atoms] e
    dipole: np.ndarray  # [3] e*A (xTB) or Debye (DFT, pyscf's unit)

    def store(self, atoms: Atoms, prefix: str) -> None:
        """Write all four labels onto ``atoms`` under ``<prefix>_energy`` etc."""
        atoms.info[f"{prefix}_energy"] = self.energy
        atoms.arrays[f"{prefix}_forces"] = self.forces
        self.store_extras(atoms, prefix)

    def store_extras(self, atoms: Atoms, prefix: str) -> None:
        """Write only the charges and the dipole (the relabel keeps stored energies/forces)."""
        atoms.arrays[f"{prefix}_charges"] = self.charges
        atoms.info[f"{prefix}_dipole"] = self.dipole


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


def xtb_label(atoms: Atoms, fidelity: str) -> Labels:
    """A molecule's labels at an xTB level, with a fresh calculator (so a label never
    depends on which frames came before it); the dipole in e*A."""
    a = Atoms(numbers=atoms.numbers, positions=atoms.positions)
    a.calc = xtb_calculator(fidelity)
    energy = float(a.get_potential_energy())
    # tblite's ASE docstring says Debye, but it returns the library's e*Bohr times Bohr: e*A
    return Labels(energy, np.asarray(a.get_forces(), dtype=np.float64),
                  np.asarray(a.get_charges(), dtype=np.float64),
                  np.asarray(a.get_dipole_moment(), dtype=np.float64))


def dft_scf(atoms: Atoms, dm0=None, conv_tol: float | None = None):
    """A converged PBE/def2-SVP RKS object for ``atoms`` and its SCF cycle count;
    ``conv_tol`` (Eh) overrides the label setting (the IR stage tightens it).

    Raises RuntimeError when the SCF does not converge.
    """
    from pyscf import dft, gto

    s = DFT_SETTINGS
    mol = gto.M(atom=[(int(z), tuple(p)) for z, p in zip(atoms.numbers, atoms.positions)],
                basis=s["basis"], unit="Angstrom", charge=0, spin=0, verbose=0)
    mf = dft.RKS(mol)
    mf.xc = s["xc"]
    mf.grids.level = s["grids_level"]
    mf.conv_tol = s["conv_tol_Eh"] if conv_tol is None else conv_tol
    mf.max_cycle = s["max_cycle"]
    counter = {"n": 0}
    mf.callback = lambda env: counter.__setitem__("n", counter["n"] + 1)
    mf.kernel(dm0=dm0)
    if not mf.converged:
        raise RuntimeError(f"SCF not converged in {s['max_cycle']} cycles")
    return mf, counter["n"]


def dft_label(atoms: Atoms, dm0=None) -> tuple[Labels, np.ndarray, int]:
    """(labels, converged density matrix, SCF cycles) at PBE/def2-SVP; the dipole in
    Debye (pyscf's unit), the charges meta-Lowdin.

    Raises RuntimeError when the SCF does not converge (the caller drops and counts it).
    """
    mf, cycles = dft_scf(atoms, dm0)
    grad = mf.nuc_grad_method().kernel()  # Hartree/Bohr, [n_atoms, 3]
    forces = -np.asarray(grad) * (units.Hartree / units.Bohr)
    dm = mf.make_rdm1()
    _, charges = mf.mulliken_meta(mf.mol, dm, verbose=0)  # (populations, charges)
    dipole = mf.dip_moment(mf.mol, dm, unit="Debye", verbose=0)
    labels = Labels(float(mf.e_tot) * units.Hartree, forces,
                    np.asarray(charges, dtype=np.float64), np.asarray(dipole, dtype=np.float64))
    return labels, dm, cycles


def dft_chain(frames: list) -> Iterator[tuple[Atoms, Labels | None, int]]:
    """DFT labels of ``frames`` in their order: each frame starts from the previous
    frame's converged density when both are the same molecule (the minao guess
    otherwise), and once more from minao if that SCF fails; None after two failures.
    The full run and the relabel both go through here, so their densities chain alike."""
    dm, last_mol = None, None
    for a in frames:
        dm = dm if a.info["mol_id"] == last_mol else None
        try:
            labels, dm, cycles = dft_label(a, dm0=dm)
        except RuntimeError:
            try:  # once more from the default guess before giving up on the frame
                labels, dm, cycles = dft_label(a, dm0=None)
            except RuntimeError:
                dm, last_mol = None, None
                yield a, None, 0
                continue
        last_mol = a.info["mol_id"]
        yield a, labels, cycles


def emt_label(atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray]:
    """(energy eV, forces eV/A, stress Voigt eV/A^3) with ASE's EMT."""
    from ase.calculators.emt import EMT

    a = atoms.copy()
    a.calc = EMT()
    return (float(a.get_potential_energy()), np.asarray(a.get_forces(), dtype=np.float64),
            np.asarray(a.get_stress(voigt=True), dtype=np.float64))
