"""Byte-range work units of big plain-text (extended XYZ) files.

A file of millions of frames is one unit of work per ``text_unit_bytes`` slice, so one
file spreads over many workers. The planner seeks to each nominal split offset, reads a
small window, and moves forward to the next frame start, recognised as a line holding
only an atom count ``n`` whose chain continues: the line ``n + 2`` lines later is again
a lone count (or the file ends), and so is the one after that. An atom line never is a
lone integer, and a comment line that happens to be one would have to predict two atom
counts to pass, so the check costs one window read per split and no scan of the file.
A unit whose range ends inside a frame reads as a ``parse_error`` (never silently), so a
wrong split could not lose frames unseen.

Split points depend only on the file's bytes and the unit size: the same inputs give the
same units, whatever the worker count.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

_WINDOW = 1 << 16  # first read at a split point; grows x4 while three frames are longer
# (the driver splits every window into lines: 1 MiB windows cost ~5 ms a split point)
_MAX_WINDOW = 1 << 28


def _count(line: bytes) -> int | None:
    s = line.strip()
    return int(s) if s.isdigit() else None


def _chain(lines: list[bytes], j: int, at_eof: bool) -> bool | None:
    """True when lines[j] starts three chained frames (or ones that end the file);
    None when the window is too short to tell."""
    k = j
    for _ in range(3):
        if k >= len(lines):
            return True if at_eof else None
        n = _count(lines[k])
        if n is None:
            return at_eof and not any(x.strip() for x in lines[k:])  # blank tail of the file
        k += n + 2
    return True


def next_frame_start(f, target: int, size: int) -> int | None:
    """Byte offset of the first frame starting at or after ``target`` (None: none)."""
    window = _WINDOW
    f.seek(target - 1)
    at_line_start = f.read(1) == b"\n"
    while window <= _MAX_WINDOW:
        f.seek(target)
        data = f.read(window)
        at_eof = target + len(data) >= size
        lines = data.split(b"\n")
        if not at_eof:
            lines.pop()  # a partial last line
        offset, first = 0, 0
        if not at_line_start:  # the first piece is the tail of a line begun before target
            offset, first = len(lines[0]) + 1, 1
        undecided = False
        for j in range(first, len(lines)):
            if _count(lines[j]) is not None:
                ok = _chain(lines, j, at_eof)
                if ok:
                    return target + offset
                if ok is None:
                    undecided = True
                    break
            offset += len(lines[j]) + 1
        if not undecided and at_eof:
            return None
        window *= 4
    return None


def split_points(path: str | Path, unit_bytes: int) -> list[int]:
    """Start offsets of the units of ``path`` (the first is 0), about ``unit_bytes`` apart."""
    size = os.path.getsize(path)
    points = [0]
    with open(path, "rb") as f:
        for target in range(unit_bytes, size, unit_bytes):
            p = next_frame_start(f, target, size)
            if p is not None and points[-1] < p < size:
                points.append(p)
    return points


class _Window(io.RawIOBase):
    """Bytes ``[start, stop)`` of a file as a raw stream."""

    def __init__(self, path: str | Path, start: int, stop: int):
        self.f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.f.seek(start)
        self.left = stop - start

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.f.readinto(memoryview(buf)[: max(0, min(len(buf), self.left))])
        self.left -= n
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def open_window(path: str | Path, start: int, stop: int):
    """Text stream of bytes ``[start, stop)`` of ``path``, decoded as ``open(path, "rt")`` does."""
    return io.TextIOWrapper(io.BufferedReader(_Window(path, start, stop), 1 << 20), newline=None)
