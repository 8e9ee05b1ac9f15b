"""Phase 1 of a build: one work unit -> validated, encoded records in the staging folder.

For unit ``k`` the task writes, each atomically, into ``<out>/.build/``:

- ``unit-k.bin``: the encoded records, back to back;
- ``unit-k.index.npy``: ``int64 [n, 3]`` offset, length and atom count of each record;
- ``unit-k.stats.npz`` / ``unit-k.energy.npz``: GroupStats and the energy table;
- ``unit-k.rejects.jsonl``: one line per rejected frame;
- ``unit-k.done.json`` last: its presence means the unit is finished, so a rerun after
  a crash skips it.

Nothing here depends on how many tasks run at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_pipeline.atomic import atomic_output, replace_atomic, write_atomic
from data_pipeline.recipe import SourceConfig, ValidationConfig
from data_pipeline.schema import encode
from data_pipeline.sources import FrameError, SourceParseError, WorkUnit, read_unit
from data_pipeline.stats import EnergyTable, GroupStats
from data_pipeline.validate import Rejected, check_record, to_record


def unit_file(staging: Path, uid: int, suffix: str) -> Path:
    """Staging file ``unit-k<suffix>`` of unit ``uid`` (suffix like ``.bin``)."""
    return Path(staging) / f"unit-{uid:06d}{suffix}"


def _reject(unit: WorkUnit, index: int, reason: str, detail: str) -> dict:
    return {"file": unit.rel, "index": index, "reason": reason, "detail": detail}


def convert_unit(uid: int, unit: WorkUnit, src: SourceConfig, limits: ValidationConfig,
                 staging: str, strict: bool = False) -> dict:
    """Convert one unit; return its summary (also stored as ``unit-k.done.json``).

    Bad frames never stop the task: each becomes a rejects line. With ``strict`` the task
    stops at its first reject (the driver then reports it and exits non-zero).
    """
    done = unit_file(staging, uid, ".done.json")
    if done.exists():
        return json.loads(done.read_text())
    stats, table, rejects, index = GroupStats(), EnergyTable(), [], []
    tmp_bin = unit_file(staging, uid, ".bin.tmp")
    with open(tmp_bin, "wb") as out:
        try:
            for i, frame in read_unit(unit):
                if strict and rejects:
                    break
                if isinstance(frame, FrameError):
                    rejects.append(_reject(unit, i, "unreadable_frame", frame.message))
                    continue
                try:
                    rec = to_record(frame, src, f"{unit.rel}#{i}")
                    check_record(rec, limits, src.allow_missing_energy)
                except Rejected as err:
                    rejects.append(_reject(unit, i, err.reason, err.detail))
                    continue
                except Exception as err:  # noqa: BLE001 - odd data must not stop a build
                    rejects.append(_reject(unit, i, "unreadable_frame", f"{type(err).__name__}: {err}"))
                    continue
                buf = encode(rec)
                index.append((out.tell(), len(buf), rec.n_atoms))
                out.write(buf)
                stats.add(rec.numbers, rec.energy, rec.forces, rec.stress)
                if rec.energy is not None:
                    table.add(rec.numbers, rec.energy)
        except SourceParseError as err:
            rejects.append(_reject(unit, err.index, "parse_error", err.message))
    _store(staging, uid, tmp_bin, index, stats, table, rejects)
    summary = {"records": len(index), "atoms": stats.atoms, "rejects": len(rejects),
               "first_reject": rejects[0] if rejects else None}
    write_atomic(done, json.dumps(summary))
    return summary


def _store(staging: str, uid: int, tmp_bin: Path, index, stats, table, rejects) -> None:
    """Move the unit's outputs into place, each atomically (``done`` is written after all)."""
    idx = np.asarray(index, dtype=np.int64).reshape(-1, 3)
    replace_atomic(tmp_bin, unit_file(staging, uid, ".bin"))
    with atomic_output(unit_file(staging, uid, ".index.npy")) as f:
        np.save(f, idx, allow_pickle=False)
    with atomic_output(unit_file(staging, uid, ".stats.npz")) as f:
        np.savez(f, **stats.to_arrays())
    with atomic_output(unit_file(staging, uid, ".energy.npz")) as f:
        np.savez(f, **table.to_arrays())
    write_atomic(unit_file(staging, uid, ".rejects.jsonl"), "".join(json.dumps(r) + "\n" for r in rejects))


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Arrays of a staging ``.npz`` (never with pickle)."""
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
