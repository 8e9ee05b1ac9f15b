"""Duplicates, label conflicts and pairing across fidelities, found after the conversion.

Every conversion task stages its records sorted by each fingerprint
(:mod:`data_pipeline.fingerprints`; ``unit-k.join.npy``, :data:`~data_pipeline.build.convert.JOIN_DTYPE`).
The join splits the 64-bit key space into equal ranges, one Ray task per range
(:data:`JOIN_RECORDS` records each on average, so a task's memory is bounded whatever the
dataset's size); a task reads only its range of each unit (a binary search in a memory
map) and groups equal keys. Keys are uniform hashes, so the ranges balance.

What the exact-key tasks find, per fidelity (a record's *first* is the earliest record of
its group in the build's global order: units in recipe order, then records in file order):

- **exact duplicates**: records after the first of the same structure at the same
  fidelity, split into *within a dataset* (an earlier copy in the same dataset) and
  *across datasets*;
- **label conflicts**: a structure at one fidelity whose copies disagree: energies per
  atom spread by more than ``conflict_energy_tolerance`` or forces (compared atom by atom
  in the fingerprint's canonical order) by more than ``conflict_force_tolerance``. Each
  goes to ``conflicts.jsonl`` with its members and spread;
- **pairing across fidelities**: structures present at more than one fidelity (expected
  in multi-fidelity data), counted per pair of fidelities.

The near-key tasks flag records that share ``near_a`` or ``near_b`` with a record of a
different exact key at the same fidelity (near duplicates that are not exact copies).

The recipe's ``duplicates`` (``keep_all`` | ``keep_first``) and ``conflicts`` (``keep`` |
``drop`` | ``fail``) say what happens: dropped records go to ``rejects.jsonl`` with reason
``duplicate`` (naming the copy kept) or ``label_conflict``; a conflict under ``fail`` stops
the build naming its records. Records the reference audit already rejected take no part.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import mmap
from pathlib import Path

import numpy as np

from data_pipeline.build.convert import JOIN_DTYPE, JOIN_KEYS, unit_file
from data_pipeline.fingerprints import MATCH_TOLERANCE, match_atoms
from data_pipeline.schema import decode

JOIN_RECORDS = 500_000  # records per join task on average (about 150 MB of memory each, measured)
EXAMPLES = 10  # groups named in the manifest


@dataclasses.dataclass
class UnitInfo:
    """What a join task needs to know of a unit."""

    uid: int
    first_gid: int  # global id of the unit's first staged record
    records: int
    fidelity: int
    dataset: int
    file: str


@dataclasses.dataclass
class Policy:
    """The recipe's choices and tolerances."""

    duplicates: str = "keep_all"
    conflicts: str = "keep"
    energy_tolerance: float = 1e-3  # eV/atom
    force_tolerance: float = 1e-2  # eV/A


