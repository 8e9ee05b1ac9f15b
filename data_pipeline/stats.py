"""Dataset statistics for the manifest, computed in parallel and combined in a fixed order.

Each conversion task summarises its records (one dataset x fidelity group per task) as a
:class:`GroupStats` and keeps a compact per-record table of energies and compositions.
The driver combines the summaries in input order (Chan's parallel mean/variance update,
so no sum of squares of large total energies loses precision) and fits elemental
reference energies per fidelity from the tables in two streaming passes: normal
equations first, then the residual of the fit (again free of cancellation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable

import numpy as np

N_Z = 119  # atomic numbers 0..118 (0 unused)


@dataclasses.dataclass
class GroupStats:
    """Summary of the records of one dataset x fidelity group (or part of one)."""

    structures: int = 0
    atoms: int = 0
    elements: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(N_Z, np.int64))
    n_energy: int = 0
    epa_mean: float = 0.0  # energy per atom, eV
    epa_m2: float = 0.0  # sum of squared deviations from the mean
    force_components: int = 0
    force_sq_sum: float = 0.0
    n_stress: int = 0

    def add(self, numbers: np.ndarray, energy: float | None, forces, stress) -> None:
        """Account for one record."""
        self.structures += 1
        self.atoms += len(numbers)
        self.elements += np.bincount(numbers, minlength=N_Z)
        if energy is not None:
            self._merge_epa(1, energy / len(numbers), 0.0)
        if forces is not None:
            f = np.asarray(forces, dtype=np.float64)
            self.force_components += f.size
            self.force_sq_sum += float(np.dot(f.ravel(), f.ravel()))
        if stress is not None:
            self.n_stress += 1

    def _merge_epa(self, n: int, mean: float, m2: float) -> None:
        total = self.n_energy + n
        if total == 0:
            return
        delta = mean - self.epa_mean
        self.epa_mean += delta * n / total
        self.epa_m2 += m2 + delta * delta * self.n_energy * n / total
        self.n_energy = total

    def merge(self, other: "GroupStats") -> None:
        """Fold another partial summary into this one (order matters only in the last bits)."""
        self.structures += other.structures
        self.atoms += other.atoms
        self.elements += other.elements
        self._merge_epa(other.n_energy, other.epa_mean, other.epa_m2)
        self.force_components += other.force_components
        self.force_sq_sum += other.force_sq_sum
        self.n_stress += other.n_stress

    def to_json(self) -> dict:
        """The manifest's view: counts, element counts by symbol, energy and force figures."""
        from ase.data import chemical_symbols  # noqa: PLC0415

        present = np.flatnonzero(self.elements)
        return {
            "structures": self.structures,
            "atoms": self.atoms,
            "elements": {chemical_symbols[z]: int(self.elements[z]) for z in present},
            "with_energy": self.n_energy,
            "with_stress": self.n_stress,
            "energy_per_atom_mean": self.epa_mean if self.n_energy else None,
            "energy_per_atom_std": float(np.sqrt(self.epa_m2 / self.n_energy)) if self.n_energy else None,
            "force_rms": float(np.sqrt(self.force_sq_sum / self.force_components))
            if self.force_components
            else None,
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Lossless form for the staging folder (read back by :meth:`from_arrays`)."""
        return {f.name: np.asarray(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_arrays(cls, arrays) -> "GroupStats":
        """Inverse of :meth:`to_arrays`."""
        kw = {}
        for f in dataclasses.fields(cls):
            value = arrays[f.name]
            kw[f.name] = value.copy() if f.name == "elements" else value.item()
        return cls(**kw)


class EnergyTable:
    """Per-record energy and composition (CSR), for the reference-energy fit."""

    def __init__(self):
        self.energy: list[float] = []
        self.z: list[np.ndarray] = []
        self.count: list[np.ndarray] = []

    def add(self, numbers: np.ndarray, energy: float) -> None:
        """Account for one record that has an energy."""
        z, c = np.unique(numbers, return_counts=True)
        self.energy.append(energy)
        self.z.append(z.astype(np.uint8))
        self.count.append(c.astype(np.uint32))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to store: energy [n], ptr [n+1], z [nnz], count [nnz]."""
        lengths = np.array([len(z) for z in self.z], dtype=np.int64)
        return {
            "energy": np.asarray(self.energy, dtype=np.float64),
            "ptr": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "z": np.concatenate(self.z) if self.z else np.zeros(0, np.uint8),
            "count": np.concatenate(self.count) if self.count else np.zeros(0, np.uint32),
        }


def _dense(table, columns: np.ndarray) -> np.ndarray:
    """Composition matrix ``[n_records, len(columns)]`` of a stored EnergyTable."""
    n = len(table["energy"])
    rows = np.repeat(np.arange(n), np.diff(table["ptr"]))
    col_of_z = np.full(N_Z, -1)
    col_of_z[columns] = np.arange(len(columns))
    a = np.zeros((n, len(columns)))
    a[rows, col_of_z[table["z"]]] = table["count"]
    return a


def fit_references(
    tables: Iterable[Path], elements: np.ndarray, ridge: float, load
) -> tuple[np.ndarray, float, int]:
    """Least-squares elemental energies ``E ~ sum_Z n_Z e_Z`` over stored energy tables.

    ``load(path)`` returns a table's arrays; tables are streamed twice (normal equations,
    then residuals), so memory does not grow with the dataset. The ridge term is
    ``ridge * mean(diag(A^T A))``: it keeps elements that always appear together (e.g.
    only in one stoichiometry) solvable without biasing well-determined ones.

    Returns (energies for ``elements`` in eV, RMS residual per structure in eV, count).
    """
    tables = list(tables)
    ata = np.zeros((len(elements), len(elements)))
    atb = np.zeros(len(elements))
    n = 0
    for path in tables:
        t = load(path)
        a = _dense(t, elements)
        ata += a.T @ a
        atb += a.T @ t["energy"]
        n += len(a)
    if n == 0:
        return np.zeros(len(elements)), float("nan"), 0
    lam = ridge * max(float(np.mean(np.diag(ata))), 1e-30)
    coef = np.linalg.solve(ata + lam * np.eye(len(elements)), atb)
    sq = 0.0
    for path in tables:
        t = load(path)
        resid = t["energy"] - _dense(t, elements) @ coef
        sq += float(resid @ resid)
    return coef, float(np.sqrt(sq / n)), n
