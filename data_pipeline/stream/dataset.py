"""The public Python reader: ``ShardedDataset(DIR)[i]`` -> one record as a dict.

Example::

    from data_pipeline.stream import ShardedDataset
    ds = ShardedDataset("shards/")
    len(ds)               # records in all shards
    rec = ds[0]           # {"numbers": uint8 [n], "positions": float64 [n, 3], ...}
    ds.n_atoms            # int64 [len(ds)], from shard metadata (no record decoded)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.progress import Progress
from data_pipeline.manifest import read_manifest
from data_pipeline.schema import decode
from data_pipeline.shards import ShardError, ShardReader, sha256_file


class ShardedDataset:
    """Map-style, read-only view of a shard folder, indexed globally across shards.

    Shards open lazily in each process (see ShardReader), so the dataset can be handed
    to forked DataLoader workers or pickled to Ray actors. ``ds[i]`` returns a dict with
    the schema's keys (``numbers``, ``positions``, ``cell``, ``pbc``, ``energy``,
    ``forces``, ``stress``, ``charge``, ``spin``, ``fidelity``, ``dataset``,
    ``source_id``, ``extras``); labels a record lacks are None.
    """

    def __init__(self, folder: str | Path, check_sizes: bool = True):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.shards = [ShardReader(self.folder / s["file"]) for s in self.manifest["shards"]]
        if check_sizes:
            self.check_sizes()
        counts = np.array([s["records"] for s in self.manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self._n_atoms = None

    def __getstate__(self) -> dict:
        # a copy sent to another process (Ray actor, spawned worker) carries the manifest
        # and the shard paths, not per-record metadata (8 bytes a record: 800 MB at 1e8
        # records); the receiver reads what it needs from the shards itself
        return {**self.__dict__, "_n_atoms": None}

    def check_sizes(self) -> None:
        """Every shard exists with the size the manifest records (one ``stat`` per shard).

        Catches the common damage (a missing shard, a truncated copy, a file from another
        build) at start-up rather than at some record mid-epoch. :meth:`verify` checks bytes.
        """
        for reader, info in zip(self.shards, self.manifest["shards"]):
            if not reader.path.is_file():
                raise ShardError(f"{reader.path}: shard listed in the manifest is missing; "
                                 f"copy it again or rebuild the folder")
            size = reader.path.stat().st_size
            if size != info["bytes"]:
                raise ShardError(f"{reader.path}: {size} bytes, the manifest says {info['bytes']} "
                                 f"(truncated or from another build); copy it again or rebuild")

    def verify(self, rank: int = 0, world_size: int = 1, progress: bool = False) -> int:
        """Check the SHA-256 of shards ``rank, rank + world_size, ...`` against the manifest.

        Ranks split the shards, so a job verifies its data in ``1 / world_size`` of the
        time. Raises :class:`ShardError` naming the first shard that does not match;
        returns the number of shards checked.
        """
        mine = list(zip(self.shards, self.manifest["shards"]))[rank::world_size]
        with Progress(sum(i["bytes"] for _, i in mine), "verify", unit="B",
                      enabled=progress) as bar:
            for reader, info in mine:
                digest = sha256_file(reader.path)
                if digest != info["sha256"]:
                    raise ShardError(f"{reader.path}: sha256 {digest[:16]}... does not match the "
                                     f"manifest ({info['sha256'][:16]}...); the shard is corrupt "
                                     f"or from another build: copy it again or rebuild")
                bar.update(info["bytes"])
        return len(mine)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(shard, index within shard) of global record ``i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records in {self.folder}")
        i = i % len(self)
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return s, i - int(self._starts[s])

    def raw(self, i: int) -> bytes:
        """Encoded bytes of record ``i``."""
        s, j = self.locate(i)
        return self.shards[s].get(j)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s, j = self.locate(int(i))
        return decode(self.shards[s].get(j), where=f"{self.shards[s].path}#{j}").to_dict()

    def _meta_column(self, key: str) -> np.ndarray:
        parts = []
        for reader, info in zip(self.shards, self.manifest["shards"]):
            header, arrays = reader.meta()
            if header["n_records"] != info["records"]:
                raise ShardError(f"{reader.path}: {header['n_records']} records, manifest says "
                                 f"{info['records']}; the folder mixes builds: rebuild it")
            parts.append(arrays[key].astype(np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    @property
    def n_atoms(self) -> np.ndarray:
        """``int64 [len(self)]`` atom count of every record, from shard metadata."""
        if self._n_atoms is None:
            self._n_atoms = self._meta_column("n_atoms")
        return self._n_atoms

    @property
    def fidelity_ids(self) -> np.ndarray:
        """``int64 [len(self)]`` index into ``manifest["fidelities"]`` of every record."""
        return self._meta_column("fidelity")

    @property
    def dataset_ids(self) -> np.ndarray:
        """``int64 [len(self)]`` index into ``manifest["datasets"]`` of every record."""
        return self._meta_column("dataset")
