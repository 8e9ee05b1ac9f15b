"""Dataset statistics for the manifest, computed in parallel and combined in a fixed order.

Each conversion task keeps a compact per-record table (:class:`RecordTable`: energy,
composition, force and stress figures, and per declared extra its layout and moments) of
its records (one dataset x fidelity group per task). The driver fits elemental references
from the tables and audits them (:mod:`data_pipeline.build.audit`), then summarises the
surviving records of each unit as a :class:`GroupStats` and, per extra, an
:class:`ExtraStats`, and combines those in input order (Chan's parallel mean/variance
update, so no sum of squares of large total energies loses precision). The order is the
units', never the workers': any worker count gives the same numbers.
"""

from __future__ import annotations

import dataclasses

import numpy as np

N_Z = 119  # atomic numbers 0..118 (0 unused)


@dataclasses.dataclass
class GroupStats:
    """Summary of the records of one dataset x fidelity group (or part of one)."""

    structures: int = 0
    atoms: int = 0
    elements: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(N_Z, np.int64))
    n_energy: int = 0
    epa_mean: float = 0.0  # energy per atom, eV
    epa_m2: float = 0.0  # sum of squared deviations from the mean
    force_components: int = 0
    force_sq_sum: float = 0.0
    n_stress: int = 0

    def add(self, numbers: np.ndarray, energy: float | None, forces, stress) -> None:
        """Account for one record."""
        self.structures += 1
        self.atoms += len(numbers)
        self.elements += np.bincount(numbers, minlength=N_Z)
        if energy is not None:
            self._merge_epa(1, energy / len(numbers), 0.0)
        if forces is not None:
            f = np.asarray(forces, dtype=np.float64)
            self.force_components += f.size
            self.force_sq_sum += float(np.dot(f.ravel(), f.ravel()))
        if stress is not None:
            self.n_stress += 1

    def _merge_epa(self, n: int, mean: float, m2: float) -> None:
        total = self.n_energy + n
        if total == 0:
            return
        delta = mean - self.epa_mean
        self.epa_mean += delta * n / total
        self.epa_m2 += m2 + delta * delta * self.n_energy * n / total
        self.n_energy = total

    def merge(self, other: "GroupStats") -> None:
        """Fold another partial summary into this one (order matters only in the last bits)."""
        self.structures += other.structures
        self.atoms += other.atoms
        self.elements += other.elements
        self._merge_epa(other.n_energy, other.epa_mean, other.epa_m2)
        self.force_components += other.force_components
        self.force_sq_sum += other.force_sq_sum
        self.n_stress += other.n_stress

    def to_json(self) -> dict:
        """The manifest's view: counts, element counts by symbol, energy and force figures."""
        from ase.data import chemical_symbols  # noqa: PLC0415

        present = np.flatnonzero(self.elements)
        return {
            "structures": self.structures,
            "atoms": self.atoms,
            "elements": {chemical_symbols[z]: int(self.elements[z]) for z in present},
            "with_energy": self.n_energy,
            "with_stress": self.n_stress,
            "energy_per_atom_mean": self.epa_mean if self.n_energy else None,
            "energy_per_atom_std": float(np.sqrt(self.epa_m2 / self.n_energy)) if self.n_energy else None,
            "force_rms": float(np.sqrt(self.force_sq_sum / self.force_components))
            if self.force_components
            else None,
        }