def key_ranges(total_records: int) -> list[tuple[int, int]]:
    """Equal ranges ``[lo, hi)`` of the 64-bit key space, one per join task."""
    parts = max(1, math.ceil(total_records / JOIN_RECORDS))
    edges = [(p << 64) // parts for p in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _slice(path: Path, kind: str, lo: int, hi: int, only: np.ndarray | None = None) -> np.ndarray:
    """The rows of a unit's join file sorted by ``kind`` with ``lo <= key < hi``, or with a
    key in the sorted array ``only`` (read from a memory map: a binary search, then the slice)."""
    rows = np.load(path, mmap_mode="r", allow_pickle=False)[JOIN_KEYS.index(kind)]
    if not len(rows):
        return np.zeros(0, JOIN_DTYPE)
    keys = rows["key"]
    if only is not None:
        a, b = np.searchsorted(keys, only, "left"), np.searchsorted(keys, only, "right")
        picks = [np.arange(i, j) for i, j in zip(a.tolist(), b.tolist()) if j > i]
        return np.array(rows[np.concatenate(picks)]) if picks else np.zeros(0, JOIN_DTYPE)
    a = int(np.searchsorted(keys, np.uint64(lo))) if lo > 0 else 0
    b = int(np.searchsorted(keys, np.uint64(hi))) if hi < 1 << 64 else len(rows)
    return np.array(rows[a:b])


def _gather(kind: str, lo: int, hi: int, units: list[UnitInfo], staging: str, excluded: np.ndarray,
            only: np.ndarray | None = None, skip: np.ndarray | None = None):
    """The key range's records of every unit (or those with a key in ``only``; never those
    with a key in ``skip``), sorted by key, then fidelity, then global id, as columns."""
    parts, owner = [], []
    for i, u in enumerate(units):
        if u.records:
            rows = _slice(unit_file(staging, u.uid, ".join.npy"), kind, lo, hi, only)
            parts.append(rows)
            owner.append(np.full(len(rows), i, np.int64))
    rows = np.concatenate(parts) if parts else np.zeros(0, JOIN_DTYPE)
    unit = np.concatenate(owner) if owner else np.zeros(0, np.int64)
    first = np.array([u.first_gid for u in units], np.int64)
    gid = first[unit] + rows["row"]
    keep = ~np.isin(gid, excluded) if len(excluded) else np.ones(len(gid), bool)
    if skip is not None and len(skip):
        keep &= ~np.isin(rows["key"], skip)
    rows, unit, gid = rows[keep], unit[keep], gid[keep]
    fid = np.array([u.fidelity for u in units], np.int64)[unit]
    order = np.lexsort((gid, fid, rows["key"]))
    return rows[order], unit[order], gid[order], fid[order]


_BLOCK = 2000  # runs whose records are decoded together (memory: their records only)


def _decode_many(units: list[UnitInfo], staging: str, wanted: list[tuple[int, int]]) -> dict:
    """The staged records ``(unit index, row)`` of ``wanted``, decoded, each unit opened
    once (its index read, its ``.bin`` mapped)."""
    out: dict = {}
    by_unit: dict[int, list[int]] = collections.defaultdict(list)
    for u, row in set(wanted):
        by_unit[u].append(row)
    for u, rows in sorted(by_unit.items()):
        uid = units[u].uid
        index = np.load(unit_file(staging, uid, ".index.npy"), mmap_mode="r", allow_pickle=False)
        with open(unit_file(staging, uid, ".bin"), "rb") as f:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                for row in sorted(rows):
                    off, length, _ = (int(v) for v in index[row])
                    out[(u, row)] = decode(mm[off:off + length], where=f"{units[u].file} record {row}")
    return out


def _runs(*columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths of the runs of equal consecutive rows over ``columns``."""
    n = len(columns[0])
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.zeros(n, bool)
    change[0] = True
    for c in columns:
        change[1:] |= c[1:] != c[:-1]
    starts = np.flatnonzero(change)
    return starts, np.diff(np.append(starts, n))


def join_task(kind: str, lo: int, hi: int, units: list[UnitInfo], staging: str, excluded: np.ndarray,
              policy: Policy, fidelities: list[str], datasets: list[str],
              remap: tuple[np.ndarray, np.ndarray] | None = None, remapped_only: bool = False) -> dict:
    """Group one key range; see the module docstring.

    Near keys: the exact keys found to be the same structure (:func:`match_atoms` on
    decoded records) and the members of near groups. Exact keys: counts, examples, the
    global ids to drop with their rejects lines, and the conflicts. ``remap`` (sorted raw
    exact keys, their class's key) merges exact keys the near tasks matched; those rows
    are grouped by the one task with ``remapped_only``, and skipped by the others."""
    if kind != "fp_exact":
        rows, unit, gid, fid = _gather(kind, lo, hi, units, staging, excluded)
        return _near_groups(rows, unit, gid, fid, units, staging)
    raw, rep = remap if remap is not None else (np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    if remapped_only:
        rows, unit, gid, fid = _gather(kind, 0, 1 << 64, units, staging, excluded, only=raw)
        rows["key"] = rep[np.searchsorted(raw, rows["key"])]
        order = np.lexsort((gid, fid, rows["key"]))
        rows, unit, gid, fid = rows[order], unit[order], gid[order], fid[order]
    else:
        rows, unit, gid, fid = _gather(kind, lo, hi, units, staging, excluded, skip=raw)
    return _exact_groups(rows, unit, gid, fid, units, staging, policy, fidelities, datasets)


MAX_CLASSES = 64  # exact keys of one near group compared with each other, at most


def _near_groups(rows, unit, gid, fid, units, staging) -> dict:
    """Runs of one near key holding several exact keys: which exact keys are the same
    structure after all (a copy whose coordinates straddle a rounding boundary of the
    exact key), and the runs' members, for the near-duplicate count."""
    starts, lengths = _runs(rows["key"])  # rows come sorted by key: a near group is a run
    exact = rows["exact"]
    pairs, members, runs = [], [], []
    for s, n in zip(starts[lengths > 1].tolist(), lengths[lengths > 1].tolist()):
        keys, first = np.unique(exact[s:s + n], return_index=True)
        if len(keys) < 2:
            continue
        members.append(np.stack([gid[s:s + n], fid[s:s + n], exact[s:s + n].view(np.int64),
                                 np.full(n, len(members))], axis=1))  # gid, fidelity, exact key, run
        runs.append([(int(keys[i]), (int(unit[s + j]), int(rows["row"][s + j])))
                     for i, j in enumerate(first.tolist()[:MAX_CLASSES])])
    for block in range(0, len(runs), _BLOCK):
        recs = _decode_many(units, staging, [m for run in runs[block:block + _BLOCK] for _, m in run])
        for run in runs[block:block + _BLOCK]:
            for i, (ka, ma) in enumerate(run):
                for kb, mb in run[i + 1:]:
                    if match_atoms(recs[ma], recs[mb]) is not None:
                        pairs.append((ka, kb))
    return {"pairs": pairs, "members": np.concatenate(members) if members else np.zeros((0, 4), np.int64)}


def _exact_groups(rows, unit, gid, fid, units, staging, policy, fidelities, datasets) -> dict:
    did = np.array([u.dataset for u in units], np.int64)[unit]
    out = {"within": collections.Counter(), "across": collections.Counter(), "groups": collections.Counter(),
           "pairs": collections.Counter(), "several": 0, "conflict_groups": collections.Counter(),
           "conflict_records": collections.Counter(), "drop": [], "rejects": [], "conflicts": [],
           "examples": [], "energy_spread_max": 0.0, "force_spread_max": 0.0}
    keys = rows["key"]
    # pairing across fidelities: runs of equal key, then distinct fidelities in each
    starts, lengths = _runs(keys)
    for s, n in zip(starts[lengths > 1].tolist(), lengths[lengths > 1].tolist()):
        present = sorted(set(fid[s:s + n].tolist()))
        if len(present) > 1:
            out["several"] += 1
            for i, a in enumerate(present):
                for b in present[i + 1:]:
                    out["pairs"][f"{fidelities[a]} | {fidelities[b]}"] += 1
    # the same structure at the same fidelity, in blocks whose records are decoded together
    starts, lengths = _runs(keys, fid)
    runs = list(zip(starts[lengths > 1].tolist(), lengths[lengths > 1].tolist()))
    for block in range(0, len(runs), _BLOCK):
        part = runs[block:block + _BLOCK]
        recs = _decode_many(units, staging, [(int(unit[i]), int(rows["row"][i]))
                                             for s, n in part for i in range(s, s + n)])
        for s, n in part:
            _same_fidelity(slice(s, s + n), rows, unit, gid, fid, did, units, recs, policy, fidelities,
                           datasets, out)
    return out


def _member(rows, unit, did, units, datasets, i: int) -> dict:
    u = units[int(unit[i])]
    return {"file": u.file, "index": int(rows["frame"][i]), "dataset": datasets[int(did[i])],
            "energy": None if math.isnan(rows["energy"][i]) else float(rows["energy"][i])}


def _same_fidelity(sel, rows, unit, gid, fid, did, units, recs, policy, fidelities, datasets, out) -> None:
    """One structure's copies at one fidelity (``sel``: rows, earliest first)."""
    name = fidelities[int(fid[sel.start])]
    seen: set[int] = set()
    for i in range(sel.start, sel.stop):
        d = int(did[i])
        if i > sel.start:
            out["within" if d in seen else "across"][name] += 1
        seen.add(d)
    out["groups"][name] += 1
    energy = rows["energy"][sel] / rows["n_atoms"][sel]
    energy = energy[~np.isnan(energy)]
    e_spread = float(energy.max() - energy.min()) if len(energy) > 1 else 0.0
    f_spread = _force_spread([recs[(int(unit[i]), int(rows["row"][i]))] for i in range(sel.start, sel.stop)])
    members = [_member(rows, unit, did, units, datasets, i) for i in range(sel.start, sel.stop)]
    if len(out["examples"]) < EXAMPLES:
        out["examples"].append({"fidelity": name, "records": members})
    conflict = e_spread > policy.energy_tolerance or (f_spread or 0.0) > policy.force_tolerance
    if conflict:
        out["conflict_groups"][name] += 1
        out["conflict_records"][name] += sel.stop - sel.start
        out["energy_spread_max"] = max(out["energy_spread_max"], e_spread)
        out["force_spread_max"] = max(out["force_spread_max"], f_spread or 0.0)
        action = {"keep": "kept", "drop": "dropped", "fail": "build stopped"}[policy.conflicts]
        out["conflicts"].append({"fidelity": name, "energy_spread_per_atom": e_spread,
                                 "force_spread": f_spread, "action": action, "records": members})
        if policy.conflicts == "drop":
            for i in range(sel.start, sel.stop):
                out["drop"].append(int(gid[i]))
                out["rejects"].append(_reject_line(members[i - sel.start], "label_conflict",
                                                   f"same structure as {_named(members, i - sel.start)} at "
                                                   f"{name} with energies spread {e_spread:.4g} eV/atom and "
                                                   f"forces {_fmt(f_spread)} eV/A"))
    elif policy.duplicates == "keep_first":
        for i in range(sel.start + 1, sel.stop):
            out["drop"].append(int(gid[i]))
            out["rejects"].append(_reject_line(members[i - sel.start], "duplicate",
                                               f"exact duplicate at {name} of {members[0]['file']} frame "
                                               f"{members[0]['index']}, which is kept"))


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def _named(members: list[dict], skip: int) -> str:
    others = [m for j, m in enumerate(members) if j != skip]
    return ", ".join(f"{m['file']} frame {m['index']}" for m in others[:3]) + (" ..." if len(others) > 3 else "")


def _reject_line(member: dict, reason: str, detail: str) -> dict:
    return {"file": member["file"], "index": member["index"], "reason": reason, "detail": detail}


def _force_spread(recs: list) -> float | None:
    """Largest difference of a force component between the copies, atoms paired by
    :func:`match_atoms`; None when fewer than two copies have forces."""
    recs = [r for r in recs if r.forces is not None]
    if len(recs) < 2:
        return None
    base = np.asarray(recs[0].forces, np.float64)
    spread = 0.0
    for rec in recs[1:]:
        order = match_atoms(recs[0], rec, 2 * MATCH_TOLERANCE)
        if order is None:  # a hash collision, or copies at the tolerance's edge: compare nothing
            continue
        spread = max(spread, float(np.abs(np.asarray(rec.forces, np.float64)[order] - base).max()))
    return spread


__all__ = ["JOIN_KEYS", "Policy", "UnitInfo", "join_task", "key_ranges"]
