"""What every source reader yields: a light frame, not an ``ase.Atoms``.

Readers turn one raw file (or a row range of a database) into ``(index, RawFrame)`` pairs.
A reader that cannot parse past some frame raises :class:`SourceParseError` carrying that
frame's index after yielding the frames before it; the build keeps those and records the
rest as rejected. A single unreadable row of a random-access source is reported as a
:class:`FrameError` in place of that row's frame, and reading goes on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from common.errors import UserError


@dataclasses.dataclass
class RawFrame:
    """One structure as found in a source, before key mapping and validation.

    Attributes:
        numbers: ``[n]`` atomic numbers (any integer dtype; validated later).
        positions: ``[n, 3]`` Angstrom.
        cell: ``[3, 3]`` rows are lattice vectors (zeros when none).
        pbc: ``[3]`` bool.
        info: per-structure values (``atoms.info``, db key-value pairs).
        arrays: per-atom arrays (``atoms.arrays`` other than numbers/positions).
        calc: calculator results (``energy``, ``forces``, ``stress``, ...), when present.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    calc: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FrameError:
    """A frame that could not be read; the reader continues with the next one."""

    message: str


class SourceParseError(UserError):
    """The file cannot be parsed from frame ``index`` on."""

    def __init__(self, index: int, message: str):
        super().__init__(f"cannot parse from frame {index} on: {message}")
        self.index = index
        self.message = message


def frame_from_atoms(atoms: Any) -> RawFrame:
    """Convert an ``ase.Atoms`` (with an optional single-point calculator) to a RawFrame."""
    calc = {}
    if atoms.calc is not None:
        calc = dict(getattr(atoms.calc, "results", {}) or {})
    arrays = {k: v for k, v in atoms.arrays.items() if k not in ("numbers", "positions")}
    return RawFrame(
        numbers=atoms.arrays["numbers"],
        positions=atoms.arrays["positions"],
        cell=np.asarray(atoms.cell.array, dtype=np.float64),
        pbc=np.asarray(atoms.pbc, dtype=bool),
        info=dict(atoms.info),
        arrays=arrays,
        calc=calc,
    )
