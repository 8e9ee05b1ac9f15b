"""The fast extended-XYZ reader gives exactly what ase.io + frame_from_atoms gives."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.build.sources.ase_files import read_ase_file
from data_pipeline.build.sources.base import SourceParseError
from data_pipeline.build.sources.extxyz import read_extxyz


def _same(a, b, where: str) -> None:
    """Equal values of equal types (np.float64 is not float, int32 is not int64)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"  # nan == nan here


def _assert_same_frames(expected, got) -> None:
    assert [i for i, _ in got] == [i for i, _ in expected]
    for (i, ref), (_, new) in zip(expected, got):
        for field in ("numbers", "positions", "cell", "pbc", "info", "arrays", "calc"):
            _same(getattr(ref, field), getattr(new, field), f"frame {i} {field}")


def _read_all(reader, path: Path):
    """Frames until the end or the first SourceParseError (returned alongside)."""
    frames = []
    try:
        for item in reader(path):
            frames.append(item)
    except SourceParseError as err:
        return frames, err
    return frames, None


def _random_frames(count: int, seed: int = 0):
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for k in range(count):
        n = int(rng.integers(5, 40))
        kind = k % 3  # periodic, molecule, slab (mixed pbc)
        atoms = Atoms(numbers=rng.integers(1, 90, n), positions=rng.uniform(0, 8, (n, 3)))
        if kind != 1:
            atoms.cell = np.diag(rng.uniform(8, 12, 3)) + rng.uniform(-0.5, 0.5, (3, 3))
            atoms.pbc = [True, True, True] if kind == 0 else [True, False, True]
        atoms.info.update(
            REF_energy=float(rng.normal() * 50), label=f"structure {k} of set A", step=int(k),
            converged=bool(k % 2), dipole_ref=rng.normal(size=3), virial=rng.normal(size=(3, 3)),
            nine=rng.normal(size=9), ints=np.arange(4) * k, tensor=rng.normal(size=(3, 3)),
        )
        atoms.arrays["REF_forces"] = rng.normal(size=(n, 3))
        atoms.arrays["magmoms"] = rng.normal(size=n)
        atoms.arrays["site_id"] = rng.integers(-5, 5, n)
        atoms.arrays["fixed"] = rng.integers(0, 2, n).astype(bool)
        results = {"energy": float(rng.normal() * 100), "forces": rng.normal(size=(n, 3))}
        if kind == 0:
            results["stress"] = rng.normal(size=6) * 0.01
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    import ase.io

    path = tmp_path_factory.mktemp("extxyz") / "mixed.extxyz"
    ase.io.write(path, _random_frames(24), format="extxyz")
    return path


@pytest.mark.parametrize("compression", ["", ".gz", ".bz2"])
def test_matches_ase(written, tmp_path, compression):
    path = written
    if compression == ".gz":
        path = tmp_path / "mixed.extxyz.gz"
        path.write_bytes(gzip.compress(written.read_bytes()))
    elif compression == ".bz2":
        import bz2

        path = tmp_path / "mixed.extxyz.bz2"
        path.write_bytes(bz2.compress(written.read_bytes()))
    expected = list(read_ase_file(path))
    got = list(read_extxyz(path))
    assert len(got) == 24
    _assert_same_frames(expected, got)
    first = got[0][1]
    assert set(first.calc) == {"energy", "forces", "stress", "magmoms"}
    assert {"REF_forces", "site_id", "fixed"} <= set(first.arrays)
    assert first.info["virial"].shape == (3, 3) and isinstance(first.info["step"], np.int64)


def test_chunk_boundaries_do_not_matter(written, monkeypatch):
    from data_pipeline.build.sources import extxyz

    monkeypatch.setattr(extxyz, "_CHUNK_CHARS", 37)  # lines and frames split across reads
    _assert_same_frames(list(read_ase_file(written)), list(read_extxyz(written)))


FRAME = '2\r\nenergy=1.5 pbc="T T F"\r\nH 0 0 0\r\nhe 1 1 1\r\n'


@pytest.mark.parametrize(
    "text",
    [
        FRAME * 3,  # CRLF
        FRAME.replace("\r\n", "\r") * 2,  # old Mac line ends
        (FRAME * 2).rstrip(),  # no final newline
        FRAME * 2 + "\n\n  \n",  # trailing blank lines
        FRAME + "\n" + FRAME,  # ASE stops at a blank line where a count is expected
        "0\n\n0\nenergy=1\n" + FRAME,  # empty frames
        "1\nenergy=2\u00a0a=3\nH\u2003 0 0 0\n",  # Unicode whitespace
    ],
)
def test_line_ends_and_blank_lines_match_ase(tmp_path, text):
    path = tmp_path / "f.xyz"
    path.write_bytes(text.encode())
    expected, err = _read_all(read_ase_file, path)
    assert err is None
    _assert_same_frames(expected, list(read_extxyz(path)))


