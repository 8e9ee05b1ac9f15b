"""Records -> graphs -> one flat Batch (``data_pipeline.keys``).

:class:`BatchBuilder` is the unit of work both delivery paths run (DataLoader workers and
Ray actors): given the global record indices of one batch it reads the records, builds
each structure's neighbor list and concatenates everything into flat numpy arrays.
Arrays stay numpy until the consumer (:func:`to_torch`), because Ray moves numpy
buffers through its object store without pickling them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline import keys as K
from data_pipeline.stream.dataset import ShardedDataset
from data_pipeline.stream.graph import neighbor_list
from data_pipeline.manifest import fidelity_mapping


class BatchBuilder:
    """Builds batches of one shard folder at one cutoff.

    Args:
        folder: the shard folder (or an open :class:`ShardedDataset`).
        cutoff: neighbor-list cutoff in Angstrom.
        float_dtype: dtype of positions, cell, shifts, forces and stress (``float32`` for
            training, ``float64`` for physics checks). Energies are always float64:
            total energies reach 1e4 eV, where float32 steps are 1e-3 eV.
        fidelities: the model's fidelity table (names in head order): a batch's
            ``fidelity`` ids then index it, matched by name; None: the folder's own
            manifest order (for data tools that have no model).

    Pickles without open files (shards reopen lazily in each process).
    """

    def __init__(self, folder: str | Path | ShardedDataset, cutoff: float,
                 float_dtype: str = "float32", fidelities: list[str] | None = None):
        self.dataset = folder if isinstance(folder, ShardedDataset) else ShardedDataset(folder)
        self.cutoff = float(cutoff)
        self.float_dtype = np.dtype(float_dtype)
        manifest = self.dataset.manifest
        names = manifest["fidelities"]
        ids = (range(len(names)) if fidelities is None
               else fidelity_mapping(names, fidelities, str(self.dataset.folder)))
        self._fidelity = dict(zip(names, ids))
        self._dataset = {name: i for i, name in enumerate(manifest["datasets"])}

    def __call__(self, indices) -> dict[str, np.ndarray]:
        """The batch of global record ``indices`` as numpy arrays keyed by ``keys``."""
        records = [self.dataset[int(i)] for i in indices]
        graphs = [self.graph(r) for r in records]
        return self.collate(records, graphs, np.asarray(indices, dtype=np.int64))

    def graph(self, record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """``(edge_index, cell_shifts)`` of one record at this builder's cutoff."""
        # records were validated by the build: skip the neighbor list's input checks
        return neighbor_list(record["positions"], record["cell"], record["pbc"], self.cutoff,
                             check=False)

    def collate(self, records: list[dict[str, Any]], graphs: list[tuple[np.ndarray, np.ndarray]],
                indices: np.ndarray) -> dict[str, np.ndarray]:
        """Concatenate records and their ``(edge_index, cell_shifts)`` into one batch."""
        fidelity = np.array([self._fidelity[r["fidelity"]] for r in records], dtype=np.int64)
        dataset = np.array([self._dataset[r["dataset"]] for r in records], dtype=np.int64)
        return collate(records, graphs, indices, fidelity, dataset, self.float_dtype)


def collate(records: list[dict[str, Any]], graphs: list[tuple[np.ndarray, np.ndarray]],
            indices: np.ndarray, fidelity: np.ndarray, dataset: np.ndarray,
            float_dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """One batch from record dicts, their neighbor lists and per-structure ids."""
    fdt = np.dtype(float_dtype)
    n_atoms = np.array([len(r["numbers"]) for r in records], dtype=np.int64)
    n_edges = np.array([g[0].shape[1] for g in graphs], dtype=np.int64)
    first_atom = np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(np.int64)
    # edges index atoms of their own structure: offset them by the structure's first atom
    edge_index = np.concatenate(
        [g[0] for g in graphs] + [np.zeros((2, 0), np.int64)], axis=1
    ) + np.repeat(first_atom, n_edges)[None, :]
    has_energy = np.array([r["energy"] is not None for r in records])
    has_forces = np.array([r["forces"] is not None for r in records])
    has_stress = np.array([r["stress"] is not None for r in records])
    return {
        K.POSITIONS: np.concatenate([r["positions"] for r in records]).astype(fdt),
        K.NUMBERS: np.concatenate([r["numbers"] for r in records]).astype(np.int64),
        K.BATCH: np.repeat(np.arange(len(records), dtype=np.int64), n_atoms),
        K.FORCES: np.concatenate([
            r["forces"] if r["forces"] is not None else np.zeros((n, 3))
            for r, n in zip(records, n_atoms)]).astype(fdt),
        K.EDGE_INDEX: edge_index,
        K.CELL_SHIFTS: np.concatenate([g[1] for g in graphs] + [np.zeros((0, 3))]).astype(fdt),
        K.CELL: np.stack([r["cell"] for r in records]).astype(fdt),
        K.PBC: np.stack([r["pbc"] for r in records]).astype(bool),
        K.N_ATOMS: n_atoms,
        K.N_EDGES: n_edges,
        K.FIDELITY: fidelity,
        K.DATASET: dataset,
        K.CHARGE: np.array([r["charge"] or 0 for r in records], dtype=np.int64),
        K.SPIN: np.array([r["spin"] or 0 for r in records], dtype=np.int64),
        K.INDEX: indices,
        K.ENERGY: np.array([r["energy"] if r["energy"] is not None else 0.0
                            for r in records], dtype=np.float64),
        K.STRESS: np.stack([r["stress"] if r["stress"] is not None else np.zeros(6)
                            for r in records]).astype(fdt),
        K.ENERGY_MASK: has_energy,
        K.FORCES_MASK: np.repeat(has_forces, n_atoms),
        K.STRESS_MASK: has_stress,
    }


def to_torch(batch: dict[str, np.ndarray]) -> dict:
    """Numpy batch -> torch tensors, sharing memory (read-only arrays, e.g. from Ray, are
    copied; tensors pass through)."""
    import torch  # noqa: PLC0415 - the data pipeline's other users should not pay for torch

    return {k: v if isinstance(v, torch.Tensor) else
            torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in batch.items()}


def collate_atoms(atoms_list, cutoff: float, fidelity: int | list[int] = 0,
                  float_dtype: str = "float64") -> dict[str, np.ndarray]:
    """A batch of ASE ``Atoms`` (inference, tests): labels from their calculators if any.

    ``fidelity`` is the fidelity id of every structure (one int for all, or one each).
    Index and dataset ids are 0..G-1 and 0.
    """
    fids = [fidelity] * len(atoms_list) if isinstance(fidelity, int) else list(fidelity)
    records, graphs = [], []
    for atoms in atoms_list:
        calc = atoms.calc
        results = getattr(calc, "results", {}) if calc is not None else {}
        records.append({
            "numbers": atoms.numbers, "positions": atoms.positions, "cell": atoms.cell.array,
            "pbc": atoms.pbc, "energy": results.get("energy"), "forces": results.get("forces"),
            "stress": results.get("stress"), "charge": int(atoms.info.get("charge", 0)),
            "spin": int(atoms.info.get("spin", 0)), })
        graphs.append(neighbor_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff))
    return collate(records, graphs, np.arange(len(records), dtype=np.int64),
                   np.asarray(fids, dtype=np.int64), np.zeros(len(records), np.int64), float_dtype)
