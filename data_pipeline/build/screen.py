"""The conservative validation screen: which records surely pass every check.

The full checks (:func:`data_pipeline.build.validate.check_fully`) make ~50 small numpy
calls per record, each costing microseconds: they were half of a build's CPU. Most
records are plainly valid, and :func:`clearly_valid_many` proves that for a whole batch
with a fixed number of vectorised calls. It only ever says "surely valid" or "not sure":
the full checks alone decide a rejection and its reason, so a record it does not clear
costs the same as before and a record it clears would have passed them (tests screen
random records at every bound).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from data_pipeline.build.recipe import ValidationConfig
from data_pipeline.schema import AtomsRecord, shape_of

_SCREEN_MAX_ATOMS = 128  # the pair screen holds n (n - 1) / 2 displacements
_MARGIN = 1e-6  # relative: the screen passes only values this far inside a bound


@functools.lru_cache(maxsize=_SCREEN_MAX_ATOMS + 1)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(n, 1)


def clearly_valid(rec: AtomsRecord, limits: ValidationConfig) -> bool:
    """True only when ``rec`` surely passes every check of
    :func:`data_pipeline.build.validate.check_fully`."""
    return bool(clearly_valid_many([rec], limits)[0])


def clearly_valid_many(recs: list[AtomsRecord], limits: ValidationConfig) -> np.ndarray:
    """Per record, True only when it surely passes every one of the full checks.

    A fixed number of numpy calls for the whole batch. It passes a record only with an
    energy, at most 128 atoms, all-periodic or non-periodic, finite values, and every
    bound met with a margin; anything else (near a bound, a slab, a large structure) gets
    False and goes to the full checks. With ``min_distance`` below half of every plane spacing of
    the cell, an atom's periodic images other than the nearest one lie at least half a
    spacing away, so the minimum-image distance of each pair (all pairs) is the whole
    distance check.
    """
    out = np.zeros(len(recs), dtype=bool)
    n_max = min(limits.max_atoms, _SCREEN_MAX_ATOMS)
    bound = limits.max_abs_energy_per_atom
    keep, sizes, periodic = [], [], []
    for k, rec in enumerate(recs):  # per record only what needs no numpy call
        n, energy = len(rec.numbers), rec.energy
        if not 1 <= n <= n_max or energy is None or not math.isfinite(energy):
            continue
        if bound is not None and abs(energy) / n > bound:
            continue
        pbc = rec.pbc.tolist()
        if pbc not in ([True] * 3, [False] * 3) or not _shapes_plain(rec, n):
            continue
        keep.append(k)
        sizes.append(n)
        periodic.append(pbc[0])
    if not keep:
        return out
    cand = [recs[k] for k in keep]
    size = np.array(sizes)
    starts = np.concatenate([[0], np.cumsum(size)[:-1]])
    with np.errstate(all="ignore"):  # inf, NaN and degenerate cells give False below
        positions = np.concatenate([rec.positions for rec in cand], dtype=np.float64)
        ok = _values_clearly_valid(cand, positions, starts, limits)
        if limits.max_abs_coordinate is not None:
            far = np.maximum.reduceat(np.abs(positions).max(axis=1), starts)
            ok &= far < limits.max_abs_coordinate * (1 - _MARGIN)
        cells = np.array([rec.cell for rec in cand], dtype=np.float64)
        ok &= np.isfinite(cells).all(axis=(1, 2))
        pbc = np.array(periodic)
        inverse, clear = _clear_inverses(cells, limits.min_distance)
        ok &= clear | ~pbc
        if limits.min_distance > 0:
            ok &= _pairs_clear(positions, size, starts, pbc, cells, inverse, limits.min_distance)
    out[keep] = ok
    return out


def _shapes_plain(rec: AtomsRecord, n: int) -> bool:
    """The array shapes :func:`to_record` gives (the screen's stacking relies on them)."""
    return (shape_of(rec.positions) == (n, 3) and shape_of(rec.cell) == (3, 3)
            and (rec.forces is None or shape_of(rec.forces) == (n, 3))
            and (rec.stress is None or np.size(rec.stress) == 6))


def _values_clearly_valid(cand: list[AtomsRecord], positions: np.ndarray, starts: np.ndarray,
                          limits: ValidationConfig) -> np.ndarray:
    """Atomic numbers in 1..118, positions finite, forces and stress finite and within
    their bounds (margin on the force norm), per record."""
    numbers = np.concatenate([np.asarray(rec.numbers) for rec in cand])
    ok = (np.minimum.reduceat(numbers, starts) >= 1) & (np.maximum.reduceat(numbers, starts) <= 118)
    ok &= np.add.reduceat(~np.isfinite(positions).all(axis=1), starts) == 0
    has = np.array([rec.forces is not None for rec in cand])
    if has.any():
        forces = np.concatenate([rec.forces if rec.forces is not None else np.zeros((len(rec.numbers), 3))
                                 for rec in cand], dtype=np.float64)  # one dtype, whatever the batch
        sq = np.maximum.reduceat(np.add.reduce(forces * forces, axis=1), starts)  # NaN stays NaN
        fmax = math.inf if limits.max_force is None else limits.max_force * (1 - _MARGIN)
        ok &= ~has | (np.isfinite(sq) & (sq < fmax * fmax))
    has = np.array([rec.stress is not None for rec in cand])
    if has.any():
        stress = np.array([np.ravel(rec.stress) if rec.stress is not None else np.zeros(6)
                           for rec in cand], dtype=np.float64)
        good = np.isfinite(stress).all(axis=1)
        if limits.max_abs_stress is not None:
            good &= np.abs(stress).max(axis=1) <= limits.max_abs_stress
        ok &= ~has | good
    return ok


def _clear_inverses(cells: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverses of cells ``[k, 3, 3]`` (rows: lattice vectors), and per cell whether it is
    far from degenerate and ``cutoff`` is below half of each plane spacing (with margins)."""
    a, b, c = cells[:, 0], cells[:, 1], cells[:, 2]
    crosses = (np.cross(b, c), np.cross(c, a), np.cross(a, b))  # the inverse's columns, times det
    det = np.einsum("ki,ki->k", a, crosses[0])
    lengths = np.sqrt(np.einsum("kij,kij->ki", cells, cells))
    scale = lengths.prod(axis=1)
    clear = (lengths.min(axis=1) >= 1e-5) & (det * det > 1e-9 * scale * scale)
    for cross in crosses:  # plane spacing |det| / |cross|
        clear &= cutoff < 0.5 * (np.abs(det) / np.sqrt(np.einsum("ki,ki->k", cross, cross))) * (1 - _MARGIN)
    return np.stack(crosses, axis=2) / det[:, None, None], clear


def _pairs_clear(positions, size, starts, pbc, cells, inverse, min_distance: float) -> np.ndarray:
    """Per record (``size`` atoms from row ``starts`` of the batch's ``positions``): every
    pair's (minimum-image) distance above ``min_distance``, with margin."""
    ok = np.ones(len(size), dtype=bool)
    multi = size > 1
    if not multi.any():
        return ok
    n_pairs = size * (size - 1) // 2
    pairs = [_pairs(n) for n in size[multi].tolist()]
    first = np.concatenate([i for i, _ in pairs])
    second = np.concatenate([j for _, j in pairs])
    owner = np.repeat(np.flatnonzero(multi), n_pairs[multi])
    first += starts[owner]
    second += starts[owner]
    eye = np.eye(3)
    to_frac = np.where(pbc[:, None, None], inverse, eye)  # clusters stay Cartesian
    to_cart = np.where(pbc[:, None, None], cells, eye)
    atom_owner = np.repeat(np.arange(len(size)), size)
    frac = np.einsum("ni,nij->nj", positions, to_frac[atom_owner])
    d = frac.take(first, axis=0) - frac.take(second, axis=0)  # take: 3x faster than [i]
    d -= np.rint(d) * pbc[owner][:, None]  # the nearest image of each pair, periodic ones
    x = np.einsum("pi,pij->pj", d, to_cart[owner])
    sq = np.einsum("pj,pj->p", x, x)
    pair_starts = np.concatenate([[0], np.cumsum(n_pairs[multi])[:-1]])
    cutoff = min_distance * (1 + _MARGIN)
    ok[multi] = np.minimum.reduceat(sq, pair_starts) > cutoff * cutoff
    return ok
