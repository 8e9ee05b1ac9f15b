"""From a raw frame to a validated record, or a rejection with a reason.

:func:`to_record` maps a source's keys to the schema (energy/forces/stress from the
calculator results or from ``info``/``arrays`` keys named in the recipe) and
:func:`check_record` applies the recipe's limits. Each failure is a :class:`Rejected`
whose ``reason`` is one of :data:`REASONS`; the build counts them by reason in the
manifest and lists each in ``rejects.jsonl``.
"""

from __future__ import annotations

import math

from typing import Any

import numpy as np

from data_pipeline.build.recipe import ExtraConfig, SourceConfig, ValidationConfig
from data_pipeline.build.screen import clearly_valid
from data_pipeline.schema import AtomsRecord
from data_pipeline.build.sources.base import RawFrame
from data_pipeline.build.units import LabelFactors, extra_factor, label_factors

REASONS = {
    "parse_error": "the file cannot be parsed from this frame on",
    "unreadable_frame": "one frame or row could not be read",
    "unparseable_value": "a value that should be a number is not",
    "bad_shape": "an array has the wrong shape",
    "empty": "the structure has no atoms",
    "too_many_atoms": "more atoms than validation.max_atoms",
    "bad_atomic_number": "an atomic number outside 1..118",
    "non_finite_positions": "NaN or inf in positions",
    "non_finite_cell": "NaN or inf in the cell",
    "degenerate_cell": "a periodic direction with a zero-volume cell",
    "atoms_too_close": "two atoms (or periodic images) closer than validation.min_distance",
    "missing_energy": "no energy, and the source does not allow force-only data",
    "non_finite_energy": "NaN or inf energy",
    "non_finite_forces": "NaN or inf in forces",
    "non_finite_stress": "NaN or inf in stress",
    "non_finite_extras": "NaN or inf in a declared extra (recipe extras)",
    "energy_outlier": "|energy per atom| above validation.max_abs_energy_per_atom",
    "force_outlier": "a force norm above validation.max_force",
    "stress_outlier": "a stress component above validation.max_abs_stress",
    "bad_charge": "a total charge that is not a whole number of e",
    "bad_spin": "a spin multiplicity that is negative or not a whole number (0 means unknown)",
    "coordinate_outlier": "a coordinate farther from the origin than validation.max_abs_coordinate",
    "asymmetric_stress": "a 3x3 stress whose off-diagonal pairs differ by more than 1% of its "
                         "largest component",
    "duplicate": "an exact copy of an earlier record at the same fidelity (recipe duplicates: keep_first)",
    "label_conflict": "copies of one structure at one fidelity with different labels (recipe conflicts: drop)",
    "reference_outlier": "energy per atom after elemental references far outside its fidelity's "
                         "residual distribution (recipe.reference_outlier_mads)",
}


class Rejected(Exception):
    """A frame that does not enter the shards; ``reason`` is a key of REASONS."""

    def __init__(self, reason: str, detail: str):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_PLAIN_NUMBERS = (float, np.float64, np.int64)  # float() of these is np.asarray's value


def _number(value: Any, what: str) -> float:
    """A scalar float from a parsed value; strings that are not numbers are rejected."""
    if type(value) in _PLAIN_NUMBERS or (type(value) is int and abs(value) < 1 << 53):
        return float(value)  # as below, without np.asarray's cost (3 per record)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise Rejected("unparseable_value", f"{what} = {value!r} is not a number") from None
    if arr.size != 1:
        raise Rejected("bad_shape", f"{what} has shape {arr.shape}, expected a scalar")
    return float(arr.reshape(()))


