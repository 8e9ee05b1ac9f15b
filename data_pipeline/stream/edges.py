"""Per-record edge counts at a cutoff, computed once and cached, for the sampler's edge budget.

An atom budget alone lets a batch of dense crystals carry several times the edges of a
batch of molecules, and edges are what message passing pays for. The exact count of a
record's edges needs its neighbor list, so counting is a pass over the data (about the
cost of one epoch of graph building, spread over worker processes) whose result is
cached next to the shards as ``edges-cutoff<r>.npz`` (or under ``~/.cache/mlip-pretrain``
when the folder is read-only), keyed by the manifest's content hash.

On many ranks every rank calls :func:`edge_counts` with its ``rank`` and ``world_size``
(a collective over the ``torch.distributed`` group when the cache is missing): each
counts every ``world_size``-th chunk, the parts are all-gathered, and rank 0 writes the
cache. So the pass takes ``1 / world_size`` of the time, and no rank idles while another
counts alone.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np

from common.atomic import atomic_output
from common.progress import Progress
from data_pipeline.stream.collate import BatchBuilder
from data_pipeline.stream.dataset import ShardedDataset

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
                progress: bool = True, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """``int64 [n_records]`` edges of every record at ``cutoff`` (cached after the first call).

    With ``world_size > 1`` every rank must call this (torch.distributed initialised);
    each counts its share and all receive the whole array.
    """
    ds = folder if isinstance(folder, ShardedDataset) else ShardedDataset(folder)
    content_hash = ds.manifest["content_hash"]
    for path in _cache_paths(ds, cutoff):
        if (counts := _load(path, content_hash, len(ds))) is not None:
            return counts
    builder = BatchBuilder(ds, cutoff)
    chunks = [(builder, lo, min(lo + CHUNK, len(ds))) for lo in range(0, len(ds), CHUNK)]
    mine = _count(chunks[rank::world_size], workers, cutoff, progress)
    if world_size > 1:
        import torch.distributed as dist  # noqa: PLC0415

        if not dist.is_initialized():
            raise RuntimeError(f"edge_counts over {world_size} ranks needs torch.distributed")
        parts: list = [None] * world_size
        dist.all_gather_object(parts, mine)
        mine = [parts[k % world_size][k // world_size] for k in range(len(chunks))]  # chunk order
    counts = np.concatenate(mine) if mine else np.zeros(0, np.int64)
    if rank == 0:
        _save(counts, content_hash, _cache_paths(ds, cutoff))
    return counts


def _count(chunks: list, workers: int | None, cutoff: float, progress: bool) -> list[np.ndarray]:
    """Edge counts of ``chunks``, in worker processes (one list entry per chunk)."""
    # ranks sharing a node share its cores
    workers = workers or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    parts = []
    with Progress(sum(hi - lo for _, lo, hi in chunks), f"edge counts (cutoff {cutoff:g} A)",
                  unit="structures", enabled=progress) as bar:
        if workers == 1 or len(chunks) <= 1:
            results, pool = map(_count_chunk, chunks), None
        else:
            pool = multiprocessing.get_context("spawn").Pool(workers)
            results = pool.imap(_count_chunk, chunks)
        for part in results:
            parts.append(part)
            bar.update(len(part))
        if pool is not None:
            pool.close()
    return parts


def _save(counts: np.ndarray, content_hash: str, paths: list[Path]) -> None:
    """Write the cache to the first location that accepts it (atomically)."""
    for path in paths:
        try:
            with atomic_output(path) as f:
                np.savez(f, counts=counts, content_hash=np.array(content_hash))
            return
        except OSError:
            continue
