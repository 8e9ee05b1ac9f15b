"""Coverage statistics of a build: which elements, element pairs, geometries and labels
the data spans, per fidelity (the manifest's ``coverage``).

Everything is measured in the conversion tasks, from the records they already hold: a
unit stages per-record columns in its ``unit-k.table.npz`` (:class:`CoverageColumns`:
nearest-neighbour distance, volume per atom, pressure, and the force magnitudes as a
sparse per-record histogram), and :func:`data_pipeline.build.assemble.assemble_manifest`
adds them up per fidelity (:class:`FidelityCoverage`) over the records that survive the
reference audit, so a record the audit drops is not counted. Element and pair counts come
from the compositions the per-record table (``unit-k.table.npz``) already stages.

Histograms have fixed edges, the same for every unit and every build, so parts merge by
addition and two manifests compare bin by bin; values outside the edges are counted as
``below`` and ``above``. Minimum and maximum are exact.

The nearest-neighbour distance of a record the validation screen measured comes from its
pair pass (:func:`data_pipeline.build.screen.screen_many`); only the others (over 128
atoms, slabs, sparse cells, records near a limit) are measured here, each with a k-d tree.
"""

from __future__ import annotations

import math

import numpy as np

from data_pipeline.build.stats import N_Z
from data_pipeline.build.validate import _complete_cell, _with_halo
from data_pipeline.schema import AtomsRecord

GPA_PER_EV_A3 = 160.21766208  # 1 eV/A^3 in GPa
NEAREST_CUTOFF = 5.0  # A: the k-d tree search radius first tried for records the screen did not measure

