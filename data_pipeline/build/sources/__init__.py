"""Raw inputs: which reader a file needs, and how a recipe's files split into work units.

A work unit is one file, a row range of a database file, or a byte range of a big plain
extended-XYZ file (cut at frame starts, :mod:`data_pipeline.build.sources.splits`), converted
by one task. Units and their order depend only on the recipe and the inputs (never on
the worker count), so the shards built from them are the same whatever the parallelism.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

from data_pipeline.build.recipe import Recipe, expand_sources
from data_pipeline.build.sources.base import FrameError, RawFrame, SourceParseError

__all__ = ["WorkUnit", "plan_units", "read_unit", "resolve_format", "RawFrame", "FrameError",
           "SourceParseError"]

DB_ROWS_PER_UNIT = 50_000
_COMPRESSED = (".gz", ".bz2", ".xz")


@dataclasses.dataclass(frozen=True)
class WorkUnit:
    """One conversion task's input."""

    source: int  # index into recipe.sources
    path: str  # absolute path
    rel: str  # path relative to the recipe root: the prefix of source ids
    fmt: str  # extxyz | ase | db | aselmdb
    start: int = 0  # first row (databases) or byte (a split text file)
    stop: int | None = None  # one past the last row or byte; None: the whole file

    @property
    def byte_range(self) -> bool:
        """True for a byte range of a split text file (frame indices count from ``start``)."""
        return self.stop is not None and self.fmt not in ("db", "aselmdb")

    def frame_id(self, index: int) -> str:
        """The source id of frame ``index``: ``file#index``, or ``file@byte#index`` for the
        units of a split file after the first (frames counted from that byte)."""
        if self.byte_range and self.start:
            return f"{self.rel}@{self.start}#{index}"
        return f"{self.rel}#{index}"


def resolve_format(path: Path, fmt: str) -> str:
    """The reader for ``path`` given the recipe's ``format`` (``auto`` picks by name)."""
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    for ext in _COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    if name.endswith(".db"):
        return "db"
    if name.endswith((".aselmdb", ".lmdb")):
        return "aselmdb"
    if name.endswith((".xyz", ".extxyz")):
        return "extxyz"
    return "ase"


def plan_units(recipe: Recipe) -> list[WorkUnit]:
    """All work units of a recipe in their fixed order (databases split by rows)."""
    from data_pipeline.build.sources.ase_files import count_db_rows  # noqa: PLC0415

    units = []
    for src_index, path, rel in expand_sources(recipe):
        fmt = resolve_format(path, recipe.sources[src_index].format)
        if fmt in ("db", "aselmdb"):
            try:
                rows = count_db_rows(path, fmt)
            except Exception as err:  # noqa: BLE001 - name the file, whatever the backend says
                raise SourceParseError(0, f"{path}: cannot open as {fmt} database ({err})") from None
            for start in range(0, max(rows, 1), DB_ROWS_PER_UNIT):
                stop = min(start + DB_ROWS_PER_UNIT, rows)
                units.append(WorkUnit(src_index, str(path), rel, fmt, start, stop))
        elif fmt == "extxyz" and _splittable(path, recipe.text_unit_bytes):
            from data_pipeline.build.sources.splits import split_points  # noqa: PLC0415

            points = split_points(path, recipe.text_unit_bytes) + [path.stat().st_size]
            units += [WorkUnit(src_index, str(path), rel, fmt, a, b) for a, b in zip(points, points[1:])]
        else:
            units.append(WorkUnit(src_index, str(path), rel, fmt))
    return units


def _splittable(path: Path, unit_bytes: int | None) -> bool:
    """A plain (seekable) text file larger than the unit size."""
    return (unit_bytes is not None and not path.name.lower().endswith(_COMPRESSED)
            and path.stat().st_size > unit_bytes)


def read_unit(unit: WorkUnit) -> Iterator[tuple[int, RawFrame | FrameError]]:
    """Frames of a work unit as ``(index in file, frame)``; see sources.base for errors."""
    path = Path(unit.path)
    if unit.fmt in ("db", "aselmdb"):
        from data_pipeline.build.sources.ase_files import read_ase_db  # noqa: PLC0415

        return read_ase_db(path, unit.fmt, unit.start, unit.stop)
    if unit.fmt == "extxyz":
        from data_pipeline.build.sources.extxyz import read_extxyz  # noqa: PLC0415

        return read_extxyz(path, unit.start, unit.stop) if unit.byte_range else read_extxyz(path)
    from data_pipeline.build.sources.ase_files import read_ase_file  # noqa: PLC0415

    return read_ase_file(path)
