"""The one atomic writer: whole new content or the old file, never a part or a leftover."""

from __future__ import annotations

import numpy as np
import pytest

from common.atomic import atomic_output, fsync_tree, replace_atomic, write_atomic


def test_write_atomic_text_and_bytes(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_atomic(path, "old\n")
    write_atomic(path, b"new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "counts.npz"
    with atomic_output(path) as f:
        np.savez(f, counts=np.arange(3))
    with pytest.raises(RuntimeError), atomic_output(path) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    with np.load(path) as z:
        assert z["counts"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["counts.npz"]


def test_replace_and_fsync_tree(tmp_path):
    tmp = tmp_path / "x.tmp"
    tmp.write_bytes(b"1")
    replace_atomic(tmp, tmp_path / "x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "y-rank1").write_text("2")
    assert (tmp_path / "x").read_bytes() == b"1" and not tmp.exists()
    assert fsync_tree(tmp_path) == 2
    assert fsync_tree(tmp_path, include=lambda name: "rank1" in name) == 1