COMMENTS = [
    "plain xyz comment, with words and = signs a = b",
    'a=1 b=2.5 c="1 2 3" d="1.5 2 3" e=T f="T F T" g=hello h="with spaces" uid=42 i=1,2,3',
    "flag1 flag2 x = 3 y= 4 z =5 w=\"quoted \\\"escape\\\" here\" v='single q' u={1 2 3} t=[4 5 6]",
    'n=nan p=inf q=-Infinity r=1e5 s=1_000 big=123456789012345678901234 e2="" e3=  k=v',
    'Lattice="10 0 0 0 11 0 0 0 12" pbc="F T F" energy=-3 free_energy=-3.5 magmom=2 stress="1 2 3 4 5 6 7 8 9"',
    'Lattice="5 0 0 0 5 0 0 0 5" pbc=T virial="1 2 3 4 5 6 7 8 9" dipole="0.1 0.2 0.3" TRUE=FALSE',
    'j="_JSON [[1, 2], [3, 4]]" js="_JSON [\\"a\\", \\"b\\"]" jd="_JSON {\\"x\\": 1}" Properties=species:S:1:pos:R:3',
    'a=1 a=2 "quoted key"=7 trailing\\',
    'Lattice="3.5 0 0 0 3.5 0 0 0 3.5" energy=2 uid=x7 stress="1,2,3,4,5,6,7,8,9.5"',
]


@pytest.mark.parametrize("comment", COMMENTS)
def test_comment_lines_match_ase(tmp_path, comment):
    path = tmp_path / "c.xyz"
    atoms = "2\n{}\nsi 0.0 0.0 0.0\nO 1.0 1.0 1.5\n"
    path.write_text(atoms.format(comment) + atoms.format("energy=1.5 Properties=species:S:1:pos:R:3"))
    expected, err = _read_all(read_ase_file, path)
    assert err is None
    got, err = _read_all(read_extxyz, path)
    assert err is None
    _assert_same_frames(expected, got)


def test_more_property_types_match_ase(tmp_path):
    path = tmp_path / "p.extxyz"
    spec = "Properties=species:S:1:pos:R:3:Z:I:1:tags:I:1:move_mask:L:3:charge:R:1:names:S:2:vec:I:2"
    lines = ["3", f'Lattice="4 0 0 0 4 0 0 0 4" {spec} energy=1'] + [
        f"X {i} {i}.5 -{i} {z} {i - 1} T F T 0.{i} ab{i} cd {i} {2 * i}" for i, z in zip(range(3), (1, 6, 8))
    ]
    path.write_text("\n".join(lines + ["0", "Properties=species:S:1:pos:R:3 empty=T", ""]))
    expected, err = _read_all(read_ase_file, path)
    assert err is None
    got, _ = _read_all(read_extxyz, path)
    _assert_same_frames(expected, got)
    assert got[0][1].numbers.tolist() == [1, 6, 8] and len(got[1][1].numbers) == 0


def test_truncated_file_keeps_earlier_frames(written, tmp_path):
    lines = written.read_text().splitlines(keepends=True)
    starts, i = [], 0
    while i < len(lines):
        starts.append(i)
        i += int(lines[i]) + 2
    for cut_frame, cut_at in ((5, starts[5] + 1), (5, starts[6] - 3), (23, len(lines) - 1)):
        path = tmp_path / f"cut{cut_frame}.extxyz"
        path.write_text("".join(lines[:cut_at]) + lines[cut_at][:7])  # a partial last line
        got, err = _read_all(read_extxyz, path)
        assert [k for k, _ in got] == list(range(cut_frame))
        assert err is not None and err.index == cut_frame
        _assert_same_frames(list(read_ase_file(written))[:cut_frame], got)


def _corrupt(written: Path, tmp_path: Path, frame: int, edit) -> Path:
    lines = written.read_text().splitlines()
    i = 0
    for _ in range(frame):
        i += int(lines[i]) + 2
    edit(lines, i)
    path = tmp_path / "bad.extxyz"
    path.write_text("\n".join(lines) + "\n")
    return path


def _forces_column(line: str) -> int:
    spec = line.split("Properties=")[1].split()[0].split(":")
    column = 0
    for name, cols in zip(spec[::3], spec[2::3]):
        if name == "forces":
            return column
        column += int(cols)
    raise AssertionError("no forces column")