class RecordTable:
    """Per-record columns of one work unit, in record order (the unit's index order).

    Everything the driver needs after conversion without decoding a record: the reference
    fit and its outlier audit (energy, composition), and the group statistics of the
    records that survive the audit (atoms, force and stress figures). Compositions are
    CSR (``ptr``/``z``/``count``), so memory is O(records x elements present), never a
    dense records x 118 matrix.
    """

    COLUMNS = ("energy", "frame", "n_atoms", "force_sq", "force_n", "stress")

    def __init__(self, extras: list = ()):
        """``extras``: the source's declared extras (:class:`data_pipeline.build.recipe.ExtraConfig`)."""
        self.rows: dict[str, list] = {c: [] for c in self.COLUMNS}
        self.z: list[np.ndarray] = []  # per batch of records: z, count, elements per record
        self.count: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.extras = {spec.name: _ExtraColumns(spec) for spec in extras}

    def add(self, frame: int, numbers: np.ndarray, energy: float | None, forces, stress,
            extras: dict | None = None) -> None:
        """Account for one record (``frame``: its index in the source file)."""
        self.add_many([frame], [numbers], [energy], [forces], [stress], [extras or {}])

    def add_many(self, frames: list[int], numbers: list[np.ndarray], energies: list, forces: list,
                 stresses: list, extras: list[dict] | None = None) -> None:
        """Account for a batch of records, in order (one composition pass for the batch);
        ``extras``: each record's ``record.extras``."""
        k = len(frames)
        if not k:
            return
        for columns in self.extras.values():
            columns.add_many([{}] * k if extras is None else extras, numbers)
        sizes = [len(z) for z in numbers]
        owner = np.repeat(np.arange(k), sizes)
        z_all = np.concatenate(numbers).astype(np.int64)
        if len(z_all) and not 0 <= z_all.min() <= z_all.max() < N_Z:
            raise ValueError(f"atomic numbers outside 0..{N_Z - 1} in frames {frames[0]}..{frames[-1]}")
        counts = np.bincount(owner * N_Z + z_all, minlength=k * N_Z)
        rows, z = np.nonzero(counts.reshape(k, N_Z))  # row by row, z ascending
        self.z.append(z.astype(np.uint8))
        self.count.append(counts[rows * N_Z + z].astype(np.uint32))
        self.lengths.append(np.bincount(rows, minlength=k))
        force_sq, force_n = [], []
        for f in forces:
            f = None if f is None else np.asarray(f, dtype=np.float64).ravel()
            force_sq.append(0.0 if f is None else float(f @ f))
            force_n.append(0 if f is None else f.size)
        self.rows["energy"].extend(np.nan if e is None else e for e in energies)
        self.rows["frame"].extend(frames)
        self.rows["n_atoms"].extend(sizes)
        self.rows["force_sq"].extend(force_sq)
        self.rows["force_n"].extend(force_n)
        self.rows["stress"].extend(s is not None for s in stresses)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays to store: the columns [n], ptr [n+1], z [nnz], count [nnz]."""
        dtypes = (np.float64, np.int64, np.int64, np.float64, np.int64, bool)
        out = {c: np.asarray(self.rows[c], dtype=d) for c, d in zip(self.COLUMNS, dtypes)}
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        out["ptr"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out["z"] = np.concatenate(self.z) if self.z else np.zeros(0, np.uint8)
        out["count"] = np.concatenate(self.count) if self.count else np.zeros(0, np.uint32)
        for name, columns in self.extras.items():
            out.update({f"{EXTRAS}{name}.{c}": v for c, v in columns.to_arrays().items()})
        return out


EXTRAS = "extras."  # prefix of a declared extra's columns in a unit's table: extras.<name>.<column>


class _ExtraColumns:
    """One declared extra's per-record columns: ``layout`` (``b"atom:3"``, ``b"structure:3,3"``;
    ``b""`` where the record lacks it), its count of values ``n``, their ``sum``, sum of
    squares ``sq`` and squared deviations from the record's own mean ``m2``."""

    def __init__(self, spec):
        self.spec = spec
        self.rows: dict[str, list] = {"layout": [], "n": [], "sum": [], "sq": [], "m2": []}

    def add_many(self, extras: list[dict], numbers: list[np.ndarray]) -> None:
        """Account for a batch of records (each one's ``record.extras`` and atomic numbers)."""
        for values, z in zip(extras, numbers):
            value = values.get(self.spec.name)
            if value is None:
                figures = (b"", 0, 0.0, 0.0, 0.0)
            else:
                x = np.asarray(value, dtype=np.float64).ravel()
                per, tail = self.spec.layout_of(np.shape(value), len(z))  # validated: it fits
                mean = float(x.mean()) if x.size else 0.0
                d = x - mean
                figures = (f"{per}:{','.join(map(str, tail))}".encode(), x.size, float(x.sum()),
                           float(x @ x), float(d @ d))
            for column, v in zip(self.rows.values(), figures):
                column.append(v)

    def to_arrays(self) -> dict[str, np.ndarray]:
        dtypes = ("S", np.int64, np.float64, np.float64, np.float64)
        return {c: np.asarray(v, dtype=d) for (c, v), d in zip(self.rows.items(), dtypes)}


