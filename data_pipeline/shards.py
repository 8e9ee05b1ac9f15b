"""LMDB shards: atomic deterministic writing, and a lazy, fork-safe read-only reader.

A shard is one LMDB file ``shard-NNNNN.lmdb`` (``subdir=False``, no lock file). Keys are
record indices as 8-byte big-endian integers (so key order is index order and the write
can append); the key ``__meta__`` (sorting after every index key) holds the shard's
metadata: record count, per-record atom counts, fidelity ids and dataset ids, so that a
sampler can plan batches without decoding a record, and the records' structure
fingerprints (``fp_*``, 32 bytes a record), so that duplicates and train/test leakage are
found without decoding one either.

Writing happens in one transaction into ``<name>.tmp``, which is fsynced and renamed:
a shard file either exists complete or not at all. One transaction with keys appended in
order, zero-initialised pages and a map size derived from the data make the file's bytes
a function of its records alone.
"""

from __future__ import annotations

import collections
import hashlib
import os
import threading
from pathlib import Path
from typing import Iterable

import lmdb
import numpy as np

from common.atomic import replace_atomic
from common.errors import UserError
from data_pipeline.schema import pack, unpack

META_KEY = b"__meta__"


class ShardError(UserError, RuntimeError):
    """A shard that is missing, truncated, corrupt or does not match the manifest."""


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.lmdb"


def index_key(i: int) -> bytes:
    """LMDB key of record ``i`` within its shard."""
    return i.to_bytes(8, "big")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_shard(
    path: Path,
    records: Iterable[bytes],
    n_atoms: np.ndarray,
    fidelity: np.ndarray,
    dataset: np.ndarray,
    fidelities: list[str],
    datasets: list[str],
    total_bytes: int,
    extra: dict[str, np.ndarray] | None = None,
) -> dict:
    """Write encoded records to ``path`` atomically; return its size and checksum.

    ``n_atoms``, ``fidelity`` and ``dataset`` are per-record arrays (in record order);
    ``total_bytes`` is the sum of the record sizes, used to size the memory map;
    ``extra``: further per-record arrays for the metadata (the build's structure
    fingerprints, :mod:`data_pipeline.fingerprints`).
    """
    n = len(n_atoms)
    meta = pack(
        {"kind": "shard-meta", "n_records": n, "fidelities": fidelities, "datasets": datasets},
        [
            ("n_atoms", np.asarray(n_atoms, np.uint32)),
            ("fidelity", np.asarray(fidelity, np.uint16)),
            ("dataset", np.asarray(dataset, np.uint16)),
            *((k, np.asarray(v)) for k, v in (extra or {}).items()),
        ],
    )
    # large values go to overflow pages: allow a page of slack per record, plus the meta
    map_size = 2 * (total_bytes + len(meta)) + (n + 64) * 4096 + (1 << 20)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    env = lmdb.open(
        str(tmp), subdir=False, map_size=map_size, lock=False, readahead=False,
        meminit=True, sync=False, metasync=False, max_dbs=0,
    )
    count = 0
    try:
        with env.begin(write=True) as txn:
            for i, value in enumerate(records):
                txn.put(index_key(i), value, append=True)
                count += 1
            txn.put(META_KEY, meta, append=True)
        env.sync(True)
    finally:
        env.close()
    if count != n:
        tmp.unlink(missing_ok=True)
        raise ShardError(f"{path.name}: got {count} records for {n} metadata entries")
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    replace_atomic(tmp, path)
    return {"file": path.name, "records": n, "atoms": int(np.sum(n_atoms)), "bytes": size, "sha256": digest}


# One environment per shard file per process: py-lmdb refuses to open a file twice in a
# process, and readers of the same folder (train and eval streams) should share the map.
# At most MAX_OPEN_ENVS stay open (least recently used closed first): each holds a file
# descriptor and a memory map, and a folder of 5,000 shards must not reach the
# open-file limit (often 1,024). Reopening an evicted shard costs ~50 us.
MAX_OPEN_ENVS = int(os.environ.get("MLIP_MAX_OPEN_SHARDS", "128"))
_ENVS: "collections.OrderedDict[str, lmdb.Environment]" = collections.OrderedDict()
_ENVS_PID = os.getpid()
_ENVS_LOCK = threading.Lock()


def _shared_env(path: Path, key: str):
    """This process's read-only environment of ``path``, opened on first use (LRU-bounded).

    ``key`` is the file's real path (the caller resolves it once: ``realpath`` costs four
    ``lstat`` calls, a third of a small record's read). Not for readers that keep a
    transaction open across calls from several threads: an environment may be closed
    when ``MAX_OPEN_ENVS`` others were used since.
    """
    global _ENVS_PID
    with _ENVS_LOCK:
        if _ENVS_PID != os.getpid():
            # inherited through fork: drop the parent's handles in this child (read-only, no
            # lock file, so closing only unmaps the child's copy) and open afresh
            for env in _ENVS.values():
                env.close()
            _ENVS.clear()
            _ENVS_PID = os.getpid()
        env = _ENVS.get(key)
        if env is not None:
            _ENVS.move_to_end(key)
            return env
        if not path.is_file():
            raise ShardError(f"{path}: shard file is missing")
        while len(_ENVS) >= max(1, MAX_OPEN_ENVS):
            _ENVS.popitem(last=False)[1].close()
        try:
            env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=False,
                            meminit=False, max_readers=2048)
        except lmdb.Error as err:
            raise ShardError(f"{path}: not a readable LMDB shard ({err})") from None
        _ENVS[key] = env
        return env


class ShardReader:
    """Read-only access to one shard, opened lazily in each process.

    The LMDB environment is opened on first use and reopened after a fork (the pid is
    checked), so DataLoader workers and Ray actors never share a memory map; readers of
    the same file in one process share one environment. No lock file is used and
    readahead is off: random reads of small records are the access pattern, and shards
    are immutable once written.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._meta = None
        self._key: str | None = None  # real path, resolved in the process that reads

    def _open(self):
        if self._key is None:
            self._key = os.path.realpath(self.path)
        return _shared_env(self.path, self._key)

    def get(self, i: int) -> bytes:
        """Encoded bytes of record ``i`` of this shard."""
        try:
            with self._open().begin(buffers=False) as txn:
                value = txn.get(index_key(i))
        except lmdb.Error as err:
            raise ShardError(f"{self.path}: corrupt shard reading record {i} ({err})") from None
        if value is None:
            raise ShardError(f"{self.path}: record {i} is missing (truncated shard?)")
        return value

    def meta(self) -> tuple[dict, dict[str, np.ndarray]]:
        """The shard's metadata header and per-record arrays (cached)."""
        if self._meta is None:
            try:
                with self._open().begin() as txn:
                    raw = txn.get(META_KEY)
            except lmdb.Error as err:
                raise ShardError(f"{self.path}: corrupt shard ({err})") from None
            if raw is None:
                raise ShardError(f"{self.path}: no metadata entry (incomplete or foreign file)")
            self._meta = unpack(raw, where=f"{self.path}:{META_KEY.decode()}")
        return self._meta

    def close(self) -> None:
        """Close this file's environment in this process (it reopens on next use)."""
        with _ENVS_LOCK:
            env = _ENVS.pop(self._key or os.path.realpath(self.path), None)
            if env is not None and _ENVS_PID == os.getpid():
                env.close()

    def __getstate__(self):
        # the path only: a process that receives a reader (a Ray actor, a spawned worker)
        # reads the metadata itself if it needs it, instead of receiving every shard's
        # per-record arrays pickled along
        return {"path": self.path, "_meta": None, "_key": None}
