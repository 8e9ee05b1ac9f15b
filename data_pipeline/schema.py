"""The record: one structure as stored in a shard, and its pickle-free binary encoding.

Encoding (version 1), little-endian::

    b"MLPR" | u16 version | u32 header length H | header: H bytes of UTF-8 JSON | payload

The JSON header holds the strings and integers (fidelity, dataset, source_id, charge,
spin) and a table ``[key, dtype, shape, offset]`` for every array; the payload holds
the raw array bytes, each starting on an 8-byte boundary. Decoding only ever calls
``json.loads`` and ``np.frombuffer`` with dtypes from a fixed allow-list, so a record read
from an untrusted shard cannot execute code, and every value round-trips bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import struct
import sys
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any

import numpy as np

from common.errors import UserError

SCHEMA_VERSION = 1
MAGIC = b"MLPR"
_PREFIX = struct.Struct("<4sHI")

# dtypes a payload may declare; anything else is refused when decoding.
_ALLOWED_DTYPES = {
    code: np.dtype(code if code in ("u1", "i1", "b1") else "<" + code)
    for code in ("u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8", "b1")
}
# fixed storage dtype and per-atom trailing shape of the core arrays (None: any length)
CORE_ARRAYS = {
    "numbers": ("u1", ()),
    "positions": ("f8", (3,)),
    "cell": ("f8", None),
    "pbc": ("b1", None),
    "forces": ("f4", (3,)),
    "stress": ("f4", None),
}


class RecordError(UserError, ValueError):
    """Bytes that are not a valid record, or a record with inconsistent fields."""


@dataclasses.dataclass
class AtomsRecord:
    """One structure with its labels (see ARCHITECTURE.md, "The record").

    Attributes:
        numbers: ``uint8 [n]`` atomic numbers.
        positions: ``float64 [n, 3]`` Cartesian positions in Angstrom.
        cell: ``float64 [3, 3]`` lattice vectors as rows; zeros allowed when no pbc.
        pbc: ``bool [3]`` periodic directions.
        energy: total energy in eV, or None when the structure is unlabelled.
        forces: ``float32 [n, 3]`` eV/Angstrom, or None.
        stress: ``float32 [6]`` Voigt (xx, yy, zz, yz, xz, xy), eV/Angstrom^3, ASE sign
            convention, or None.
        charge: total charge in units of e.
        spin: spin multiplicity 2S+1 (0 when unknown / not applicable).
        fidelity: level-of-theory label, e.g. ``"PBE"``.
        dataset: dataset name from the recipe.
        source_id: stable id inside the source, e.g. ``"pbe/a.extxyz#17"``.
        extras: further per-atom or per-structure targets, name -> array.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    charge: int = 0
    spin: int = 0
    fidelity: str = ""
    dataset: str = ""
    source_id: str = ""
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        """Number of atoms."""
        return int(len(self.numbers))

    def to_dict(self) -> dict[str, Any]:
        """The record as a dict of numpy arrays and scalars with the schema's keys."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _array_bytes(arr: np.ndarray, key: str, offset: int) -> tuple[list, bytes]:
    arr = np.asarray(arr, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
    code = arr.dtype.str.lstrip("<>|=")
    if code not in _ALLOWED_DTYPES:
        raise RecordError(f"array {key!r} has dtype {arr.dtype}, which records cannot store")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    data = arr.tobytes()
    pad = (-len(data)) % 8
    return [key, code, list(arr.shape), offset], data + b"\0" * pad


def pack(header: dict[str, Any], arrays: list[tuple[str, np.ndarray]]) -> bytes:
    """The container both records and shard metadata use: JSON header + raw arrays."""
    table, chunks, offset = [], [], 0
    for key, arr in arrays:
        entry, data = _array_bytes(arr, key, offset)
        table.append(entry)
        chunks.append(data)
        offset += len(data)
    head = json.dumps({**header, "arrays": table}, separators=(",", ":")).encode()
    head += b" " * ((-(_PREFIX.size + len(head))) % 8)
    return _PREFIX.pack(MAGIC, SCHEMA_VERSION, len(head)) + head + b"".join(chunks)


def unpack(buf: bytes | memoryview, where: str = "record") -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of :func:`pack`: the JSON header and the arrays (copied out of ``buf``)."""
    buf = memoryview(buf)
    if len(buf) < _PREFIX.size:
        raise RecordError(f"{where}: {len(buf)} bytes is too short to be a record")
    magic, version, hlen = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise RecordError(f"{where}: not a record (bad magic {bytes(magic)!r})")
    if version != SCHEMA_VERSION:
        raise RecordError(
            f"{where}: record schema version {version}, this code reads {SCHEMA_VERSION}; "
            "rebuild the shards or upgrade mlip-pretrain"
        )
    start = _PREFIX.size + hlen
    try:
        header = json.loads(bytes(buf[_PREFIX.size:start]))
        payload = buf[start:]
        arrays = {}
        for key, code, shape, offset in header.pop("arrays"):
            dtype = _ALLOWED_DTYPES.get(code)
            if dtype is None:
                raise RecordError(f"{where}: array {key!r} declares dtype {code!r}")
            count = math.prod(shape)
            arr = np.frombuffer(payload, dtype=dtype, count=count, offset=offset)
            arrays[key] = arr.reshape(tuple(shape)).copy()  # copy: the buffer may be an LMDB txn's
    except RecordError:
        raise
    except (UnicodeDecodeError, KeyError, ValueError, TypeError) as err:
        raise RecordError(f"{where}: corrupt record ({type(err).__name__}: {err})") from None
    return header, arrays


