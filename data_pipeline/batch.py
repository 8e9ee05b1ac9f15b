"""A Batch from records or ASE ``Atoms``: the one function that assembles the batch contract.

:mod:`data_pipeline.keys` names the keys; :func:`collate` fills them from record dicts and
their neighbor lists (:mod:`data_pipeline.graph`). The stream's batch builder
(shards -> batches) and inference on ASE ``Atoms`` (:func:`atoms_batch`: the calculator,
the physics suite, export, FLOP counts) both come through here, so a batch means the same
thing in training and at inference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_pipeline import keys as K
from data_pipeline.graph import neighbor_list


def collate(records: list[dict[str, Any]], graphs: list[tuple[np.ndarray, np.ndarray]],
            indices: np.ndarray, fidelity: np.ndarray, dataset: np.ndarray,
            float_dtype: Any = np.float32, extras: dict[str, tuple[str, list[int]]] | None = None
            ) -> dict[str, np.ndarray]:
    """One batch from record dicts, their neighbor lists and per-structure ids.

    ``extras``: ``{name: (per, shape)}`` of the record extras to carry (``per``: ``atom``
    or ``structure``, ``shape``: the trailing shape), each with its mask
    (:func:`~data_pipeline.keys.extra`); None or empty: none."""
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
    batch = {
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
    for name, (per, shape) in (extras or {}).items():
        batch[K.extra(name)], batch[K.extra_mask(name)] = _extra(records, n_atoms, name, per, shape, fdt)
    return batch


def _extra(records, n_atoms, name: str, per: str, shape: list[int], fdt) -> tuple[np.ndarray, np.ndarray]:
    """``(values [N or G, *shape], mask [G])`` of extra ``name``: zeros where a record lacks it."""
    shape = tuple(shape)
    values, mask = [], np.zeros(len(records), dtype=bool)
    for g, (r, n) in enumerate(zip(records, n_atoms)):
        full = ((int(n),) if per == "atom" else ()) + shape
        value = (r.get("extras") or {}).get(name)
        if value is not None and np.shape(value) == full:
            values.append(np.asarray(value).reshape(full))
            mask[g] = True
        else:
            values.append(np.zeros(full))
    if per == "atom":
        stacked = np.concatenate(values) if values else np.zeros((0, *shape))
    else:
        stacked = np.stack(values) if values else np.zeros((0, *shape))
    return stacked.astype(fdt), mask


def to_torch(batch: dict[str, np.ndarray]) -> dict:
    """Numpy batch -> torch tensors, sharing memory (read-only arrays, e.g. from Ray, are
    copied; tensors pass through)."""
    import torch  # noqa: PLC0415 - the data pipeline's other users should not pay for torch

    return {k: v if isinstance(v, torch.Tensor) else
            torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in batch.items()}


def atoms_batch(atoms_list, cutoff: float, fidelity: int | list[int] = 0,
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
