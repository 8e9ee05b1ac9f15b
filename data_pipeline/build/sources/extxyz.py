"""Fast extended-XYZ reader: the frames ``ase.io`` would give, without building ``ase.Atoms``.

:func:`read_extxyz` yields the same :class:`RawFrame` objects as ``ase.io.iread(path,
index=":")`` followed by :func:`frame_from_atoms` (ASE 3.29 semantics: comment-line
key=value parsing, ``Lattice``/``pbc``/``Properties``, which keys become calculator
results, dtypes), several times faster: the file is read in large chunks, the comment line
goes through a small tokenizer, and the real columns of an atom block are converted in one
pass. ASE's own quirks are kept: a blank line where a count is expected ends the file,
columns beyond the ``Properties`` spec are ignored, and a logical value other than
T/F/True/False reads as False.

Where it differs from ``ase.io`` on purpose: a bad frame k raises
:class:`SourceParseError` with index k after frames ``0..k-1`` were yielded (ASE checks
every count line before yielding anything). Constructs it leaves alone (``VEC`` cell
lines, negative atom counts, unusual ``Properties`` specs) hand the rest of the file to ASE.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import itertools
import lzma
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from data_pipeline.build.sources.base import RawFrame, SourceParseError, frame_from_atoms
from data_pipeline.build.sources.extxyz_comment import parse_comment

_CHUNK_CHARS = 1 << 22  # ~4 MB of text per read: few calls, bounded memory on huge files
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}  # chosen by suffix, as ASE
_DEFAULT_PROPERTIES = "species:S:1:pos:R:3"

_COLUMN_BOOLS = {"T": True, "F": False, "True": True, "False": False}  # others read as False
_CONVERT = {  # per column, as ASE's int / parse_bool / str converters into its structured dtype
    "I": lambda tokens: np.array(list(map(int, tokens)), dtype=np.int32),
    "L": lambda tokens: np.array(list(map(_COLUMN_BOOLS.get, tokens)), dtype=bool),
    "S": lambda tokens: np.array(tokens, dtype=object),
}
_VOIGT = np.array([0, 4, 8, 5, 2, 1])  # xx yy zz yz xz xy in a flattened 3x3
_KEPT_AS_IS = ("energy", "magmom", "free_energy")  # SinglePointCalculator leaves these be

# ASE's tables that decide where values land (ase 3.29's ase.calculators.calculator and
# ase.io.extxyz), kept here so that reading a file does not import ase.io: that import
# (spacegroups, scipy.integrate, ...) costs ~0.8 s, paid by every build worker before its
# first unit. tests/data_pipeline/test_extxyz.py checks them against the installed ASE.
_ASE_TABLES: dict[str, Any] = {
    "all_properties": {"energy", "forces", "stress", "stresses", "dipole", "charges", "magmom",
                       "magmoms", "free_energy", "energies", "dielectric_tensor",
                       "born_effective_charges", "polarization"},
    "per_config": {"energy", "free_energy", "stress", "dipole", "magmom", "polarization",
                   "dielectric_tensor"},
    "rename": {"pos": "positions", "Z": "numbers", "charge": "charges", "species": "symbols"},
    "special": {"Lattice", "stress", "virial"},
    "unprocessed": {"uid"},
}
_ase_tables: dict[str, Any] = {}
_z_by_token: dict[str, int] = {}


class _Unsupported(Exception):
    """The fast path declines frame ``args[0]``; ASE reads the file from there on."""


class _Spec:
    """A parsed ``Properties`` string: per property (ase name, type, first column, columns).

    Real columns are converted together, so the spec also lists the other columns to drop
    from a block's tokens (highest first) and each real property's place among the reals.
    """

    def __init__(self, props: list[tuple[str, str, int, int]]):
        self.ncol = sum(p[3] for p in props)
        self.names = {p[0] for p in props}
        self.others = [p for p in props if p[1] != "R"]
        self.drop = sorted((c for _, _, s, n in self.others for c in range(s, s + n)), reverse=True)
        self.nreal = self.ncol - len(self.drop)
        offsets = itertools.accumulate((p[3] for p in props if p[1] == "R"), initial=0)
        self.reals = [(p[0], o, p[3]) for p, o in zip((p for p in props if p[1] == "R"), offsets)]
        self.props = props


def read_extxyz(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, RawFrame]]:
    """Frames of an extended-XYZ file (plain, .gz, .bz2 or .xz).

    With ``stop``, only the frames in bytes ``[start, stop)`` of a plain file, where
    ``start`` is a frame start (:mod:`data_pipeline.build.sources.splits`); indices then count
    from that frame.
    """
    window = None if stop is None else (start, stop)
    try:
        yield from _fast_frames(Path(path), window)
    except _Unsupported as declined:
        yield from _ase_frames(Path(path), declined.args[0], window)


def _ase_frames(path: Path, start: int, window=None) -> Iterator[tuple[int, RawFrame]]:
    """Frames ``start..`` read by ASE, for files the fast path declines."""
    import io  # noqa: PLC0415

    import ase.io  # noqa: PLC0415 - keep `import data_pipeline` light

    index = start
    source = str(path)
    if window is not None:  # ASE reads a whole stream: hand it the unit's bytes only
        from data_pipeline.build.sources.splits import open_window  # noqa: PLC0415

        with open_window(path, *window) as fd:
            source = io.StringIO(fd.read())
    try:
        for atoms in ase.io.iread(source, index=f"{start}:", format="extxyz"):
            yield index, frame_from_atoms(atoms)
            index += 1
    except Exception as err:  # noqa: BLE001 - any parser failure ends the file here
        raise SourceParseError(index, f"(read by ase.io) {type(err).__name__}: {err}") from None


def _ase() -> dict[str, Any]:
    """ASE's own tables that decide where values land, with its element table (imported
    once, on first use: ``ase.data`` is light)."""
    if not _ase_tables:
        from ase.data import atomic_numbers  # noqa: PLC0415

        _ase_tables.update(_ASE_TABLES, atomic_numbers=dict(atomic_numbers))
    return _ase_tables


class _Lines:
    """Lines of a text file without newlines, read in large chunks.

    ``have(n)`` makes ``lines[pos:pos + n]`` available if the file has that many lines
    left; ``lineno`` is the 1-based line number of ``lines[pos]`` in the file.
    """

    def __init__(self, fd):
        self.fd, self.lines, self.pos, self.lineno = fd, [], 0, 1
        self._tail, self._eof = "", False

    def have(self, n: int) -> bool:
        while len(self.lines) - self.pos < n and not self._eof:
            text = self.fd.read(_CHUNK_CHARS)
            pieces = (self._tail + text).split("\n")
            self._tail = pieces.pop() if text else ""
            if not text:
                self._eof = True
                if pieces[-1] == "":  # the file ended with a newline: no further line
                    pieces.pop()
            self.lines = self.lines[self.pos:] + pieces
            self.pos = 0
        return len(self.lines) - self.pos >= n


def _fast_frames(path: Path, window=None) -> Iterator[tuple[int, RawFrame]]:
    opener = _OPENERS.get(path.suffix, open)
    try:
        if window is not None:
            from data_pipeline.build.sources.splits import open_window  # noqa: PLC0415

            fd = open_window(path, *window)
        else:  # text mode: universal newlines and the locale encoding, as ASE
            fd = opener(path, "rt")
    except OSError as err:
        raise SourceParseError(0, f"{type(err).__name__}: {err}") from None
    tables = _ase()
    with fd:
        src, index = _Lines(fd), 0
        while True:
            try:
                frame = _next_frame(src, index, tables)
            except (SourceParseError, _Unsupported):
                raise
            except Exception as err:  # noqa: BLE001 - undecodable text, corrupt archive, ...
                message = f"line {src.lineno}: {type(err).__name__}: {err}"
                raise SourceParseError(index, message) from None
            if frame is None:
                return
            yield index, frame
            index += 1


def _next_frame(src: _Lines, index: int, tables: dict[str, Any]) -> RawFrame | None:
    """The frame at the current line, or None at the end of the file."""
    if not src.have(1) or not src.lines[src.pos].strip():
        return None  # like ASE, a blank line where a count is expected ends the file
    lineno, head = src.lineno, src.lines[src.pos]
    try:
        natoms = int(head)
    except ValueError:
        message = f"line {lineno}: expected an atom count, got {head[:60]!r}"
        raise SourceParseError(index, message) from None
    if natoms < 0:
        raise _Unsupported(index)
    src.have(natoms + 3)
    lines, pos = src.lines, src.pos
    if len(lines) - pos < natoms + 2:
        got = max(len(lines) - pos - 2, 0)
        message = f"line {lineno}: {natoms} atoms, but the file ends after {got} atom lines"
        raise SourceParseError(index, message)
    if len(lines) - pos > natoms + 2 and lines[pos + natoms + 2].lstrip().startswith("VEC"):
        raise _Unsupported(index)  # ASE's cell-vector lines: rare, left to ASE
    try:
        info = parse_comment(lines[pos + 1].strip(), tables)
        properties = info.pop("Properties", _DEFAULT_PROPERTIES)
        if not isinstance(properties, str):  # e.g. Properties=1, where ASE fails too
            raise ValueError(f"Properties must be a string, got {properties!r}")
        spec = _parse_spec(properties)
    except Exception as err:  # noqa: BLE001 - whatever ASE would also fail on
        message = f"line {lineno + 1}: bad comment line: {type(err).__name__}: {err}"
        raise SourceParseError(index, message) from None
    if spec is None:
        raise _Unsupported(index)
    block = lines[pos + 2:pos + 2 + natoms]
    try:
        values = _convert_block(_tokens(block, spec, index, lineno + 2), natoms, spec)
    except (ValueError, OverflowError, KeyError) as err:
        where = _locate(_tokens(block, spec, index, lineno + 2), spec, lineno + 2)
        where = where or f"lines {lineno + 2}-{lineno + 1 + natoms}: {err}"
        raise SourceParseError(index, where) from None
    try:
        frame = _assemble(info, values, tables)
    except Exception as err:  # noqa: BLE001 - e.g. a pbc value of the wrong length
        raise SourceParseError(index, f"line {lineno + 1}: {type(err).__name__}: {err}") from None
    src.pos += natoms + 2
    src.lineno += natoms + 2
    return frame


@functools.lru_cache(maxsize=1024)
def _parse_spec(properties: str) -> _Spec | None:
    """The parsed spec (cached); None for specs left to ASE; ValueError where ASE fails."""
    fields, rename = properties.split(":"), _ase()["rename"]
    ncols = [int(x) for x in fields[2::3]]
    if len(fields) % 3:
        return None  # ASE silently drops the incomplete last triplet
    props, columns = [], []
    for name, kind, cols in zip(fields[::3], fields[1::3], ncols):
        if kind not in "RISL" or len(kind) != 1:
            raise ValueError(f"unknown property type {kind!r}")
        if cols < 1:
            raise ValueError(f"property {name} has {cols} columns")
        columns.extend([name] if cols == 1 else [f"{name}{c}" for c in range(cols)])
        props.append((rename.get(name, name), kind, len(columns) - cols, cols))
    if len(set(columns)) != len(columns):
        raise ValueError(f"repeated column names in {properties!r}")
    kinds = {name: (kind, cols) for name, kind, _, cols in props}
    if kinds.get("move_mask", ("L", 1))[1] not in (1, 3):
        raise ValueError("move_mask must have 1 or 3 columns")
    plain = (
        len(kinds) == len(props) and all(fields[::3])
        and kinds.get("positions") == ("R", 3)
        and kinds.get("numbers", ("I", 1)) == ("I", 1)
        and kinds.get("symbols", ("S", 1)) == ("S", 1)
        and ("numbers" in kinds or "symbols" in kinds)
        and kinds.get("initial_charges", ("R", 1)) == ("R", 1)
    )
    return _Spec(props) if plain else None


def _tokens(lines: list[str], spec: _Spec, index: int, first: int) -> list[str]:
    """The tokens of an atom block, row by row; too few columns is an error, extra ones
    are ignored (as ASE does)."""
    rows = list(map(str.split, lines))
    if set(map(len, rows)) - {spec.ncol}:
        for i, row in enumerate(rows):
            if len(row) < spec.ncol:
                message = f"line {first + i}: expected {spec.ncol} columns, found {len(row)}"
                raise SourceParseError(index, message)
        rows = [row[: spec.ncol] for row in rows]
    return list(itertools.chain.from_iterable(rows))


def _convert_block(tokens: list[str], n: int, spec: _Spec) -> dict[str, np.ndarray]:
    """Per-property arrays (ASE names) of an atom block; atomic numbers under "numbers"."""
    ncol, values = spec.ncol, {}
    for name, kind, start, cols in spec.others:
        if name == "symbols":
            if "numbers" not in spec.names:
                values["numbers"] = _numbers(tokens[start::ncol])
        elif cols == 1:
            values[name] = _CONVERT[kind](tokens[start::ncol])
        else:
            values[name] = np.stack([_CONVERT[kind](tokens[start + c::ncol]) for c in range(cols)], axis=1)
    if "numbers" in spec.names:
        values["numbers"] = values["numbers"].astype(int)
    stride = ncol
    for col in spec.drop:  # leaves the real columns, row by row (the caller's list)
        del tokens[col::stride]
        stride -= 1
    reals = np.fromiter(map(float, tokens), dtype=np.float64, count=len(tokens))
    reals = reals.reshape(n, spec.nreal)
    for name, offset, cols in spec.reals:
        part = reals[:, offset] if cols == 1 else reals[:, offset:offset + cols]
        values[name] = part if cols == spec.nreal else part.copy()  # own memory, as in ASE
    return values


def _numbers(symbols: list[str]) -> np.ndarray:
    """Atomic numbers of species tokens, capitalised first as ASE does ("SI" is Si)."""
    try:
        return np.array(list(map(_z_by_token.__getitem__, symbols)), dtype=int)
    except KeyError:
        table = _ase()["atomic_numbers"]
        for symbol in symbols:
            if symbol not in _z_by_token:
                _z_by_token[symbol] = table[symbol.capitalize()]  # KeyError: unknown element
        return np.array(list(map(_z_by_token.__getitem__, symbols)), dtype=int)


def _locate(tokens: list[str], spec: _Spec, first: int) -> str | None:
    """Where a block failed to convert, for the error message."""
    for at in range(len(tokens)):
        row, col = divmod(at, spec.ncol)
        name, kind, _, _ = next(p for p in spec.props if p[2] <= col < p[2] + p[3])
        try:
            if name == "symbols" and "numbers" not in spec.names:
                _numbers([tokens[at]])
            else:
                float(tokens[at]) if kind == "R" else _CONVERT[kind]([tokens[at]])
        except (ValueError, OverflowError, KeyError):
            what = "element" if name == "symbols" else {"R": "real", "I": "int32"}[kind]
            return f"line {first + row}, column {col + 1} ({name}): {tokens[at]!r} is not a valid {what}"
    return None


def _assemble(info: dict[str, Any], values: dict[str, np.ndarray], tables: dict[str, Any]) -> RawFrame:
    """The RawFrame that ASE's Atoms + SinglePointCalculator would give for these values."""
    pbc = np.zeros(3, dtype=bool)
    if "pbc" in info:
        pbc[:] = info.pop("pbc")  # same broadcasting as Atoms.pbc (a single T means all)
    elif "Lattice" in info:
        pbc[:] = True  # ASE's default for a file with a Lattice
    cell = np.array(info.pop("Lattice").T, dtype=float) if "Lattice" in info else np.zeros((3, 3))
    numbers, positions = values.pop("numbers"), values.pop("positions")
    values.pop("move_mask", None)  # becomes constraints in ASE, which RawFrame does not keep
    arrays, results = {}, {}
    if "initial_charges" in values:
        arrays["initial_charges"] = values.pop("initial_charges")
    for name, value in values.items():
        (results if name in tables["all_properties"] else arrays)[name] = value
    for key in [key for key in info if key in tables["per_config"]]:
        value = info.pop(key)
        if key == "stress" and getattr(value, "shape", None) == (3, 3):
            value = np.take(value, _VOIGT)  # ASE stores stress in Voigt order
        results[key] = value
    calc = {k: v if k in _KEPT_AS_IS else np.array(v, dtype=float) for k, v in results.items()}
    return RawFrame(numbers=numbers, positions=positions, cell=cell, pbc=pbc,
                    info=info, arrays=arrays, calc=calc)