@dataclasses.dataclass
class ExtraStats:
    """Summary of one declared extra over the records of a fidelity (or part of them)."""

    records: int = 0  # records carrying it
    absent: int = 0  # records of sources declaring it that lack it
    values: int = 0  # every component of every record
    mean: float = 0.0
    m2: float = 0.0  # sum of squared deviations from the mean
    sq_sum: float = 0.0
    layouts: dict[str, int] = dataclasses.field(default_factory=dict)  # "atom:3" -> records

    def merge(self, other: "ExtraStats") -> None:
        """Fold another partial summary into this one (Chan's update, as GroupStats)."""
        total = self.values + other.values
        if not self.values:  # the first part's figures as they are (m * n / n may differ from m)
            self.mean, self.m2 = other.mean, other.m2
        elif total:
            delta = other.mean - self.mean
            self.mean += delta * other.values / total
            self.m2 += other.m2 + delta * delta * self.values * other.values / total
        self.values = total
        self.records += other.records
        self.absent += other.absent
        self.sq_sum += other.sq_sum
        for layout, count in other.layouts.items():
            self.layouts[layout] = self.layouts.get(layout, 0) + count

    def to_json(self, spec, unit: str | None) -> tuple[dict, str | None]:
        """The manifest's entry, and a warning when the records differ in layout. Per and
        shape are the records' own (as declared where no record carries it)."""
        per, shape, warning = (None if spec.per == "auto" else spec.per), spec.shape, None
        found = []  # (per, shape, records) of each layout the records have
        for layout, count in sorted(self.layouts.items()):
            p, _, dims = layout.partition(":")
            found.append((p, [int(d) for d in dims.split(",") if d], count))
        if found:
            pers = {p for p, _, _ in found}
            per = pers.pop() if len(pers) == 1 else "mixed"
            shape = found[0][1] if len(found) == 1 else None
        if len(found) > 1:
            seen = ", ".join(f"per {p} shape {s}: {count} records" for p, s, count in found)
            warning = (f"extra {spec.name!r} (key {spec.key!r}): records differ in layout ({seen}); "
                       "declare its per and shape in the recipe")
        n = self.values
        return {"records": self.records, "absent": self.absent, "per": per, "shape": shape, "unit": unit,
                "mean": self.mean if n else None,
                "rms": float(np.sqrt(self.sq_sum / n)) if n else None,
                "std": float(np.sqrt(self.m2 / n)) if n else None}, warning


def extra_stats(table, keep: np.ndarray, name: str) -> ExtraStats:
    """The ExtraStats of extra ``name`` over the records of a stored table selected by ``keep``."""
    column = {c: table[f"{EXTRAS}{name}.{c}"][keep] for c in ("layout", "n", "sum", "sq", "m2")}
    has = column["layout"] != b""
    n, total = column["n"][has], column["sum"][has]
    values = int(n.sum())
    mean = float(total.sum()) / values if values else 0.0
    own = np.divide(total, n, out=np.zeros(len(n)), where=n > 0)  # each record's mean
    layouts, counts = np.unique(column["layout"][has], return_counts=True)
    return ExtraStats(
        records=int(has.sum()), absent=int((~has).sum()), values=values, mean=mean,
        m2=float(column["m2"][has].sum() + (n * (own - mean) ** 2).sum()),  # the exact pooled form
        sq_sum=float(column["sq"][has].sum()),
        layouts={k.decode(): int(c) for k, c in zip(layouts, counts)},
    )


def composition(table, columns: np.ndarray):
    """Sparse composition matrix ``[n_records, len(columns)]`` (scipy CSR) of a stored table."""
    from scipy.sparse import csr_matrix  # noqa: PLC0415 - scipy comes with ase

    col_of_z = np.full(N_Z, -1)
    col_of_z[columns] = np.arange(len(columns))
    cols = col_of_z[table["z"]]
    if (cols < 0).any():
        raise ValueError(f"composition: atomic numbers {sorted(set(table['z'][cols < 0]))} not in columns")
    data = np.asarray(table["count"], np.float64)
    n = len(table["energy"])
    return csr_matrix((data, cols, table["ptr"]), shape=(n, len(columns)))


def group_stats(table, keep: np.ndarray) -> GroupStats:
    """The GroupStats of the records of a stored table selected by the bool mask ``keep``."""
    rows = np.repeat(np.arange(len(keep)), np.diff(table["ptr"]))
    picked = keep[rows]
    elements = np.bincount(table["z"][picked], weights=table["count"][picked], minlength=N_Z)
    energy = table["energy"][keep]
    has = ~np.isnan(energy)
    epa = energy[has] / table["n_atoms"][keep][has]
    mean = float(epa.mean()) if len(epa) else 0.0
    return GroupStats(
        structures=int(keep.sum()), atoms=int(table["n_atoms"][keep].sum()),
        elements=np.rint(elements).astype(np.int64), n_energy=len(epa), epa_mean=mean,
        epa_m2=float(((epa - mean) ** 2).sum()),
        force_components=int(table["force_n"][keep].sum()),
        force_sq_sum=float(table["force_sq"][keep].sum()), n_stress=int(table["stress"][keep].sum()),
    )
