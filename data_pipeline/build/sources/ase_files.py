"""Readers built on ASE: any file ``ase.io`` reads, and ASE databases (``.db``, ``.aselmdb``).

File formats are read sequentially (``ase.io.iread``); a parse failure at frame k keeps
frames ``0..k-1`` and raises :class:`SourceParseError` for the rest. Databases are
random-access, so they are read in row ranges (``start``, ``stop`` over rows in id
order) that the build can spread over workers, and one bad row is reported alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipeline.build.sources.base import FrameError, RawFrame, SourceParseError, frame_from_atoms


def read_ase_file(path: Path, fmt: str | None = None) -> Iterator[tuple[int, RawFrame]]:
    """Frames of any file ``ase.io`` reads (extxyz, traj, cif, vasp OUTCAR, ...)."""
    import ase.io  # noqa: PLC0415 - keep `import data_pipeline` light

    index = 0
    try:
        for atoms in ase.io.iread(str(path), index=":", format=fmt):
            yield index, frame_from_atoms(atoms)
            index += 1
    except Exception as err:  # noqa: BLE001 - any parser failure ends the file here
        raise SourceParseError(index, f"{type(err).__name__}: {err}") from None


def _connect(path: Path, backend: str):
    import ase.db  # noqa: PLC0415

    if backend == "aselmdb":
        try:
            from ase_db_backends.aselmdb import LMDBDatabase  # noqa: PLC0415
        except ImportError as err:  # pragma: no cover - a dependency of the project
            raise SourceParseError(0, f"reading .aselmdb needs ase-db-backends ({err})") from None
        return LMDBDatabase(str(path), readonly=True)
    return ase.db.connect(str(path), type="db", create_indices=False, serial=True)


def count_db_rows(path: Path, backend: str) -> int:
    """Number of rows in an ASE database (cheap: no row is decoded)."""
    db = _connect(path, backend)
    try:
        return db.count()
    finally:
        _close(db)


def _close(db) -> None:
    close = getattr(db, "close", None)
    if close is not None:
        close()


def _frame_from_row(row) -> RawFrame:
    atoms = row.toatoms()
    frame = frame_from_atoms(atoms)
    frame.info.update(row.key_value_pairs)
    n = len(atoms)
    for key, value in (row.get("data") or {}).items():
        arr = np.asarray(value)
        if arr.ndim >= 1 and arr.shape[0] == n and arr.dtype.kind in "biuf":
            frame.arrays[key] = arr
        else:
            frame.info[key] = value
    if "charge" in row and "charge" not in frame.info:
        frame.info["charge"] = row.charge
    return frame


def read_ase_db(
    path: Path, backend: str, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, RawFrame | FrameError]]:
    """Rows ``start..stop-1`` (in id order) of an ASE SQLite db or ASE-LMDB file."""
    db = _connect(path, backend)
    try:
        limit = None if stop is None else stop - start
        rows = db.select(offset=start, limit=limit, sort="id") if backend == "db" else None
        if rows is None:
            rows = _lmdb_rows(db, start, stop)
        index = start
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except Exception as err:  # noqa: BLE001 - the db cannot continue past here
                raise SourceParseError(index, f"{type(err).__name__}: {err}") from None
            try:
                yield index, _frame_from_row(row)
            except Exception as err:  # noqa: BLE001 - one bad row; the rest stay readable
                yield index, FrameError(f"row id {getattr(row, 'id', '?')}: {type(err).__name__}: {err}")
            index += 1
    finally:
        _close(db)


def _lmdb_rows(db, start: int, stop: int | None):
    """Rows of an ASE-LMDB database in id order, by position."""
    ids = sorted(db.ids) if hasattr(db, "ids") else [r.id for r in db.select()]
    for row_id in ids[start:stop]:
        yield db.get(id=row_id)
