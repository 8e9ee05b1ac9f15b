"""The conservative validation screen: which records surely pass every check.

The full checks (:func:`data_pipeline.build.validate.check_fully`) make ~50 small numpy
calls per record, each costing microseconds: they were half of a build's CPU. Most
records are plainly valid, and :func:`clearly_valid_many` proves that for a whole batch
with a fixed number of vectorised calls. It only ever says "surely valid" or "not sure":
the full checks alone decide a rejection and its reason, so a record it does not clear
costs the same as before and a record it clears would have passed them (tests screen
random records at every bound).

The pair pass also gives each screened record's nearest-neighbour distance, which the
build's coverage statistics keep (:func:`screen_many`), so no second pass measures it.
"""

from __future__ import annotations

import functools
import itertools
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
    """Per record, True only when it surely passes every one of the full checks
    (:func:`screen_many` without the distances)."""
    return screen_many(recs, limits)[0]


def screen_many(recs: list[AtomsRecord], limits: ValidationConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per record, True only when it surely passes every one of the full checks, and its
    nearest-neighbour distance (A, periodic images included) where the pair pass proves
    it exact, else NaN.

    A fixed number of numpy calls for the whole batch. It passes a record only with an
    energy, at most 128 atoms, all-periodic or non-periodic, finite values, and every
    bound met with a margin; anything else (near a bound, a slab, a large structure) gets
    False and goes to the full checks. With ``min_distance`` below half of every plane spacing of
    the cell, an atom's periodic images other than the nearest one lie at least half a
    spacing away, so the minimum-image distance of each pair (all pairs) is the whole
    distance check. The nearest-neighbour distance also needs the images next to those
    (:func:`_nearest`); it is NaN for a free atom and where they do not settle it.
    """
    out = np.zeros(len(recs), dtype=bool)
    nearest = np.full(len(recs), np.nan)
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
        return out, nearest
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
        inverse, heights, sound = _inverses(cells)
        clear = sound & (limits.min_distance < 0.5 * heights * (1 - _MARGIN)).all(axis=1)
        ok &= clear | ~pbc
        pairs = _pair_differences(positions, size, starts, pbc, cells, inverse)
        min_sq = pairs[3]  # inf for one atom
        if limits.min_distance > 0:
            cutoff = limits.min_distance * (1 + _MARGIN)
            ok &= min_sq > cutoff * cutoff
        nearest[keep] = _nearest(pairs, pbc, sound, cells, heights)
    out[keep] = ok
    return out, nearest


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


def _inverses(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverses of cells ``[k, 3, 3]`` (rows: lattice vectors), their plane spacings
    ``[k, 3]``, and per cell whether it is far from degenerate (with a margin)."""
    a, b, c = cells[:, 0], cells[:, 1], cells[:, 2]
    crosses = (np.cross(b, c), np.cross(c, a), np.cross(a, b))  # the inverse's columns, times det
    det = np.einsum("ki,ki->k", a, crosses[0])
    lengths = np.sqrt(np.einsum("kij,kij->ki", cells, cells))
    scale = lengths.prod(axis=1)
    sound = (lengths.min(axis=1) >= 1e-5) & (det * det > 1e-9 * scale * scale)
    # plane spacing |det| / |cross|
    heights = np.stack([np.abs(det) / np.sqrt(np.einsum("ki,ki->k", x, x)) for x in crosses], axis=1)
    return np.stack(crosses, axis=2) / det[:, None, None], heights, sound


def _pair_differences(positions, size, starts, pbc, cells, inverse) -> tuple:
    """Every pair of every record (``size`` atoms from row ``starts`` of the batch's
    ``positions``): its record ``[P]``, its difference reduced to the minimum image
    (fractional; Cartesian for clusters) ``[P, 3]`` and squared distance ``[P]``; and per
    record the smallest of those ``[k]`` (inf for a single atom)."""
    out = np.full(len(size), np.inf)
    multi = size > 1
    if not multi.any():
        return np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0), out
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
    out[multi] = np.minimum.reduceat(sq, pair_starts)
    return owner, d, sq, out


