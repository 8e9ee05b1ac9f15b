"""Structure fingerprints: 64-bit keys that say when two records hold the same structure.

Four keys per record, computed in the build's conversion tasks for a whole batch at once
(a fixed number of numpy calls, about 10 us a record) and stored in each shard's metadata:

- **exact** (:data:`EXACT_TOLERANCE` = 1e-8 A): the same atoms at the same positions in
  the same cell, with the same charge and spin, up to atom order, a translation and
  periodic wrapping. Positions are taken relative to an anchor atom (below), as
  fractional coordinates along periodic directions (reduced modulo 1) and Cartesian ones
  along open directions, and rounded to the tolerance; the cell's periodic vectors are
  rounded too. A 1e-7 A displacement changes the key; a rotated copy is a different
  exact structure (and a near duplicate). Rounding means two copies whose coordinates
  straddle a rounding boundary after floating-point noise (about 1e-15 A, so about one
  coordinate in 1e7) get different keys: they remain near duplicates.
- **near_a**, **near_b**: the same composition, charge and spin, and geometric invariants
  equal to :data:`NEAR_TOLERANCE` (1e-3 A, or 1e-3 for dimensionless ones): the periodic
  vectors' lengths and angles, the magnitudes of the structure factor at the cell's
  lowest reciprocal vectors, and the spread of the atoms along open directions (the
  eigenvalues of the gyration tensor, plain and weighted by atomic number, for a
  molecule). All are invariant to atom order, translation, wrapping and rotation. The
  invariants are rounded on two grids offset by half a step, so two structures closer
  than half a step in every invariant share at least one of the two keys: a structure
  is a near duplicate of another when ``near_a`` or ``near_b`` match.
- **formula**: the composition alone (element counts); molecules with the same formula
  are the same molecule or its isomers.

The anchor that fixes the translation is found without a neighbour list: among the atoms
of the rarest element (smallest atomic number on a tie), the one whose position best
matches the structure's mean phase (periodic directions: ``Re(S_a exp(-2 pi i f_a))``,
with ``S_a`` the structure factor at the first reciprocal vector) and then lies nearest
the centre along open directions. Candidates within a small window of the best are all
tried and the smallest key wins, so the key does not depend on floating-point noise in
that choice; a perfect crystal's equivalent atoms all tie and give the same key.

Keys are sums of mixed per-atom hashes (splitmix64), so atom order never matters and
collisions between different structures are random 64-bit events (about 3e-4 for one
pair among 1e8 records).
"""

from __future__ import annotations

import numpy as np

