"""Durable, atomic file output: a reader (or a run killed at any instant) sees the old file
or the whole new one, never a part, and what was renamed into place survives a power cut.

Every writer of the project that must not leave half a file goes through here: the
manifest, resolved configs, shards and staging files of the build, the edge-count cache
and every file of a training checkpoint.

Durability costs an ``fsync`` per file and per folder touched (milliseconds on a local
disk, more on network file systems): worth it for outputs a job writes once per save.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Callable, Iterator


def fsync_path(path: str | Path) -> None:
    """Flush ``path`` (a file or a folder: a folder's entries, i.e. renames in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_output(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """``with atomic_output(path) as f: ...`` writes ``f`` under a temporary name in the same
    folder, then fsyncs it, renames it onto ``path`` and fsyncs the folder. An exception
    inside the block removes the temporary file and leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically and durably."""
    with atomic_output(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


def replace_atomic(tmp: str | Path, path: str | Path) -> None:
    """Move a finished file ``tmp`` (written by a library under a name of our choosing, in
    ``path``'s folder) onto ``path``: fsync it, rename, fsync the folder."""
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(Path(path).parent)


def fsync_tree(folder: str | Path, include: Callable[[str], bool] | None = None) -> int:
    """fsync the files under ``folder`` (those whose name ``include`` accepts; all by
    default), then every folder below it, ``folder`` itself and its parent (which holds its
    entry), deepest first; returns the number of files flushed."""
    folder = Path(folder)
    files = 0
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            if include is None or include(name):
                fsync_path(Path(root) / name)
                files += 1
        fsync_path(root)
    fsync_path(folder.parent)
    return files
