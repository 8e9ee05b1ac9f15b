"""Neighbor lists: the edges of a structure's graph, computed with vesin.

Convention
----------
An edge is a triple ``(i, j, S)``: centre (receiving) atom ``i``, neighbor ``j`` and an
integer image shift ``S``, with the edge vector

    r_ij = positions[j] - positions[i] + S @ cell        (rows of ``cell`` are a, b, c)

and ``|r_ij| < cutoff`` (strict, the comparison of ``ase.neighborlist.neighbor_list``).

* The list is full: ``(j, i, -S)`` is present whenever ``(i, j, S)`` is.
* Only the trivial self pair ``(i, i, 0)`` is excluded. Self-image pairs ``(i, i, S != 0)``
  appear when the cutoff exceeds a cell height, and two distinct atoms on the same spot
  give an edge of length 0 (as in ASE; validation rejects such structures upstream).
* ``S`` is zero along non-periodic directions. Positions need not be wrapped into the
  cell: ``S`` refers to the positions as given, so the formula above always holds.
* Edges are sorted by ``i`` (``edge_index[0]`` is sorted, ready for segment reductions);
  within one centre the order is vesin's, deterministic for a given vesin version. A
  full ``(i, j, S)`` sort would make it version-independent at ~15% of a batch's cost.

Pairs whose distance equals the cutoff to within rounding (~1e-15 relative) may be
classified differently from ASE: vesin compares squared distances.

vesin 0.6.2 handles per-direction periodicity, a zero cell without periodicity, zero cell
rows along open directions, unwrapped positions and cutoffs larger than the cell itself
(vesin < 0.5.8 missed pairs with partial periodicity); ``tests/test_graph.py`` checks
each case against ASE.
"""

from __future__ import annotations

import threading

import numpy as np

# same thresholds as data_pipeline.build.validate, so a record that passed validation passes here
_MIN_LENGTH = 1e-6  # Angstrom: a periodic cell vector shorter than this counts as zero
_MIN_GRAM = 1e-12  # det(Gram) / prod(|v|^2) below this: periodic vectors are dependent
_MAX_CACHED = 8  # distinct cutoffs kept per thread; more means a caller varies it freely

# One vesin.NeighborList per (thread, cutoff): it keeps its output buffers between calls
# (no reallocation), but those buffers are shared state and ctypes releases the GIL in the
# C call, so two threads must never use the same object. After fork() the child gets a
# copy of the buffers, and vesin tears down / rebuilds its thread pool around fork
# (pthread_atfork), so inheriting the cache in DataLoader workers is safe.
_local = threading.local()


def neighbor_list(positions, cell, pbc, cutoff: float,
                  check: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All edges ``(i, j, S)`` with ``|positions[j] - positions[i] + S @ cell| < cutoff``.

    Args:
        positions: float ``[n_atoms, 3]`` Cartesian positions, Angstrom (wrapped or not).
        cell: float ``[3, 3]``, rows are lattice vectors. Rows along non-periodic
            directions are ignored (may be zero; a molecule may have a zero cell).
        pbc: bool ``[3]`` (or one bool for all three), periodic directions; mixed allowed.
        cutoff: radius in Angstrom, > 0.
        check: validate shapes, finiteness and the periodic cell first. Data loaders pass
            False for records from our shards, which the build validated (saves ~50 us
            per structure, ~6% of building a batch).

    Returns:
        ``(edge_index, cell_shifts)``: ``edge_index`` int64 ``[2, n_edges]`` with rows
        (centre ``i``, neighbor ``j``), ``cell_shifts`` int32 ``[n_edges, 3]`` (``S``),
        sorted by ``i``; see the module docstring for the full convention.

    Raises:
        ValueError: wrong shapes, non-finite values, ``cutoff <= 0``, or periodic cell
            vectors that are zero or linearly dependent.
    """
    if check:
        positions, cell, pbc, cutoff = _validated(positions, cell, pbc, cutoff)
    if len(positions) == 0:
        return np.zeros((2, 0), np.int64), np.zeros((0, 3), np.int32)
    # open directions' rows never enter r_ij (S is 0 there): zero them so vesin sees one
    # canonical box whatever the caller stored (a vacuum length, an in-plane vector...)
    box = np.where(pbc[:, None], cell, 0.0)
    # vesin sorts by centre i (sorted=True costs ~5% of its call; a full (i, j, S) sort
    # of our own cost ~15% of building a batch). copy=False: views into the calculator's
    # buffers, consumed by the conversions below.
    i, j, shifts = _calculator(cutoff).compute(positions, box, pbc, "ijS", copy=False)
    edge_index = np.empty((2, len(i)), np.int64)
    edge_index[0], edge_index[1] = i, j  # vesin gives uint64; uint64 + int64 is float64 in numpy
    return edge_index, shifts.astype(np.int32)


def _validated(positions, cell, pbc, cutoff):
    """Inputs as float64 / bool arrays and a float, or a ValueError naming the problem."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (n_atoms, 3), got {positions.shape}")
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3):
        raise ValueError(f"cell must have shape (3, 3), got {cell.shape}")
    pbc = np.asarray(pbc, dtype=bool)
    if pbc.ndim == 0:
        pbc = np.repeat(pbc, 3)
    if pbc.shape != (3,):
        raise ValueError(f"pbc must have shape (3,) or be one bool, got {pbc.shape}")
    cutoff = float(cutoff)
    if not cutoff > 0 or not np.isfinite(cutoff):
        raise ValueError(f"cutoff must be a finite number > 0, got {cutoff}")
    if not np.isfinite(positions).all():
        raise ValueError("positions contain NaN or inf")
    if pbc.any():
        _check_periodic_vectors(cell, pbc)
    return positions, cell, pbc, cutoff


def _check_periodic_vectors(cell: np.ndarray, pbc: np.ndarray) -> None:
    """Periodic cell vectors must be finite, non-zero and linearly independent."""
    vectors = cell[pbc]
    if not np.isfinite(vectors).all():
        raise ValueError(f"periodic cell vectors contain NaN or inf: {vectors.tolist()}")
    lengths = np.linalg.norm(vectors, axis=1)
    for axis, length in zip(np.flatnonzero(pbc), lengths):
        if length < _MIN_LENGTH:
            raise ValueError(f"cell vector {axis} is zero (length {length:.3g} A) but "
                             f"pbc[{axis}] is True")
    # normalised Gram determinant = squared volume of the unit-length parallelotope:
    # 1 for orthogonal vectors, 0 for parallel (slab) or coplanar (bulk) ones
    gram = float(np.linalg.det(vectors @ vectors.T)) / float(np.prod(lengths)) ** 2
    if gram < _MIN_GRAM:
        raise ValueError(f"periodic cell vectors {vectors.tolist()} are linearly dependent "
                         f"(pbc={pbc.tolist()}): the cell is degenerate")


def _calculator(cutoff: float):
    """This thread's cached ``vesin.NeighborList`` for ``cutoff``."""
    cache = getattr(_local, "calculators", None)
    if cache is None or (len(cache) >= _MAX_CACHED and cutoff not in cache):
        cache = _local.calculators = {}
    if cutoff not in cache:
        # lazy: importing vesin imports torch, which other pipeline users should not pay
        from vesin import NeighborList  # noqa: PLC0415

        # n_threads=1: loader workers are already one process per core; vesin's threads
        # (one per cell of its grid) would compete with the other workers for them.
        # sorted=True: edges come grouped by centre atom, ready for segment reductions
        cache[cutoff] = NeighborList(cutoff=cutoff, full_list=True, sorted=True, n_threads=1)
    return cache[cutoff]