_SHIFTS = np.array([n for n in itertools.product((-1, 0, 1), repeat=3) if any(n)], float)  # [26, 3]


def _nearest(pairs: tuple, pbc: np.ndarray, sound: np.ndarray, cells: np.ndarray,
             heights: np.ndarray) -> np.ndarray:
    """Per record the exact nearest-neighbour distance, or NaN where it is not settled.

    A cluster's is its smallest pair distance. In a sound cell (``pbc``: all-periodic;
    ``sound``: far from degenerate), an image of a pair other than its minimum image,
    shifted by ``n`` cells, lies at least ``(1 - |f_k|) h_k`` away for each axis k with
    ``n_k != 0`` (``f``: the pair's reduced fractional difference, ``h``: plane spacings).
    So only cells less than twice as high as the smallest distance so far need more
    images, only their pairs with such a bound below it, and only the images across
    those axes (mostly one thin axis: 2 images; all 26 next ones for pairs with two or
    three); each atom's own images (the lattice vectors) count too. Every image farther
    out lies at least 1.5 ``h_min`` away, so the result is exact below that.
    """
    owner, d, sq, min_sq = pairs
    periodic = pbc & sound
    gram = np.einsum("kij,klj->kil", cells, cells)  # [k, 3, 3] metric: lattice vector dot products
    lattice_sq = np.einsum("si,kij,sj->ks", _SHIFTS, gram, _SHIFTS)  # [k, 26] |n . cell|^2
    best = np.where(periodic, np.minimum(min_sq, lattice_sq.min(axis=1)), min_sq)
    h_min = heights.min(axis=1)
    unsure = np.flatnonzero((periodic & (best > 0.25 * h_min * h_min)).take(owner))  # pairs of thin cells
    if len(unsure):  # take: 3x faster than [i]
        o, f = owner.take(unsure), d.take(unsure, axis=0)
        # an image across axis k can be nearer only when |f_k| > 1 - best / h_k
        a = np.abs(f) > (1 - np.sqrt(best)[:, None] / heights).take(o, axis=0)  # [p, 3]
        some = np.flatnonzero(a[:, 0] | a[:, 1] | a[:, 2])
        o, f, a, s = o.take(some), f.take(some, axis=0), a.take(some, axis=0), sq.take(unsure.take(some))
        g = gram.take(o, axis=0)
        y = np.einsum("pi,pij->pj", f, g)  # |x + n.cell|^2 = |x|^2 + 2 y.n + |n.cell|^2
        one = np.where(a, s[:, None] + np.einsum("pii->pi", g) - 2 * np.abs(y), np.inf)  # [p, 3] at +-a_k
        _lower(best, o, np.minimum(np.minimum(one[:, 0], one[:, 1]), one[:, 2]))
        more = np.flatnonzero((a[:, 0] & a[:, 1]) | (a[:, 0] & a[:, 2]) | (a[:, 1] & a[:, 2]))
        if len(more):
            om = o.take(more)
            shifted = s.take(more)[:, None] + 2 * (y.take(more, axis=0) @ _SHIFTS.T) + lattice_sq.take(om, axis=0)
            _lower(best, om, shifted.min(axis=1))
    limit = 1.5 * h_min * (1 - _MARGIN)
    exact = np.isfinite(best) & np.where(pbc, sound & (best < limit * limit), True)
    return np.where(exact, np.sqrt(best), np.nan)


def _lower(best: np.ndarray, owner: np.ndarray, values: np.ndarray) -> None:
    """``best[r] = min(best[r], values of r)`` for ``owner`` sorted (np.minimum.at costs 4x more)."""
    if not len(owner):
        return
    first = np.flatnonzero(np.concatenate([[True], owner[1:] != owner[:-1]]))
    records = owner.take(first)
    best[records] = np.minimum(best.take(records), np.minimum.reduceat(values, first))
