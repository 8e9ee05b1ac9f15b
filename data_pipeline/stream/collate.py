"""Shard records -> one flat Batch (``data_pipeline.keys``), the unit of work of delivery.

:class:`BatchBuilder` is what both delivery paths run (DataLoader workers and Ray
actors): given the global record indices of one batch it reads the records, builds each
structure's neighbor list (:mod:`data_pipeline.graph`) and concatenates everything into
flat numpy arrays (:func:`data_pipeline.batch.collate`). Arrays stay numpy until the
consumer (:func:`~data_pipeline.batch.to_torch`), because Ray moves numpy buffers
through its object store without pickling them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.fidelities import FidelityTable
from data_pipeline.batch import collate
from data_pipeline.graph import neighbor_list
from data_pipeline.stream.dataset import ShardedDataset


class BatchBuilder:
    """Builds batches of one shard folder at one cutoff.

    Args:
        folder: the shard folder, or an open :class:`ShardedDataset` (or
            :class:`~data_pipeline.stream.union.DatasetUnion`).
        cutoff: neighbor-list cutoff in Angstrom.
        float_dtype: dtype of positions, cell, shifts, forces and stress (``float32`` for
            training, ``float64`` for physics checks). Energies are always float64:
            total energies reach 1e4 eV, where float32 steps are 1e-3 eV.
        fidelities: the model's fidelity table (names in head order): a batch's
            ``fidelity`` ids then index it, matched by name; None: the folder's own
            manifest order (for data tools that have no model).
        extras: ``{name: (per, shape)}`` of record extras a batch carries with masks
            (the model's extra targets, ``models/properties.py``); None: none.

    Pickles without open files (shards reopen lazily in each process).
    """

    def __init__(self, folder, cutoff: float,
                 float_dtype: str = "float32", fidelities: list[str] | None = None,
                 extras: dict[str, tuple[str, list[int]]] | None = None):
        self.dataset = ShardedDataset(folder) if isinstance(folder, (str, Path)) else folder
        self.cutoff = float(cutoff)
        self.float_dtype = np.dtype(float_dtype)
        manifest = self.dataset.manifest
        names = manifest["fidelities"]
        ids = (range(len(names)) if fidelities is None
               else FidelityTable(list(fidelities)).indices(names, str(self.dataset.folder)))
        self._fidelity = dict(zip(names, ids))
        self._dataset = {name: i for i, name in enumerate(manifest["datasets"])}
        self.extras = dict(extras or {})

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
        return collate(records, graphs, indices, fidelity, dataset, self.float_dtype, self.extras)
