"""Phase 1 of a build: one work unit -> validated, encoded records in the staging folder.

For unit ``k`` the task writes, each atomically, into ``<out>/.build/``:

- ``unit-k.bin``: the encoded records, back to back;
- ``unit-k.index.npy``: ``int64 [n, 3]`` offset, length and atom count of each record;
- ``unit-k.table.npz``: the per-record table (:class:`data_pipeline.build.stats.RecordTable`)
  that statistics (those of the declared extras included) and the reference fit are
  computed from, with the records' structure
  fingerprints (:mod:`data_pipeline.fingerprints`, ``fp_*``) and coverage columns
  (:class:`data_pipeline.build.coverage.CoverageColumns`, ``coverage.*``);
- ``unit-k.join.npy``: for each key the duplicate join groups by
  (:mod:`data_pipeline.build.duplicates`), the records sorted by that key with what the
  join needs of each (:data:`JOIN_DTYPE`, ``[3, n]``), so a join task reads only its key range;
- ``unit-k.rejects.jsonl``: one line per rejected frame;
- ``unit-k.done.json`` last: its presence means the unit is finished, so a rerun after
  a crash skips it.

Nothing here depends on how many tasks run at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.atomic import atomic_output, replace_atomic, write_atomic
from data_pipeline.build.coverage import CoverageColumns
from data_pipeline.build.recipe import SourceConfig, ValidationConfig
from data_pipeline.build.screen import screen_many
from data_pipeline.build.sources import FrameError, SourceParseError, WorkUnit, read_unit
from data_pipeline.build.stats import RecordTable
from data_pipeline.build.units import label_factors
from data_pipeline.build.validate import Rejected, check_fully, to_record
from data_pipeline.fingerprints import KEYS, record_fingerprints
from data_pipeline.schema import AtomsRecord, encode_many


def unit_file(staging: Path, uid: int, suffix: str) -> Path:
    """Staging file ``unit-k<suffix>`` of unit ``uid`` (suffix like ``.bin``)."""
    return Path(staging) / f"unit-{uid:06d}{suffix}"


def _reject(unit: WorkUnit, index: int, reason: str, detail: str) -> dict:
    """A rejects line; frames of a split file's later units also carry the unit's byte offset."""
    line = {"file": unit.rel, "index": index, "reason": reason, "detail": detail}
    if unit.byte_range and unit.start:
        line["offset"] = unit.start
    return line


COVERAGE = "coverage."  # prefix of the coverage columns in the unit's table
JOIN_KEYS = ("fp_exact", "fp_near_a", "fp_near_b")  # keys the duplicate join groups by
JOIN_DTYPE = np.dtype([("key", "<u8"), ("row", "<i8"), ("exact", "<u8"), ("energy", "<f8"),
                       ("n_atoms", "<i8"), ("frame", "<i8")])
_BATCH = 256  # records screened (one vectorised pass), encoded and tabled together


def convert_unit(uid: int, unit: WorkUnit, src: SourceConfig, limits: ValidationConfig,
                 staging: str, strict: bool = False) -> dict:
    """Convert one unit; return its summary (also stored as ``unit-k.done.json``).

    Bad frames never stop the task: each becomes a rejects line. With ``strict`` the task
    stops at its first reject (the driver then reports it and exits non-zero).
    """
    done = unit_file(staging, uid, ".done.json")
    if done.exists():
        return json.loads(done.read_text())
    factors = label_factors(src)  # label units -> eV, eV/A, eV/A^3 (ASE sign), once per unit
    tmp_bin = unit_file(staging, uid, ".bin.tmp")
    with open(tmp_bin, "wb") as out:
        batch = _Batch(unit, src, limits, out)
        frames, size = 0, 1 if strict else _BATCH  # strict: stop right after the first reject
        try:
            for i, frame in read_unit(unit):
                frames += 1
                if strict and batch.rejects:
                    break
                if isinstance(frame, FrameError):
                    batch.pending.append((i, _reject(unit, i, "unreadable_frame", frame.message)))
                else:
                    try:
                        batch.pending.append((i, to_record(frame, src, unit.frame_id(i), factors)))
                    except Rejected as err:
                        batch.pending.append((i, _reject(unit, i, err.reason, err.detail)))
                    except Exception as err:  # noqa: BLE001 - odd data must not stop a build
                        batch.pending.append((i, _unreadable(unit, i, err)))
                if len(batch.pending) >= size:
                    batch.flush()
        except SourceParseError as err:
            batch.flush()
            batch.rejects.append(_reject(unit, err.index, "parse_error", err.message))
        batch.flush()
    index, rejects = batch.index, batch.rejects
    _store(staging, uid, tmp_bin, index, batch.table, rejects, batch.fingerprints, batch.coverage)
    summary = {"records": len(index), "atoms": int(sum(r[2] for r in index)), "frames": frames,
               "rejects": len(rejects),
               "first_reject": rejects[0] if rejects else None}
    write_atomic(done, json.dumps(summary))
    return summary


def _unreadable(unit: WorkUnit, index: int, err: Exception) -> dict:
    return _reject(unit, index, "unreadable_frame", f"{type(err).__name__}: {err}")


class _Batch:
    """Frames of a unit on their way out, in file order: records and rejects lines."""

    def __init__(self, unit: WorkUnit, src: SourceConfig, limits: ValidationConfig, out):
        self.unit, self.src, self.limits, self.out = unit, src, limits, out
        self.pending: list[tuple[int, object]] = []  # (frame index, AtomsRecord or rejects line)
        self.table, self.rejects, self.index, self.offset = RecordTable(src.extras), [], [], 0
        self.fingerprints: dict[str, list] = {key: [] for key in KEYS}
        self.coverage = CoverageColumns()

    def flush(self) -> None:
        """Validate the pending records (the screen for the batch, the full checks for
        those it does not clear), encode and write the valid ones, all in frame order."""
        recs = [rec for _, rec in self.pending if not isinstance(rec, dict)]
        try:  # the screen's nearest-neighbour distances go to the coverage statistics
            screened = zip(*(a.tolist() for a in screen_many(recs, self.limits)))
        except Exception:  # noqa: BLE001 - a record the screen cannot stack: the full checks judge each
            screened = iter([(False, float("nan"))] * len(recs))
        kept: list[tuple[int, AtomsRecord]] = []
        nearest: list[float] = []
        for i, rec in self.pending:
            if isinstance(rec, dict):
                self.rejects.append(rec)
                continue
            clear, near = next(screened)
            if not clear:
                try:
                    check_fully(rec, self.limits, self.src.allow_missing_energy)
                except Rejected as err:
                    self.rejects.append(_reject(self.unit, i, err.reason, err.detail))
                    continue
                except Exception as err:  # noqa: BLE001 - odd data must not stop a build
                    self.rejects.append(_unreadable(self.unit, i, err))
                    continue
            kept.append((i, rec))
            nearest.append(near)
        bufs = encode_many([rec for _, rec in kept])
        for buf, (_, rec) in zip(bufs, kept):
            self.index.append((self.offset, len(buf), rec.n_atoms))
            self.offset += len(buf)
        self.out.write(b"".join(bufs))
        for key, values in record_fingerprints([rec for _, rec in kept]).items():
            self.fingerprints[key].append(values)
        self.table.add_many([i for i, _ in kept], [rec.numbers for _, rec in kept],
                            [rec.energy for _, rec in kept], [rec.forces for _, rec in kept],
                            [rec.stress for _, rec in kept], [rec.extras for _, rec in kept])
        self.coverage.add_many([rec for _, rec in kept], nearest)
        self.pending.clear()


def _store(staging: str, uid: int, tmp_bin: Path, index, table, rejects, fingerprints, coverage) -> None:
    """Move the unit's outputs into place, each atomically (``done`` is written after all)."""
    idx = np.asarray(index, dtype=np.int64).reshape(-1, 3)
    keys = {k: np.concatenate(v) if v else np.zeros(0, np.uint64) for k, v in fingerprints.items()}
    columns = table.to_arrays()
    join = np.zeros((len(JOIN_KEYS), len(idx)), JOIN_DTYPE)
    for i, key in enumerate(JOIN_KEYS):
        order = np.argsort(keys[key], kind="stable")
        rows = join[i]
        rows["key"], rows["row"], rows["exact"] = keys[key][order], order, keys["fp_exact"][order]
        rows["energy"], rows["n_atoms"], rows["frame"] = columns["energy"][order], idx[order, 2], columns["frame"][order]
    with atomic_output(unit_file(staging, uid, ".join.npy")) as f:
        np.save(f, join, allow_pickle=False)
    replace_atomic(tmp_bin, unit_file(staging, uid, ".bin"))
    with atomic_output(unit_file(staging, uid, ".index.npy")) as f:
        np.save(f, idx, allow_pickle=False)
    with atomic_output(unit_file(staging, uid, ".table.npz")) as f:  # one file: one fsync
        np.savez(f, **columns, **keys, **{COVERAGE + k: v for k, v in coverage.to_arrays().items()})
    write_atomic(unit_file(staging, uid, ".rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in rejects))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Arrays of a staging ``.npz`` (never with pickle)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
