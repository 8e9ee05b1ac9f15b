"""Per-record edge counts at a cutoff, computed once and cached, for the sampler's edge budget.

An atom budget alone lets a batch of dense crystals carry several times the edges of a
batch of molecules, and edges are what message passing pays for. The exact count of a
record's edges needs its neighbor list, so counting is a pass over the data (about the
cost of one epoch of graph building, spread over worker processes) whose result is
cached next to the shards as ``edges-cutoff<r>.npz`` (or under ``~/.cache/mlip-pretrain``
when the folder is read-only), keyed by the manifest's content hash.

On many ranks, let rank 0 call :func:`edge_counts` first and the others after a barrier:
they then read the cache.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np

from data_pipeline.atomic import atomic_output
from data_pipeline.collate import BatchBuilder
from data_pipeline.dataset import ShardedDataset
from data_pipeline.progress import Progress

CHUNK = 2000


def _count_chunk(args: tuple[BatchBuilder, int, int]) -> np.ndarray:
    builder, lo, hi = args  # the loaders' own graph builder: counts match their batches
    return np.array([builder.graph(builder.dataset[i])[0].shape[1] for i in range(lo, hi)],
                    dtype=np.int64)


def _cache_paths(ds: ShardedDataset, cutoff: float) -> list[Path]:
    name = f"edges-cutoff{cutoff:g}.npz"
    home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlip-pretrain"
    return [ds.folder / name, home / ds.manifest["content_hash"] / name]


def _load(path: Path, content_hash: str, n: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["content_hash"]) == content_hash and len(z["counts"]) == n:
                return z["counts"].astype(np.int64)
    except (OSError, KeyError, ValueError):
        pass
    return None


def edge_counts(folder: str | Path | ShardedDataset, cutoff: float, workers: int | None = None,
                progress: bool = True) -> np.ndarray:
    """``int64 [n_records]`` edges of every record at ``cutoff`` (cached after the first call)."""
    ds = folder if isinstance(folder, ShardedDataset) else ShardedDataset(folder)
    content_hash = ds.manifest["content_hash"]
    for path in _cache_paths(ds, cutoff):
        if (counts := _load(path, content_hash, len(ds))) is not None:
            return counts
    builder = BatchBuilder(ds, cutoff)
    chunks = [(builder, lo, min(lo + CHUNK, len(ds))) for lo in range(0, len(ds), CHUNK)]
    workers = workers or os.cpu_count() or 1
    parts = []
    with Progress(len(ds), f"edge counts (cutoff {cutoff:g} A)", unit="structures",
                  enabled=progress) as bar:
        if workers == 1 or len(chunks) == 1:
            results = map(_count_chunk, chunks)
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            results = pool.imap(_count_chunk, chunks)
        for part in results:
            parts.append(part)
            bar.update(len(part))
        if workers > 1 and len(chunks) > 1:
            pool.close()
    counts = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    _save(counts, content_hash, _cache_paths(ds, cutoff))
    return counts


def _save(counts: np.ndarray, content_hash: str, paths: list[Path]) -> None:
    """Write the cache to the first location that accepts it (atomically)."""
    for path in paths:
        try:
            with atomic_output(path) as f:
                np.savez(f, counts=counts, content_hash=np.array(content_hash))
            return
        except OSError:
            continue