EDGES = {  # fixed bin edges; changing one makes new manifests' histograms incomparable with old
    "nearest_distance": np.round(np.linspace(0.0, 6.0, 121), 6),  # A, 0.05 A bins
    "volume_per_atom": np.round(np.linspace(0.0, 100.0, 101), 6),  # A^3/atom, 1 A^3 bins
    "pressure": np.round(np.linspace(-100.0, 100.0, 101), 6),  # GPa, 2 GPa bins
    "force": np.round(np.logspace(-4, 3, 36), 10),  # eV/A, 5 log bins per decade
}
UNITS = {"nearest_distance": "A", "volume_per_atom": "A^3/atom", "pressure": "GPa", "force": "eV/A"}
DEFINITIONS = {
    "elements": "per element: atoms, and structures that contain it",
    "pairs": "per pair of distinct elements (lower atomic number first): structures that contain both",
    "nearest_distance": "per structure with a neighbour: the smallest distance between two atoms or an "
                        "atom and a periodic image (its own included)",
    "volume_per_atom": "per structure periodic in all three directions: cell volume / atoms",
    "pressure": "per structure with a stress label: -trace(stress) / 3 (ASE sign: positive is compressed)",
    "force": "per atom with a force label: |F|",
}
SCALARS = ("nearest_distance", "volume_per_atom", "pressure")  # one value per structure
_N_FORCE_BINS = len(EDGES["force"]) + 1  # with below and above


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value: 0 below ``edges[0]``, i for ``edges[i-1] <= v < edges[i]``,
    ``len(edges)`` from ``edges[-1]`` up."""
    return np.searchsorted(edges, values, side="right")


def nearest_distance(rec: AtomsRecord) -> float:
    """Exact nearest-neighbour distance (A, periodic images included); NaN for a single
    free atom. For the records the screen did not measure (~20 us each, a k-d tree)."""
    if not rec.pbc.any():
        if rec.n_atoms < 2:
            return float("nan")
        return _tree_nearest(np.asarray(rec.positions, dtype=np.float64), rec.n_atoms, math.inf)
    d = _periodic_nearest(rec, NEAREST_CUTOFF)
    if d == math.inf:  # sparse: an atom's own image along the shortest periodic vector bounds it
        d = _periodic_nearest(rec, float(np.linalg.norm(rec.cell[rec.pbc], axis=1).min()) * (1 + 1e-9))
    return d


def _tree_nearest(points: np.ndarray, n: int, cutoff: float) -> float:
    """Smallest distance from one of the first ``n`` points to another point (inf if none
    within ``cutoff``)."""
    from scipy.spatial import cKDTree  # noqa: PLC0415 - scipy comes with ase

    dist, _ = cKDTree(points).query(points[:n], k=2, distance_upper_bound=cutoff)
    return float(dist[:, 1].min())


def _periodic_nearest(rec: AtomsRecord, cutoff: float) -> float:
    """The nearest distance if below ``cutoff``, else inf. A cell thinner than the cutoff
    is repeated first (a supercell is the same crystal), then atoms near the faces are
    copied across (:func:`data_pipeline.build.validate.min_pair_distance`'s halo): every
    image within the cutoff of an atom is then a point of the tree."""
    pbc = rec.pbc
    cell = rec.cell if pbc.all() else _complete_cell(rec.cell, pbc)
    heights = 1.0 / np.sqrt((np.linalg.inv(cell) ** 2).sum(axis=0))
    reps = np.where(pbc, np.floor(cutoff / heights).astype(int) + 1, 1)
    grid = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), axis=-1).reshape(-1, 3)
    points = (np.asarray(rec.positions, dtype=np.float64)[None] + (grid @ cell)[:, None]).reshape(-1, 3)
    cell = cell * reps[:, None]
    inverse = np.linalg.inv(cell)
    heights = heights * reps
    points = _with_halo(points @ inverse, cell, pbc, cutoff / heights)
    return _tree_nearest(points, len(grid) * rec.n_atoms, cutoff)


class CoverageColumns:
    """Per-record coverage columns of one work unit, in record order (the unit's index order)."""

    COLUMNS = ("nearest_distance", "volume_per_atom", "pressure", "force_min", "force_max")

    def __init__(self):
        self.rows: dict[str, list[np.ndarray]] = {c: [] for c in self.COLUMNS}
        self.force_bin: list[np.ndarray] = []  # sparse force histogram: bin, count, bins per record
        self.force_count: list[np.ndarray] = []
        self.force_lengths: list[np.ndarray] = []

    def add_many(self, recs: list[AtomsRecord], nearest: list[float]) -> None:
        """Account for a batch of kept records; ``nearest``: the screen's distances (NaN
        where it has none; those are measured here)."""
        if not recs:
            return
        near = [d if d == d else nearest_distance(rec) for rec, d in zip(recs, nearest)]
        self.rows["nearest_distance"].append(np.asarray(near, dtype=np.float64))
        self.rows["volume_per_atom"].append(_volume_per_atom(recs))
        self.rows["pressure"].append(_pressure(recs))
        self._add_forces(recs)

    def _add_forces(self, recs: list[AtomsRecord]) -> None:
        """One sparse |F| histogram and the |F| range per record (NaN without forces)."""
        k = len(recs)
        lo, hi = np.full(k, np.nan), np.full(k, np.nan)
        counts = np.zeros((k, _N_FORCE_BINS), np.int64)
        has = [i for i, rec in enumerate(recs) if rec.forces is not None and rec.n_atoms]
        if has:
            sizes = np.array([recs[i].n_atoms for i in has])
            f = np.concatenate([recs[i].forces for i in has], dtype=np.float64)
            norm = np.sqrt(np.einsum("ij,ij->i", f, f))  # [atoms]
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            lo[has], hi[has] = np.minimum.reduceat(norm, starts), np.maximum.reduceat(norm, starts)
            owner = np.repeat(np.asarray(has), sizes)
            flat = owner * _N_FORCE_BINS + bin_index(norm, EDGES["force"])
            counts = np.bincount(flat, minlength=k * _N_FORCE_BINS).reshape(k, _N_FORCE_BINS)
        rows, bins = np.nonzero(counts)  # row by row, bins ascending
        self.force_bin.append(bins.astype(np.uint8))
        self.force_count.append(counts[rows, bins].astype(np.uint32))
        self.force_lengths.append(np.bincount(rows, minlength=k))
        self.rows["force_min"].append(lo)
        self.rows["force_max"].append(hi)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to store: the columns [n], force_ptr [n+1], force_bin and force_count [nnz]."""
        out = {c: np.concatenate(v) if v else np.zeros(0) for c, v in self.rows.items()}
        lengths = np.concatenate(self.force_lengths) if self.force_lengths else np.zeros(0, np.int64)
        out["force_ptr"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out["force_bin"] = np.concatenate(self.force_bin) if self.force_bin else np.zeros(0, np.uint8)
        out["force_count"] = np.concatenate(self.force_count) if self.force_count else np.zeros(0, np.uint32)
        return out


def _volume_per_atom(recs: list[AtomsRecord]) -> np.ndarray:
    """Cell volume / atoms of records periodic in all three directions, else NaN."""
    bulk = [k for k, rec in enumerate(recs) if rec.pbc.tolist() == [True] * 3 and len(rec.numbers)]
    out = np.full(len(recs), np.nan)
    if bulk:
        cells = np.array([recs[k].cell for k in bulk], dtype=np.float64)
        out[bulk] = np.abs(np.linalg.det(cells)) / np.array([len(recs[k].numbers) for k in bulk])
    return out


def _pressure(recs: list[AtomsRecord]) -> np.ndarray:
    """-trace(stress) / 3 in GPa of records with a stress label (Voigt, eV/A^3), else NaN."""
    out = np.full(len(recs), np.nan)
    has = [i for i, rec in enumerate(recs) if rec.stress is not None]
    if has:
        voigt = np.array([recs[i].stress for i in has], dtype=np.float64).reshape(len(has), 6)
        out[has] = -voigt[:, :3].sum(axis=1) / 3.0 * GPA_PER_EV_A3
    return out


class FidelityCoverage:
    """The coverage of one fidelity (or part of one): counts and histograms that add up."""

    def __init__(self):
        self.structures = self.atoms = 0
        self.element_atoms = np.zeros(N_Z, np.int64)
        self.together = np.zeros((N_Z, N_Z), np.int64)  # structures holding both; diagonal: holding it
        self.counts = {q: np.zeros(len(e) + 1, np.int64) for q, e in EDGES.items()}
        self.low = dict.fromkeys(EDGES, np.inf)
        self.high = dict.fromkeys(EDGES, -np.inf)

    def add_unit(self, table: dict, columns: dict, keep: np.ndarray) -> None:
        """Account for the records of one unit's staged table and coverage columns selected
        by the bool mask ``keep``."""
        self._add_compositions(table, keep)
        for q in SCALARS:
            v = columns[q][keep]
            self._add_values(q, v[~np.isnan(v)])
        rows = np.repeat(np.arange(len(keep)), np.diff(columns["force_ptr"]))
        picked = keep[rows]
        self.counts["force"] += np.bincount(columns["force_bin"][picked].astype(np.int64),
                                            weights=columns["force_count"][picked],
                                            minlength=_N_FORCE_BINS).astype(np.int64)
        self._add_range("force", columns["force_min"][keep], columns["force_max"][keep])

    def _add_compositions(self, table: dict, keep: np.ndarray) -> None:
        """Structures, atoms, atoms per element and co-occurring pairs (one sparse product)."""
        from scipy.sparse import csr_matrix  # noqa: PLC0415 - scipy comes with ase

        lengths = np.diff(table["ptr"])
        picked = keep[np.repeat(np.arange(len(keep)), lengths)]
        z = table["z"][picked].astype(np.int64)
        self.structures += int(keep.sum())
        self.atoms += int(table["n_atoms"][keep].sum())
        self.element_atoms += np.bincount(z, weights=table["count"][picked], minlength=N_Z).astype(np.int64)
        ptr = np.concatenate([[0], np.cumsum(lengths[keep])])
        present = csr_matrix((np.ones(len(z)), z, ptr), shape=(int(keep.sum()), N_Z))  # [structures, N_Z]
        self.together += np.rint((present.T @ present).toarray()).astype(np.int64)

    def _add_values(self, q: str, v: np.ndarray) -> None:
        self.counts[q] += np.bincount(bin_index(v, EDGES[q]), minlength=len(EDGES[q]) + 1)
        self._add_range(q, v, v)

    def _add_range(self, q: str, low: np.ndarray, high: np.ndarray) -> None:
        if np.isfinite(low).any():
            self.low[q] = min(self.low[q], float(np.nanmin(low)))
            self.high[q] = max(self.high[q], float(np.nanmax(high)))

    def merge(self, other: "FidelityCoverage") -> None:
        """Fold another part in (all sums, minima and maxima: any order gives the same)."""
        self.structures += other.structures
        self.atoms += other.atoms
        self.element_atoms += other.element_atoms
        self.together += other.together
        for q in EDGES:
            self.counts[q] += other.counts[q]
            self.low[q], self.high[q] = min(self.low[q], other.low[q]), max(self.high[q], other.high[q])

    def to_json(self) -> dict:
        """The manifest's view of one fidelity (layout in :func:`coverage_json`)."""
        from ase.data import chemical_symbols  # noqa: PLC0415

        structures = np.diag(self.together)
        present = np.flatnonzero(structures)
        first, second = np.nonzero(np.triu(self.together, 1))  # z ascending, lower first
        out = {"structures": self.structures, "atoms": self.atoms,
               "elements": {chemical_symbols[z]: {"atoms": int(self.element_atoms[z]),
                                                  "structures": int(structures[z])} for z in present},
               "pairs": {f"{chemical_symbols[a]}-{chemical_symbols[b]}": int(self.together[a, b])
                         for a, b in zip(first.tolist(), second.tolist())}}
        for q in EDGES:
            c = self.counts[q]
            seen = bool(c.sum())
            out[q] = {"count": int(c.sum()), "min": self.low[q] if seen else None,
                      "max": self.high[q] if seen else None,
                      "below": int(c[0]), "counts": c[1:-1].tolist(), "above": int(c[-1])}
        return out


def coverage_json(parts: dict[str, FidelityCoverage]) -> dict:
    """The manifest's ``coverage``: definitions, units and bin edges once, then per fidelity
    its structures, atoms, ``elements`` ({symbol: {atoms, structures}}), ``pairs``
    ({"O-Cu": structures with both}, only pairs seen) and per quantity ``count``, ``min``,
    ``max``, ``below`` (under the first edge), ``counts`` (one per bin) and ``above``."""
    return {"definitions": DEFINITIONS, "units": UNITS,
            "edges": {q: e.tolist() for q, e in EDGES.items()},
            "fidelities": {fid: part.to_json() for fid, part in parts.items()}}
