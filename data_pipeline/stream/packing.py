"""Packing an ordered list of structures into batches: the sampler's "pack" and "deal" steps.

:func:`pack` cuts the list, in order, into batches within an atom budget (and an edge
budget); :func:`split_to_multiple` then splits tail batches until the batch count divides
by the world size, so every rank runs the same number of steps. Pure functions of
arrays (no records, no ranks), used by :class:`~data_pipeline.stream.sampler.AtomBudgetSampler`.
"""

from __future__ import annotations

import numpy as np


def pack(sizes: np.ndarray, budget: int, edges: np.ndarray | None = None,
         edge_budget: int | None = None) -> np.ndarray:
    """Batch boundaries ``[0, b1, ..., n]`` cutting ``sizes`` in order within the budgets.

    A run is closed before the element that would overflow a budget; an element alone
    above a budget forms its own batch. One ``searchsorted`` per batch, so planning 1e8
    structures takes seconds, not minutes.
    """
    n = len(sizes)
    cum_a = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    cum_e = None if edges is None else np.concatenate([[0], np.cumsum(edges, dtype=np.int64)])
    bounds = [0]
    start = 0
    while start < n:
        end = int(np.searchsorted(cum_a, cum_a[start] + budget, side="right")) - 1
        if cum_e is not None:
            end = min(end, int(np.searchsorted(cum_e, cum_e[start] + edge_budget, side="right")) - 1)
        end = min(max(end, start + 1), n)
        bounds.append(end)
        start = end
    return np.asarray(bounds, dtype=np.int64)


def split_to_multiple(bounds: np.ndarray, world: int) -> np.ndarray:
    """Split tail batches in two until the batch count divides by ``world``.

    Each split halves the batch with most structures among the last ``2 * world``
    batches (the whole plan if those are all single structures), so only the end of the
    epoch changes. Returns fewer-than-needed splits when no batch holds two structures.
    The splits only touch the last ``2 * world`` batches (the window shrinks from the
    left as batches are inserted), so the cost is O(world^2), independent of the
    number of batches; only the all-singles fallback looks at the whole plan.
    """
    b = np.asarray(bounds, dtype=np.int64)
    if (len(b) - 1) % world == 0:
        return b
    keep = max(0, len(b) - 1 - 2 * world)  # batches before the window: never split here
    tail = b[keep:].tolist()
    while (keep + len(tail) - 1) % world:
        counts = np.diff(tail)
        window = counts[max(0, len(counts) - 2 * world):][::-1]  # reversed: ties go to the latest
        k = len(counts) - 1 - int(np.argmax(window))
        if counts[k] < 2:
            return _split_whole_plan(np.concatenate([b[:keep], tail]), world)
        tail.insert(k + 1, (tail[k] + tail[k + 1]) // 2)
    return np.concatenate([b[:keep], np.asarray(tail, dtype=np.int64)])


def _split_whole_plan(bounds: np.ndarray, world: int) -> np.ndarray:
    """split_to_multiple's fallback when the window holds only single structures."""
    b = list(bounds)
    while (len(b) - 1) % world:
        counts = np.diff(b)
        k = len(counts) - 1 - int(np.argmax(counts[::-1]))
        if counts[k] < 2:
            break
        b.insert(k + 1, (b[k] + b[k + 1]) // 2)
    return np.asarray(b, dtype=np.int64)