def encode(rec: AtomsRecord) -> bytes:
    """Serialise a record to bytes (no pickle). Core arrays are cast to their schema dtype.

    A record with the shapes a build gives and no extras takes :func:`encode_many`'s path,
    which writes the same bytes as :func:`pack` (tests compare the two) for a fraction of
    its cost: the build encodes every record once, and the generic path was a sixth of a
    build's CPU.
    """
    if _bulk_plain(rec):
        return encode_many([rec])[0]
    arrays: list[tuple[str, np.ndarray]] = []
    for key, (dtype, _) in CORE_ARRAYS.items():
        value = getattr(rec, key)
        if value is not None:
            arrays.append((key, np.asarray(value, dtype=dtype)))
    if rec.energy is not None:
        arrays.append(("energy", np.asarray(rec.energy, dtype="f8")))
    for name in sorted(rec.extras):
        arrays.append(("extras." + name, np.asarray(rec.extras[name])))
    header = {
        "fidelity": rec.fidelity,
        "dataset": rec.dataset,
        "source_id": rec.source_id,
        "charge": int(rec.charge),
        "spin": int(rec.spin),
    }
    return pack(header, arrays)


_LITTLE_ENDIAN = sys.byteorder == "little"  # native dtypes are then the stored "<" ones


def encode_many(recs: list[AtomsRecord]) -> list[bytes]:
    """:func:`encode` of each record (the same bytes), casting a batch's arrays together.

    Records with the shapes a build gives (``numbers [n]`` of an integer dtype,
    ``positions``/``forces [n, 3]``, ``cell [3, 3]``, ``pbc [3]``, ``stress [6]``), string
    names and no extras are cast to their stored dtypes in one call per field for the
    whole batch, and each record's bytes are cut from those; the header's array table
    depends only on the atom count and which labels are present, so it is made once per
    such layout. Other records take :func:`encode`.
    """
    out: list[bytes] = [b""] * len(recs)
    bulk = []
    for k, rec in enumerate(recs):
        if _bulk_plain(rec):
            bulk.append(k)
        else:
            out[k] = encode(rec)
    if not bulk:
        return out
    batch = [recs[k] for k in bulk]

    def cast(values: list, dtype: str, per_atom: bool) -> bytes:
        if not values:
            return b""
        joined = np.concatenate(values) if per_atom else np.array(values)
        return joined.astype(dtype, copy=False).tobytes()  # the per-record casts, in one

    numbers = cast([rec.numbers for rec in batch], "u1", True)
    positions = cast([rec.positions for rec in batch], "f8", True)
    cells = cast([rec.cell for rec in batch], "f8", False)
    pbcs = cast([rec.pbc for rec in batch], "b1", False)
    forces = cast([rec.forces for rec in batch if rec.forces is not None], "f4", True)
    stresses = cast([rec.stress for rec in batch if rec.stress is not None], "f4", False)
    energies = cast([rec.energy for rec in batch if rec.energy is not None], "f8", False)
    strings: dict[str, str] = {}
    atom = forced = stressed = energised = 0
    for j, (k, rec) in enumerate(zip(bulk, batch)):
        n = len(rec.numbers)
        has_f, has_s, has_e = rec.forces is not None, rec.stress is not None, rec.energy is not None
        table, pad_n, pad_f = _bulk_layout(n, has_f, has_s, has_e)
        parts = [numbers[atom:atom + n], pad_n, positions[24 * atom:24 * (atom + n)],
                 cells[72 * j:72 * j + 72], pbcs[3 * j:3 * j + 3], b"\0" * 5]
        if has_f:
            parts += [forces[12 * forced:12 * (forced + n)], pad_f]
            forced += n
        if has_s:
            parts.append(stresses[24 * stressed:24 * stressed + 24])
            stressed += 1
        if has_e:
            parts.append(energies[8 * energised:8 * energised + 8])
            energised += 1
        atom += n
        names_json = strings.get(rec.fidelity + "\0" + rec.dataset)
        if names_json is None:
            names_json = f'"fidelity":{_json_str(rec.fidelity)},"dataset":{_json_str(rec.dataset)}'
            strings[rec.fidelity + "\0" + rec.dataset] = names_json
        head = (f'{{{names_json},"source_id":{_json_str(rec.source_id)},"charge":{int(rec.charge)},'
                f'"spin":{int(rec.spin)},"arrays":{table}}}').encode()
        head += b" " * ((-(_PREFIX.size + len(head))) % 8)
        out[k] = _PREFIX.pack(MAGIC, SCHEMA_VERSION, len(head)) + head + b"".join(parts)
    return out


