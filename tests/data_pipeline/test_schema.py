"""Record encoding: bit-exact round trip, no pickle, clear errors on foreign bytes."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.schema import SCHEMA_VERSION, AtomsRecord, RecordError, decode, encode


def _record(rng, n=5, **kw):
    base = dict(
        numbers=rng.integers(1, 119, n).astype(np.uint8),
        positions=rng.normal(size=(n, 3)) * 3,
        cell=rng.normal(size=(3, 3)),
        pbc=np.array([True, False, True]),
        energy=float(rng.normal() * 1e4),
        forces=rng.normal(size=(n, 3)).astype(np.float32),
        stress=rng.normal(size=6).astype(np.float32),
        charge=-2, spin=3, fidelity="wB97M-V/def2-TZVPD", dataset="spice-ünïcode",
        source_id="a/b.xyz#17",
        extras={"magmoms": rng.normal(size=n), "dipole": rng.normal(size=3), "flags": np.arange(n)},
    )
    base.update(kw)
    return AtomsRecord(**base)


def _assert_same(a: AtomsRecord, b: AtomsRecord):
    for key in ("numbers", "positions", "cell", "pbc", "forces", "stress"):
        x, y = getattr(a, key), getattr(b, key)
        if x is None:
            assert y is None
            continue
        assert x.tobytes() == np.asarray(y).tobytes() and x.shape == y.shape, key
    assert (a.energy is None and b.energy is None) or np.float64(a.energy).tobytes() == np.float64(b.energy).tobytes()
    assert (a.charge, a.spin, a.fidelity, a.dataset, a.source_id) == (b.charge, b.spin, b.fidelity, b.dataset, b.source_id)
    assert a.extras.keys() == b.extras.keys()
    for k in a.extras:
        assert a.extras[k].dtype == b.extras[k].dtype and a.extras[k].tobytes() == b.extras[k].tobytes()


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_is_bit_exact(seed):
    rng = np.random.default_rng(seed)
    rec = _record(rng, n=int(rng.integers(1, 40)))
    back = decode(encode(rec))
    _assert_same(rec, back)
    assert back.numbers.dtype == np.uint8 and back.positions.dtype == np.float64
    assert back.forces.dtype == np.float32 and back.stress.dtype == np.float32


def test_optional_labels_absent_and_special_values():
    rng = np.random.default_rng(0)
    rec = _record(rng, energy=None, forces=None, stress=None, extras={})
    back = decode(encode(rec))
    assert back.energy is None and back.forces is None and back.stress is None and back.extras == {}
    rec = _record(rng, energy=-0.0)
    assert np.signbit(decode(encode(rec)).energy)


def test_foreign_bytes_are_refused_clearly():
    import pickle

    with pytest.raises(RecordError, match="bad magic"):
        decode(pickle.dumps({"numbers": [1]}), where="shard-00000.lmdb#3")
    good = bytearray(encode(_record(np.random.default_rng(1))))
    good[4:6] = (SCHEMA_VERSION + 1).to_bytes(2, "little")
    with pytest.raises(RecordError, match="schema version"):
        decode(bytes(good))
    with pytest.raises(RecordError, match="too short"):
        decode(b"MLP")
    bad = encode(_record(np.random.default_rng(1))).replace(b'"f8"', b'"O8"', 1)
    with pytest.raises(RecordError, match="dtype"):
        decode(bad)


def _generic_encode(rec: AtomsRecord) -> bytes:
    """encode() spelled with the generic container, as it was before its fast path."""
    from data_pipeline.schema import CORE_ARRAYS, pack

    arrays = [(key, np.asarray(getattr(rec, key), dtype=dtype)) for key, (dtype, _) in CORE_ARRAYS.items()
              if getattr(rec, key) is not None]
    if rec.energy is not None:
        arrays.append(("energy", np.asarray(rec.energy, dtype="f8")))
    arrays += [("extras." + k, np.asarray(rec.extras[k])) for k in sorted(rec.extras)]
    header = {"fidelity": rec.fidelity, "dataset": rec.dataset, "source_id": rec.source_id,
              "charge": int(rec.charge), "spin": int(rec.spin)}
    return pack(header, arrays)


@pytest.mark.parametrize("seed", range(3))
def test_fast_encoding_writes_the_generic_bytes(seed):
    rng = np.random.default_rng(seed)
    for k in range(200):
        n = int(rng.integers(0, 30))
        rec = _record(rng, n=n, extras={} if k % 4 else {"m": rng.normal(size=n)},
                      numbers=rng.integers(1, 119, n),  # int64: cast on encoding
                      positions=rng.normal(size=(3, n)).T if k % 3 == 0 else rng.normal(size=(n, 3)).astype(">f8"),
                      energy=None if k % 5 == 0 else float(rng.normal()) * (k % 7 != 0),
                      forces=None if k % 6 == 0 else rng.normal(size=(n, 3)),
                      stress=None if k % 2 else rng.normal(size=6), spin=np.int64(k % 3),
                      source_id=f'dir/ß "q".xyz@{k}#{k}')
        assert encode(rec) == _generic_encode(rec), k


@pytest.mark.parametrize("seed", range(2))
def test_batch_encoding_writes_each_records_bytes(seed):
    """encode_many gives encode's bytes for every record of a mixed batch: plain records
    cast together, with and without labels, and the odd ones (extras, other shapes)."""
    from data_pipeline.schema import encode_many

    rng = np.random.default_rng(seed)
    recs = []
    for k in range(120):
        n = int(rng.integers(0, 30))
        recs.append(_record(
            rng, n=n, extras={} if k % 9 else {"m": rng.normal(size=n)},
            numbers=rng.integers(1, 119, n) if k % 2 else rng.integers(1, 119, n).astype(np.uint8),
            positions=rng.normal(size=(3, n)).T if k % 3 == 0 else rng.normal(size=(n, 3)).astype(">f8"),
            cell=rng.normal(size=(3, 3)).astype(np.float32) if k % 11 == 0 else rng.normal(size=(3, 3)),
            pbc=np.array([k % 2, 1, 0], dtype=bool), energy=None if k % 5 == 0 else float(rng.normal()),
            forces=None if k % 6 == 0 else rng.normal(size=(n, 3)) * (1 + 1e-7 * k),
            stress=None if k % 4 == 1 else rng.normal(size=(3, 3)) if k % 13 == 0 else rng.normal(size=6),
            charge=np.int64(k % 3 - 1), fidelity="PBE" if k % 7 else "wB97M-V", source_id=f'd/ß"{k}#{k}'))
    assert encode_many(recs) == [encode(rec) for rec in recs]
    assert encode_many(recs[:1]) == [encode(recs[0])] and encode_many([]) == []