EXACT_TOLERANCE = 1e-8  # A: positions and cell vectors rounded to this in the exact key
MATCH_TOLERANCE = 5e-8  # A: copies closer than this (per atom) are the same structure
NEAR_TOLERANCE = 1e-3  # A (lengths), or dimensionless (cosines, structure factor magnitudes)
KEYS = ("fp_exact", "fp_near_a", "fp_near_b", "fp_formula")
_WINDOW = 1e-6  # anchor scores this close to the best are candidates too
_N_Z = 119
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
# the reciprocal vectors whose structure factor magnitudes enter the near key
_KVECS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]], dtype=np.float64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 values (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


_SALTS = _mix(np.arange(1, 65, dtype=np.uint64)) | np.uint64(1)  # one odd multiplier per column


def _fold(*columns: np.ndarray) -> np.ndarray:
    """One uint64 hash per row of integer columns: the columns (cast to uint64, wrapping)
    times a random odd multiplier each, summed and mixed. Two different rows of small
    integers collide only if their differences cancel modulo 2^64 against random 64-bit
    multipliers, which no real pair of structures does."""
    h = np.zeros(len(columns[0]), np.uint64)
    for c, salt in zip(columns, _SALTS):
        h += np.asarray(c).astype(np.int64).view(np.uint64) * salt
    return _mix(h)


class _Batch:
    """The records of one batch laid out flat: atoms in record order."""

    def __init__(self, numbers, positions, cells, pbc, charges, spins):
        self.sizes = np.array([len(z) for z in numbers], np.int64)
        self.k = len(self.sizes)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.owner = np.repeat(np.arange(self.k), self.sizes)
        self.z = np.concatenate(numbers).astype(np.int64) if self.k else np.zeros(0, np.int64)
        self.pos = (np.concatenate(positions).astype(np.float64).reshape(-1, 3)
                    if self.k else np.zeros((0, 3)))
        self.pbc = np.asarray(pbc, bool).reshape(self.k, 3)
        self.cells = np.asarray(cells, np.float64).reshape(self.k, 3, 3)
        self.charge = np.asarray(charges, np.int64)
        self.spin = np.asarray(spins, np.int64)
        self.frame = _frames(self.cells, self.pbc)  # rows: periodic vectors, unit vectors elsewhere
        with np.errstate(all="ignore"):
            inverse = np.linalg.inv(self.frame)
        self.frac = np.einsum("ni,nij->nj", self.pos, inverse[self.owner])
        self.periodic = self.pbc[self.owner]  # [n, 3] per atom
        self.frac = np.where(self.periodic, self.frac - np.floor(self.frac), self.frac)
        # exp(2 pi i f) along periodic directions, 1 along open ones (molecules: no exp)
        self.phase = np.ones(self.frac.shape, np.complex128)
        rows = self.pbc.any(axis=1)[self.owner]
        self.phase[rows] = np.where(self.periodic[rows], np.exp(2j * np.pi * self.frac[rows]), 1.0)
        self.lengths = np.linalg.norm(self.frame, axis=2)  # [k, 3]: 1 along open directions
        self.steps = np.maximum(np.rint(self.lengths / EXACT_TOLERANCE), 1.0)  # rounding steps per period

    def reduce(self, values: np.ndarray, ufunc=np.add) -> np.ndarray:
        """Per record, ``ufunc`` over its atoms' ``values`` (records have >= 1 atom)."""
        return ufunc.reduceat(values, self.starts, axis=0)


def _frames(cells: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Per record, the cell with its open directions replaced by orthonormal vectors
    (perpendicular to the periodic ones), so fractional coordinates are periodic along
    periodic directions and Cartesian (in A) along open ones."""
    frames = np.repeat(np.eye(3)[None], len(cells), axis=0)
    full = pbc.all(axis=1)
    frames[full] = cells[full]
    for r in np.flatnonzero(pbc.any(axis=1) & ~full):
        periodic = cells[r][pbc[r]]
        complement = np.linalg.svd(periodic)[2][len(periodic):]
        frames[r][pbc[r]] = periodic
        frames[r][~pbc[r]] = complement
    return frames


def fingerprints(numbers, positions, cells, pbc, charges=None, spins=None) -> dict[str, np.ndarray]:
    """The four keys (:data:`KEYS`, ``uint64 [k]``) of ``k`` structures given as lists of
    per-structure arrays (each with at least one atom)."""
    k = len(numbers)
    charges = np.zeros(k, np.int64) if charges is None else charges
    spins = np.zeros(k, np.int64) if spins is None else spins
    out = {key: np.zeros(k, np.uint64) for key in KEYS}
    if not k:
        return out
    with np.errstate(over="ignore", invalid="ignore"):
        b = _Batch(numbers, positions, cells, pbc, charges, spins)
        out["fp_formula"] = _formula(b)
        out["fp_exact"] = _exact(b)
        out["fp_near_a"], out["fp_near_b"] = _near(b, out["fp_formula"])
    return out


def record_fingerprints(records) -> dict[str, np.ndarray]:
    """:func:`fingerprints` of :class:`~data_pipeline.schema.AtomsRecord` objects."""
    return fingerprints([r.numbers for r in records], [r.positions for r in records],
                        [r.cell for r in records], [r.pbc for r in records],
                        [int(r.charge) for r in records], [int(r.spin) for r in records])


def _formula(b: _Batch) -> np.ndarray:
    """Hash of each record's element counts."""
    counts = np.bincount(b.owner * _N_Z + b.z, minlength=b.k * _N_Z)
    rows, z = np.nonzero(counts.reshape(b.k, _N_Z))  # row by row: each record's elements together
    first = np.searchsorted(rows, np.arange(b.k))
    return _mix(np.add.reduceat(_fold(z, counts[rows * _N_Z + z]), first))


def _anchor_scores(b) -> tuple[np.ndarray, np.ndarray]:
    """Per atom, the translation-invariant scores that choose the anchor: the phase match
    along periodic directions (larger first) and the squared distance from the centre along
    open ones (smaller first)."""
    phase = b.phase * b.periodic
    s = b.reduce(phase)  # [k, 3] structure factor at each first reciprocal vector
    match = (s[b.owner] * np.conj(phase)).real.sum(axis=1) / b.sizes[b.owner]
    centre = b.reduce(b.frac) / b.sizes[:, None]
    spread = np.where(b.periodic, 0.0, b.frac - centre[b.owner])
    return match, (spread * spread).sum(axis=1)


def _candidates(b: _Batch) -> np.ndarray:
    """Bool per atom: an anchor candidate of its record (at least one per record)."""
    counts = np.bincount(b.owner * _N_Z + b.z, minlength=b.k * _N_Z).reshape(b.k, _N_Z).astype(float)
    counts[counts == 0] = np.inf
    rare = np.argmin(counts, axis=1)  # the rarest element, the lightest on a tie
    cand = b.z == rare[b.owner]
    several = counts.min(axis=1) > 1  # records whose rarest element has one atom need no scores
    if not several.any():
        return cand
    match, spread = np.zeros(len(b.z)), np.zeros(len(b.z))
    sub = _Subset(b, several)
    match[sub.atoms], spread[sub.atoms] = _anchor_scores(sub)
    best = b.reduce(np.where(cand, match, -np.inf), np.maximum)
    cand &= match >= best[b.owner] - _WINDOW
    best = b.reduce(np.where(cand, spread, np.inf), np.minimum)
    return cand & (spread <= best[b.owner] + _WINDOW * (1.0 + np.abs(best[b.owner])))


def _exact(b: _Batch) -> np.ndarray:
    """The exact key of each record: the smallest over its anchor candidates."""
    cand = _candidates(b)
    anchors = np.flatnonzero(cand)
    owners = b.owner[anchors]
    header = _record_header(b)
    # every record with its first candidate at once; then the others of the few records
    # that have several (a near-symmetric structure), and the smallest key wins
    first = np.unique(owners, return_index=True)[1]
    keys = _mix(_anchored_all(b, anchors[first]) + header)
    rest = np.setdiff1d(np.arange(len(anchors)), first)
    i = 0
    while i < len(rest):  # in chunks of about a million atoms
        size, j = 0, i
        while j < len(rest) and (size == 0 or size + b.sizes[owners[rest[j]]] <= 1 << 20):
            size += int(b.sizes[owners[rest[j]]])
            j += 1
        pick = rest[i:j]
        h = _anchored(b, anchors[pick], owners[pick])
        np.minimum.at(keys, owners[pick], _mix(h + header[owners[pick]]))
        i = j
    return keys


def _atom_hashes(b: _Batch, z: np.ndarray, d: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Hash of each atom: element and position ``d`` relative to its anchor, rounded
    (fractional, modulo 1, along periodic directions; A along open ones)."""
    steps = b.steps[rec]
    q = np.rint(d * steps)
    q = np.where(b.pbc[rec], np.mod(q, steps), q).astype(np.int64)
    return _fold(z, q[:, 0], q[:, 1], q[:, 2])


def _anchored_all(b: _Batch, anchors: np.ndarray) -> np.ndarray:
    """:func:`_anchored` with the ``k``-th anchor in the ``k``-th record, for every record."""
    h = _atom_hashes(b, b.z, b.frac - b.frac[anchors][b.owner], b.owner)
    return b.reduce(h)  # wrapping sums: order-free


def _record_header(b: _Batch) -> np.ndarray:
    """Hash of what is not per atom: periodicity, the periodic cell vectors, charge, spin."""
    q = np.rint(b.cells / EXACT_TOLERANCE).astype(np.int64) * b.pbc[:, :, None]
    bits = b.pbc @ np.array([1, 2, 4])
    return _fold(bits, *q.reshape(b.k, 9).T, b.charge, b.spin, b.sizes)


def _anchored(b: _Batch, anchors: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """For each (anchor, its record), the sum of the record's atom hashes with positions
    relative to the anchor, rounded: fractional and modulo 1 along periodic directions."""
    sizes = b.sizes[owners]
    copy = np.repeat(np.arange(len(anchors)), sizes)
    first = np.repeat(b.starts[owners], sizes)
    atoms = first + (np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes))
    h = _atom_hashes(b, b.z[atoms], b.frac[atoms] - b.frac[anchors[copy]], owners[copy])
    return np.add.reduceat(h, np.cumsum(sizes) - sizes)  # wrapping sums: order-free


def _near(b: _Batch, formula: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two near keys: the invariants rounded on two grids offset by half a step."""
    inv = _invariants(b) / NEAR_TOLERANCE
    head = _fold(formula.view(np.int64), b.pbc @ np.array([1, 2, 4]), b.charge, b.spin)
    grids = []
    for offset in (0.0, 0.5):
        q = np.floor(inv + offset).astype(np.int64)
        grids.append(_fold(head.view(np.int64), *q.T))
    return grids[0], grids[1]


def _invariants(b: _Batch) -> np.ndarray:
    """Rotation-, translation-, order- and wrapping-invariant numbers per record: periodic
    lengths (A) and angle cosines, structure factor magnitudes / N at low reciprocal
    vectors, and the square roots of the gyration tensor's eigenvalues (A) along open
    directions, plain and weighted by atomic number. Zero where a part does not apply."""
    lengths = b.lengths
    unit = b.frame / lengths[:, :, None]
    cos = np.stack([(unit[:, 0] * unit[:, 1]).sum(1), (unit[:, 0] * unit[:, 2]).sum(1),
                    (unit[:, 1] * unit[:, 2]).sum(1)], axis=1)
    both = np.stack([b.pbc[:, 0] & b.pbc[:, 1], b.pbc[:, 0] & b.pbc[:, 2], b.pbc[:, 1] & b.pbc[:, 2]], axis=1)
    kmask = np.all(b.pbc[:, None, :] | (_KVECS[None] == 0), axis=2)  # [k, kvecs]: k along periodic axes
    free = np.where(b.periodic, 0.0, b.frac)  # open directions only (A)
    e = b.phase
    waves = np.empty((len(e), 4), np.complex128)  # exp(2 pi i k.f) for _KVECS
    waves[:, :3] = e
    waves[:, 3] = e[:, 0] * e[:, 1] * e[:, 2]
    sf = np.abs(b.reduce(waves)) / b.sizes[:, None] * kmask
    gyr = np.zeros((b.k, 6))
    open_ = ~b.pbc.all(axis=1)  # the gyration tensor only where a direction is open
    if open_.any():
        sub = _Subset(b, open_)
        weights = (np.ones(len(b.z)), b.z.astype(np.float64))
        gyr[open_] = np.concatenate([_gyration(sub, free[sub.atoms], w[sub.atoms]) for w in weights], axis=1)
    return np.concatenate([lengths * b.pbc, cos * both, sf, gyr], axis=1)


class _Subset:
    """The records of a batch selected by a bool mask, laid out like the batch."""

    def __init__(self, b: _Batch, mask: np.ndarray):
        self.sizes = b.sizes[mask]
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.owner = np.repeat(np.arange(len(self.sizes)), self.sizes)
        self.atoms = mask[b.owner]
        self.frac, self.phase, self.periodic = b.frac[self.atoms], b.phase[self.atoms], b.periodic[self.atoms]

    def reduce(self, values: np.ndarray, ufunc=np.add) -> np.ndarray:
        return ufunc.reduceat(values, self.starts, axis=0)


def _gyration(b, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Square roots of the eigenvalues of each record's ``w``-weighted gyration tensor."""
    total = b.reduce(w)
    centre = b.reduce(x * w[:, None]) / total[:, None]
    d = x - centre[b.owner]
    t = b.reduce(np.einsum("ni,nj->nij", d * w[:, None], d)) / total[:, None, None]
    return np.sqrt(np.maximum(np.linalg.eigvalsh(t), 0.0))


def match_atoms(a, b, tolerance: float = MATCH_TOLERANCE) -> np.ndarray | None:
    """Whether records ``a`` and ``b`` hold the same structure to ``tolerance`` (A), and how
    their atoms correspond: ``order`` with ``b``'s atom ``order[i]`` at ``a``'s atom ``i``,
    or None.

    The same elements, periodicity, charge and spin, periodic cell vectors within the
    tolerance, and after moving ``b`` so that one of its anchor candidates sits on ``a``'s
    anchor, every atom of ``b`` within the tolerance of an atom of ``a`` of its element
    (nearest periodic image), one to one. Unlike the rounded exact key this has no rounding
    boundary: two copies of a structure written to text files with 8 decimals match.
    """
    n = len(a.numbers)
    pbc = np.asarray(a.pbc, bool)
    if (n != len(b.numbers) or not np.array_equal(pbc, np.asarray(b.pbc, bool))
            or int(a.charge) != int(b.charge) or int(a.spin) != int(b.spin)
            or not np.array_equal(np.sort(a.numbers), np.sort(b.numbers))):
        return None
    ca, cb = np.asarray(a.cell, np.float64), np.asarray(b.cell, np.float64)
    if pbc.any() and np.abs(ca[pbc] - cb[pbc]).max() > tolerance:
        return None
    pa, pb = np.asarray(a.positions, np.float64), np.asarray(b.positions, np.float64)
    if np.array_equal(a.numbers, b.numbers) and np.linalg.norm(pa - pb, axis=1).max() <= tolerance:
        return np.arange(n)  # the same atoms in the same order at the same places (a plain copy)
    with np.errstate(over="ignore", invalid="ignore"):
        batch = _Batch([a.numbers, b.numbers], [a.positions, b.positions], [ca, cb], [pbc, pbc], [0, 0], [0, 0])
        cand = _candidates(batch)
    za, zb = batch.z[:n], batch.z[n:]
    fa, fb, frame = batch.frac[:n], batch.frac[n:], batch.frame[0]
    anchor = int(np.flatnonzero(cand[:n])[0])
    for c in np.flatnonzero(cand[n:]).tolist():
        moved = fb - fb[c] + fa[anchor]
        order, worst = np.zeros(n, np.int64), 0.0
        for lo in range(0, n, 256):  # [256, n, 3] at a time: memory linear in n
            d = moved[None, :, :] - fa[lo:lo + 256, None, :]
            d = np.where(pbc, d - np.rint(d), d)
            dist = np.linalg.norm(d @ frame, axis=2)
            dist[za[lo:lo + 256, None] != zb[None, :]] = np.inf
            order[lo:lo + 256] = np.argmin(dist, axis=1)
            worst = max(worst, float(dist[np.arange(len(dist)), order[lo:lo + 256]].max()))
            if worst > tolerance:
                break
        if worst <= tolerance and len(np.unique(order)) == n:
            return order
    return None