def _bulk_plain(rec: AtomsRecord) -> bool:
    """A record :func:`encode_many` casts with its batch (see there)."""
    n = len(rec.numbers)
    return (not rec.extras and _LITTLE_ENDIAN
            and type(rec.fidelity) is str and type(rec.dataset) is str and type(rec.source_id) is str
            and isinstance(rec.numbers, np.ndarray) and rec.numbers.dtype.kind in "iu"
            and rec.numbers.ndim == 1 and shape_of(rec.positions) == (n, 3)
            and shape_of(rec.cell) == (3, 3) and shape_of(rec.pbc) == (3,)
            and (rec.forces is None or shape_of(rec.forces) == (n, 3))
            and (rec.stress is None or shape_of(rec.stress) == (6,)))


def shape_of(value) -> tuple[int, ...]:
    """``np.shape(value)``, read straight off an ndarray (np.shape costs 0.5 us a call)."""
    return value.shape if type(value) is np.ndarray else np.shape(value)


@functools.lru_cache(maxsize=4096)
def _bulk_layout(n: int, has_forces: bool, has_stress: bool, has_energy: bool) -> tuple[str, bytes, bytes]:
    """The header's array table of a plain record, and the padding after its numbers and
    its forces (every array starts on an 8-byte boundary; positions, cell and stress fill
    whole words, pbc is padded by 5)."""
    shapes = [("numbers", "u1", (n,), n), ("positions", "f8", (n, 3), 24 * n),
              ("cell", "f8", (3, 3), 72), ("pbc", "b1", (3,), 3)]
    if has_forces:
        shapes.append(("forces", "f4", (n, 3), 12 * n))
    if has_stress:
        shapes.append(("stress", "f4", (6,), 24))
    if has_energy:
        shapes.append(("energy", "f8", (), 8))
    entries, offset = [], 0
    for key, code, shape, size in shapes:
        entries.append(f'["{key}","{code}",[{",".join(map(str, shape))}],{offset}]')
        offset += size + (-size) % 8
    return f"[{','.join(entries)}]", b"\0" * ((-n) % 8), b"\0" * ((-12 * n) % 8)


def decode(buf: bytes | memoryview, where: str = "record") -> AtomsRecord:
    """Parse bytes written by :func:`encode`; ``where`` names the record in errors."""
    header, arrays = unpack(buf, where)
    extras = {k[7:]: v for k, v in arrays.items() if k.startswith("extras.")}
    values = {k: v for k, v in arrays.items() if not k.startswith("extras.")}
    energy = values.pop("energy", None)
    try:
        return AtomsRecord(
            energy=None if energy is None else float(energy),
            charge=int(header["charge"]),
            spin=int(header["spin"]),
            fidelity=header["fidelity"],
            dataset=header["dataset"],
            source_id=header["source_id"],
            extras=extras,
            **values,
        )
    except (KeyError, TypeError) as err:
        raise RecordError(f"{where}: corrupt record ({type(err).__name__}: {err})") from None