def _array(value: Any, what: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise Rejected("unparseable_value", f"{what} holds values that are not numbers") from None
    if arr.shape != shape:
        raise Rejected("bad_shape", f"{what} has shape {arr.shape}, expected {shape}")
    return arr


def _lookup(frame: RawFrame, key: str | None, default: str, where: str) -> Any:
    """The value under ``key`` in info/arrays, or under ``default`` in the calc results."""
    if key is None:
        return frame.calc.get(default)
    table = frame.arrays if where == "arrays" else frame.info
    if key in table:
        return table[key]
    # a key the user named may also have landed in the calc results (ASE moves
    # energy/forces/stress there) or in the other table
    other = frame.info if where == "arrays" else frame.arrays
    return frame.calc.get(key, other.get(key))


STRESS_ASYMMETRY = 1e-2  # relative: DFT stress tensors are symmetric to ~1e-6 of their size


def _voigt(value: Any, what: str, asymmetry: float = STRESS_ASYMMETRY) -> np.ndarray:
    """Voigt ``xx yy zz yz xz xy`` of 6 values, or of a 3x3 tensor that is symmetric to
    ``asymmetry`` of its largest component (the mean of each off-diagonal pair: no
    component is dropped); a tensor further from symmetric is rejected, not silently
    symmetrised."""
    arr = _array(value, what, np.shape(value)) if value is not None else None
    if arr.size == 6:
        return arr.reshape(6)
    if arr.size == 9:
        s = arr.reshape(3, 3)
        gap = float(np.abs(s - s.T).max()) if np.isfinite(s).all() else 0.0
        if gap > asymmetry * float(np.abs(s).max()):
            raise Rejected("asymmetric_stress", f"{what}: off-diagonal pairs differ by {gap:.4g} "
                                                f"(largest component {float(np.abs(s).max()):.4g}); a stress "
                                                "tensor is symmetric: check the key and its layout")
        m = 0.5 * (s + s.T)
        return np.array([m[0, 0], m[1, 1], m[2, 2], m[1, 2], m[0, 2], m[0, 1]])
    raise Rejected("bad_shape", f"{what} has {arr.size} values, expected 6 (Voigt) or 9")


def _whole(value: Any, what: str, reason: str, minimum: int | None = None) -> int:
    """An integer label (total charge, spin multiplicity) as given: a value that is not a
    whole number, or below ``minimum``, is rejected, never rounded."""
    x = _number(value, what)
    if not math.isfinite(x) or x != round(x) or (minimum is not None and x < minimum):
        expected = "a whole number" + (f" >= {minimum}" if minimum is not None else "")
        raise Rejected(reason, f"{what} = {value!r}, expected {expected}")
    return int(x)


def _scaled(value, factor: float):
    """``value * factor``, skipping the copy for labels already in the schema's units (the
    product by 1.0 is the same number; only NaN payloads could differ, and those are rejected)."""
    return value if factor == 1.0 else value * factor


def to_record(frame: RawFrame, src: SourceConfig, source_id: str,
              factors: LabelFactors | None = None) -> AtomsRecord:
    """Map a raw frame's keys to an AtomsRecord (shape and parse checks only, and the
    whole check of the declared extras).

    Labels are converted to the schema's units (eV, eV/A, eV/A^3 with ASE's sign) with
    ``factors`` (default: those of ``src``'s declared units), extras to their canonical unit.
    """
    f = factors or label_factors(src)
    n = len(frame.numbers)
    numbers = np.asarray(frame.numbers)
    if numbers.ndim != 1 or numbers.dtype.kind not in "iu":  # np.issubdtype(.., np.integer)
        raise Rejected("bad_shape", f"numbers has shape {numbers.shape} and dtype {numbers.dtype}")
    positions = _array(frame.positions, "positions", (n, 3))
    cell = _array(frame.cell, "cell", (3, 3))
    pbc = np.asarray(frame.pbc, dtype=bool).reshape(-1)
    if pbc.shape != (3,):
        raise Rejected("bad_shape", f"pbc has shape {pbc.shape}, expected (3,)")

    energy = _lookup(frame, src.energy_key, "energy", "info")
    forces = _lookup(frame, src.forces_key, "forces", "arrays")
    stress = _lookup(frame, src.stress_key, "stress", "info")
    name_e = src.energy_key or "energy"
    rec = AtomsRecord(
        numbers=numbers,
        positions=positions,
        cell=cell,
        pbc=pbc,
        energy=None if energy is None else _scaled(_number(energy, name_e), f.energy),
        forces=None if forces is None else _scaled(_array(forces, src.forces_key or "forces", (n, 3)), f.forces),
        stress=None if stress is None else _scaled(_voigt(stress, src.stress_key or "stress"), f.stress),
        charge=_whole(frame.info.get(src.charge_key, 0), src.charge_key, "bad_charge"),
        spin=_whole(frame.info.get(src.spin_key, 0), src.spin_key, "bad_spin", minimum=0),
        fidelity=src.fidelity,
        dataset=src.dataset,
        source_id=source_id,
    )
    for spec in src.extras:
        value = _extra(frame, spec, n)
        if value is not None:  # absent: the record has no such extra (the build counts it)
            rec.extras[spec.name] = value
    return rec


def _extra(frame: RawFrame, spec: ExtraConfig, n: int) -> np.ndarray | None:
    """The declared extra ``spec`` of a frame: its layout checked, its values finite and in
    the canonical unit; None when the frame does not have it.

    An extra is checked here, where it is read, and not by the validation screen and full
    checks (structure and energy labels), so they keep one fixed set of arrays to look at.
    """
    key = spec.key
    value = frame.arrays.get(key, frame.info.get(key, frame.calc.get(key)))
    if value is None:
        return None
    try:
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise ValueError(arr.dtype)
    except (TypeError, ValueError):
        raise Rejected("unparseable_value", f"extra {key!r} is not numeric") from None
    if spec.layout_of(arr.shape, n) is None:
        per = "" if spec.per == "auto" else f", per {spec.per}"
        raise Rejected("bad_shape", f"extra {key!r} ({spec.name}{per}) has shape {arr.shape}, "
                                    f"expected {spec.expected(n)}")
    if arr.dtype.kind == "f" or spec.unit is not None:  # known quantities are float64
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise Rejected("non_finite_extras", f"extra {key!r} ({spec.name}) contains NaN or inf")
    return _scaled(arr, extra_factor(spec.name, spec.unit))


def min_pair_distance(rec: AtomsRecord, cutoff: float) -> float | None:
    """Smallest distance below ``cutoff`` between atoms or their periodic images, else None.

    When the cutoff is below every periodic cell height, only atoms within ``cutoff`` of a
    face can meet an image: those are copied across the face (a halo of ghost atoms,
    edges and corners included) and one k-d tree finds every close pair among atoms and
    ghosts. Any such pair is a real pair or an atom and a periodic image, so the check is
    exact, and it costs ~20 us where a general neighbour list costs ~200 us (vesin's
    per-call set-up), which dominated the build. Cutoffs larger than a cell height need
    several image layers: those go to vesin.
    """
    if cutoff <= 0 or rec.n_atoms == 0:
        return None
    points = np.asarray(rec.positions, dtype=np.float64)
    if rec.pbc.any():
        cell = rec.cell if rec.pbc.all() else _complete_cell(rec.cell, rec.pbc)
        inverse = np.linalg.inv(cell)  # columns: reciprocal vectors (no 2 pi)
        heights = 1.0 / np.sqrt((inverse * inverse).sum(axis=0))  # plane spacings
        if (heights[rec.pbc] <= cutoff).any():
            return _min_distance_vesin(rec, cutoff)
        points = _with_halo(points @ inverse, cell, rec.pbc, cutoff / heights)
    from scipy.spatial import cKDTree  # noqa: PLC0415 - scipy comes with ase

    pairs = cKDTree(points).query_pairs(cutoff, output_type="ndarray")
    if not len(pairs):
        return None
    return float(np.linalg.norm(points[pairs[:, 0]] - points[pairs[:, 1]], axis=1).min())


def _complete_cell(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """The cell with the open directions' vectors replaced by unit vectors orthogonal to
    the periodic ones (their length is irrelevant: nothing is copied along them)."""
    cell = np.array(cell, dtype=np.float64)
    periodic = cell[pbc]
    # right singular vectors past the periodic rank span the orthogonal complement
    complement = np.linalg.svd(periodic)[2][len(periodic):]
    cell[~pbc] = complement
    return cell


def _with_halo(frac: np.ndarray, cell: np.ndarray, pbc: np.ndarray, margin: np.ndarray):
    """Atoms (fractional ``frac``) wrapped into the cell plus ghost copies of those within
    ``margin`` (fractional) of a periodic face, in Cartesian coordinates."""
    frac[:, pbc] %= 1.0
    for axis in np.flatnonzero(pbc):
        low = frac[frac[:, axis] < margin[axis]]
        high = frac[frac[:, axis] >= 1.0 - margin[axis]]
        low[:, axis] += 1.0
        high[:, axis] -= 1.0
        frac = np.concatenate([frac, low, high])  # later axes copy these too: corners
    return frac @ cell


def _min_distance_vesin(rec: AtomsRecord, cutoff: float) -> float | None:
    from vesin import NeighborList  # noqa: PLC0415 - imports torch: only where needed

    nl = NeighborList(cutoff=cutoff, full_list=False)
    (d,) = nl.compute(
        points=rec.positions, box=rec.cell, periodic=rec.pbc.tolist(), quantities="d"
    )
    return float(d.min()) if len(d) else None


def check_record(rec: AtomsRecord, limits: ValidationConfig, allow_missing_energy: bool) -> None:
    """Apply the recipe's validation limits; raise Rejected on the first failure.

    Most records are plainly valid: :func:`clearly_valid` proves that with a handful of
    numpy calls, and only the others take the full checks (:func:`check_fully`), which
    alone decide a rejection and its reason. A build screens its records in batches
    (:func:`data_pipeline.build.screen.clearly_valid_many`).
    """
    if not clearly_valid(rec, limits):
        check_fully(rec, limits, allow_missing_energy)


def check_fully(rec: AtomsRecord, limits: ValidationConfig, allow_missing_energy: bool) -> None:
    """Every check in order; raise Rejected on the first failure."""
    n = rec.n_atoms
    if n == 0:
        raise Rejected("empty", "no atoms")
    if n > limits.max_atoms:
        raise Rejected("too_many_atoms", f"{n} atoms > max_atoms={limits.max_atoms}")
    numbers = np.asarray(rec.numbers)
    bad = numbers[(numbers < 1) | (numbers > 118)]
    if bad.size:
        raise Rejected("bad_atomic_number", f"atomic number {int(bad[0])} is outside 1..118")
    if not np.isfinite(rec.positions).all():
        raise Rejected("non_finite_positions", "positions contain NaN or inf")
    far = float(np.abs(rec.positions).max())
    if limits.max_abs_coordinate is not None and far > limits.max_abs_coordinate:
        raise Rejected("coordinate_outlier", f"a coordinate of {far:.4g} A > max_abs_coordinate="
                                             f"{limits.max_abs_coordinate} (a unit or parsing error?)")
    if not np.isfinite(rec.cell).all():
        raise Rejected("non_finite_cell", "cell contains NaN or inf")
    if rec.pbc.any():
        # only the periodic vectors must span their space (a slab may have c = 0)
        vectors = rec.cell[rec.pbc]
        lengths = np.linalg.norm(vectors, axis=1)
        gram = float(np.linalg.det(vectors @ vectors.T))
        if (lengths < 1e-6).any() or gram < 1e-12 * float(np.prod(lengths)) ** 2:
            raise Rejected("degenerate_cell", f"periodic cell vectors {vectors.tolist()} "
                                              f"span no volume (pbc={rec.pbc.tolist()})")
    dmin = min_pair_distance(rec, limits.min_distance)
    if dmin is not None:
        raise Rejected("atoms_too_close", f"distance {dmin:.4f} A < min_distance={limits.min_distance}")
    _check_labels(rec, limits, allow_missing_energy)


def _check_labels(rec: AtomsRecord, limits: ValidationConfig, allow_missing_energy: bool) -> None:
    if rec.energy is None:
        if not allow_missing_energy:
            raise Rejected("missing_energy", "no energy found")
        if rec.forces is None:
            raise Rejected("missing_energy", "neither energy nor forces found")
    elif not np.isfinite(rec.energy):
        raise Rejected("non_finite_energy", f"energy = {rec.energy}")
    if rec.forces is not None and not np.isfinite(rec.forces).all():
        raise Rejected("non_finite_forces", "forces contain NaN or inf")
    if rec.stress is not None and not np.isfinite(rec.stress).all():
        raise Rejected("non_finite_stress", "stress contains NaN or inf")
    bound = limits.max_abs_energy_per_atom
    if bound is not None and rec.energy is not None and abs(rec.energy) / rec.n_atoms > bound:
        raise Rejected("energy_outlier", f"|E|/N = {abs(rec.energy) / rec.n_atoms:.4g} eV > {bound}")
    if limits.max_force is not None and rec.forces is not None:
        fmax = float(np.linalg.norm(rec.forces, axis=1).max())
        if fmax > limits.max_force:
            raise Rejected("force_outlier", f"max |F| = {fmax:.4g} eV/A > {limits.max_force}")
    if limits.max_abs_stress is not None and rec.stress is not None:
        smax = float(np.abs(rec.stress).max())
        if smax > limits.max_abs_stress:
            raise Rejected("stress_outlier", f"max |stress| = {smax:.4g} eV/A^3 > {limits.max_abs_stress}")
