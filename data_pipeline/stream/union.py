"""Several shard folders read as one: the training data plus replay of an earlier run's.

A run that adds a fidelity to a trained model (``init_from``) keeps its old heads from
forgetting by mixing in some of the data they were trained on. That data stays where it
is: :class:`DatasetUnion` indexes the parts one after another (part 0's records first),
with one merged manifest (fidelities and datasets in order of first appearance), and
``part_ids`` says which folder each record comes from, so the sampler can draw a fixed
share of every epoch from each part (``data.replay.fraction``,
:class:`~data_pipeline.stream.sampler.AtomBudgetSampler`). No record is copied.

Example::

    union = DatasetUnion([ShardedDataset("new/"), ShardedDataset("pretraining/")])
    union[len(union) - 1]      # the last record of pretraining/
    union.part_ids             # int64 [len(union)]: 0 for new/, 1 for pretraining/
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.stream.dataset import ShardedDataset


def _ordered_union(lists) -> list[str]:
    out: list[str] = []
    for names in lists:
        out += [n for n in names if n not in out]
    return out


class DatasetUnion:
    """Read-only view of ``parts`` (shard folders) as one dataset, part after part.

    It answers what the stream and the trainer ask of a :class:`ShardedDataset`: ``len``,
    ``[i]``, ``n_atoms``, ``fidelity_ids`` and ``dataset_ids`` (indices into the merged
    manifest's lists), ``verify`` and ``manifest``, plus ``part_ids`` and ``parts``.

    The merged manifest holds ``fidelities``, ``datasets``, ``groups`` (each with its
    ``part``), ``extras`` and ``coverage`` of part 0, ``element_references`` (part 0's, then a
    later part's for a fidelity part 0 lacks), ``records``, ``atoms`` and a ``content_hash``
    of the parts' hashes in order; ``parts`` lists each folder's name and hash.
    """

    def __init__(self, parts: list[ShardedDataset]):
        if not parts:
            raise ValueError("DatasetUnion needs at least one shard folder")
        self.parts = list(parts)
        self.folder = Path(parts[0].folder)  # the main data: error messages name it first
        manifests = [p.manifest for p in parts]
        fids = _ordered_union(m["fidelities"] for m in manifests)
        sets = _ordered_union(m["datasets"] for m in manifests)
        refs: dict = {}
        for m in manifests:
            for fid, r in m.get("element_references", {}).items():
                refs.setdefault(fid, r)
        extras: dict = {}
        for m in manifests:
            for name, spec in (m.get("extras") or {}).items():
                extras.setdefault(name, spec)
        digest = hashlib.sha256("+".join(m["content_hash"] for m in manifests).encode()).hexdigest()
        self.manifest = {
            "fidelities": fids, "datasets": sets, "element_references": refs, "extras": extras,
            "groups": [{**g, "part": k} for k, m in enumerate(manifests) for g in m.get("groups", [])],
            "records": sum(len(p) for p in parts), "atoms": sum(int(m.get("atoms", 0)) for m in manifests),
            "coverage": manifests[0].get("coverage"), "content_hash": digest,
            "parts": [{"folder": Path(p.folder).name, "content_hash": m["content_hash"], "records": len(p)}
                      for p, m in zip(parts, manifests)],
        }
        self._fid_map = [np.array([fids.index(f) for f in m["fidelities"]], np.int64) for m in manifests]
        self._set_map = [np.array([sets.index(d) for d in m["datasets"]], np.int64) for m in manifests]
        self._starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
        self._n_atoms = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_n_atoms": None}  # per-record metadata is re-read where needed

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(part, index within the part) of record ``i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records in "
                             f"{' + '.join(str(p.folder) for p in self.parts)}")
        i = i % len(self)
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        return k, i - int(self._starts[k])

    def __getitem__(self, i: int) -> dict[str, Any]:
        k, j = self.locate(int(i))
        return self.parts[k][j]

    def raw(self, i: int) -> bytes:
        """Encoded bytes of record ``i``."""
        k, j = self.locate(int(i))
        return self.parts[k].raw(j)

    def verify(self, rank: int = 0, world_size: int = 1, progress: bool = False) -> int:
        """Every part's shards checked against its manifest (ranks split each part)."""
        return sum(p.verify(rank, world_size, progress) for p in self.parts)

    @property
    def part_ids(self) -> np.ndarray:
        """``int64 [len(self)]``: which part (folder) each record is from."""
        return np.repeat(np.arange(len(self.parts), dtype=np.int64), np.diff(self._starts))

    @property
    def n_atoms(self) -> np.ndarray:
        """``int64 [len(self)]`` atom count of every record, from shard metadata."""
        if self._n_atoms is None:
            self._n_atoms = np.concatenate([p.n_atoms for p in self.parts])
        return self._n_atoms

    @property
    def fidelity_ids(self) -> np.ndarray:
        """``int64 [len(self)]`` index into the merged ``manifest["fidelities"]``."""
        return np.concatenate([m[p.fidelity_ids] for p, m in zip(self.parts, self._fid_map)])

    @property
    def dataset_ids(self) -> np.ndarray:
        """``int64 [len(self)]`` index into the merged ``manifest["datasets"]``."""
        return np.concatenate([m[p.dataset_ids] for p, m in zip(self.parts, self._set_map)])