def _set_token(lines, at, column, text):
    tokens = lines[at].split()
    tokens[column] = text
    lines[at] = " ".join(tokens)


@pytest.mark.parametrize(
    "edit, expect",
    [
        (lambda lines, i: _set_token(lines, i + 4, _forces_column(lines[i + 1]) + 1, "abc"), "'abc' is not a valid real"),
        (lambda lines, i: lines.__setitem__(i, "seven"), "expected an atom count"),
        (lambda lines, i: _set_token(lines, i + 3, 0, "Qx"), "is not a valid element"),
        (lambda lines, i: lines.__setitem__(i + 5, " ".join(lines[i + 5].split()[:-2])), "columns, found"),
        (lambda lines, i: lines.__setitem__(i + 1, lines[i + 1] + ' stress="1 2 3"'), "bad comment line"),
    ],
)
def test_bad_frame_raises_at_its_index(written, tmp_path, edit, expect):
    path = _corrupt(written, tmp_path, 3, edit)
    got, err = _read_all(read_extxyz, path)
    assert [k for k, _ in got] == [0, 1, 2]
    assert err is not None and err.index == 3 and expect in err.message, err
    assert "line " in err.message


def test_missing_file():
    with pytest.raises(SourceParseError) as info:
        list(read_extxyz(Path("/nonexistent/none.extxyz")))
    assert info.value.index == 0


def test_declined_frames_are_read_by_ase_with_right_indices(written, tmp_path):
    # Integer positions are legal for ASE (it converts them) but left to ASE here.
    def integer_positions(lines, i):
        n = int(lines[i])
        lines[i + 1] = 'Properties=species:S:1:pos:I:3 note="read by ase"'
        for k in range(n):
            lines[i + 2 + k] = f"{lines[i + 2 + k].split()[0]} {k} {2 * k} {3 * k}"

    path = _corrupt(written, tmp_path, 2, integer_positions)
    expected = list(read_ase_file(path))
    got, err = _read_all(read_extxyz, path)
    assert err is None and len(got) == 24
    _assert_same_frames(expected, got)
    assert got[2][1].positions.dtype == np.float64 and got[2][1].info == {"note": "read by ase"}

    # A failure after the hand-over still carries the index of the failing frame.
    lines = path.read_text().splitlines()
    i = 0
    for _ in range(4):
        i += int(lines[i]) + 2
    _set_token(lines, i + 2, 1, "abc")
    path.write_text("\n".join(lines) + "\n")
    got, err = _read_all(read_extxyz, path)
    assert [k for k, _ in got] == [0, 1, 2, 3]
    assert err is not None and err.index == 4 and "ase.io" in err.message


def test_vec_lines_are_read_by_ase(tmp_path):
    path = tmp_path / "vec.xyz"
    frame = "2\nenergy=1.0\nH 0 0 0\nH 0 0 0.7\n"
    vec = "2\ncell as VEC lines\nH 0 0 0\nH 0 0 0.7\nVEC1 5 0 0\nVEC2 0 5 0\nVEC3 0 0 5\n"
    path.write_text(frame + vec + frame)
    expected = list(read_ase_file(path))
    got, err = _read_all(read_extxyz, path)
    assert err is None
    _assert_same_frames(expected, got)
    assert got[1][1].pbc.all() and got[1][1].cell[2, 2] == 5.0


def test_ase_tables_are_the_installed_ases():
    """The reader keeps ASE's where-values-land tables as constants (so reading a file does
    not import ase.io); they must be those of the ASE it is checked against."""
    from ase.calculators.calculator import all_properties
    from ase.io import extxyz

    from data_pipeline.build.sources.extxyz import _ASE_TABLES

    assert _ASE_TABLES == {
        "all_properties": set(all_properties), "per_config": set(extxyz.per_config_properties),
        "rename": dict(extxyz.REV_PROPERTY_NAME_MAP), "special": set(extxyz.SPECIAL_3_3_KEYS),
        "unprocessed": set(extxyz.UNPROCESSED_KEYS),
    }


def test_reading_does_not_import_ase_io(written):
    """A build worker reads extxyz without ase.io's ~0.8 s import (it falls back to ASE only
    for the constructs the fast path leaves to it)."""
    import subprocess
    import sys

    code = ("import sys; from data_pipeline.build.sources.extxyz import read_extxyz; "
            f"n = sum(1 for _ in read_extxyz({str(written)!r})); "
            "print(n, 'ase.io' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3]).stdout.split()
    assert int(out[0]) > 0 and out[1] == "False"
