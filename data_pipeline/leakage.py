"""Train/test leakage: which records of an evaluation folder are also in the training data.

Both folders' structure fingerprints (:mod:`data_pipeline.fingerprints`) come from the
shards' metadata (computed from the records for shards built before fingerprints). The
evaluation set's keys are held in memory; the training shards are streamed one at a time
(rank ``r`` of ``W`` takes shards ``r, r + W, ...``; one all-reduce combines them), so
memory grows with the evaluation set, never with the training data.

Per evaluation record, and per fidelity of the evaluation record:

- **exact**: the same structure (exact key, or a near key whose records match atom by
  atom to :data:`~data_pipeline.fingerprints.MATCH_TOLERANCE`) is in the training data
  at the same fidelity (the model was trained on this very label), or only at another
  fidelity (it saw the geometry, with another level of theory's label);
- **near**: a near duplicate (rotation-invariant geometry equal to 1e-3 A), not exact;
- **formula** (molecules, no periodic direction): a training structure has the same
  element counts (the same molecule or an isomer; the training side is read from the
  metadata alone, so a periodic cell of the same counts counts too).

``leaked`` marks the records with an exact or near copy at the same fidelity: what
``eval --exclude-leaked`` leaves out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from common.progress import Progress
from data_pipeline.fingerprints import KEYS, _mix, match_atoms, record_fingerprints
from data_pipeline.manifest import read_manifest
from data_pipeline.schema import decode
from data_pipeline.shards import ShardReader

EXAMPLES = 20
_FLAGS = ("exact_same", "exact_other", "near_same", "near_other", "formula")


def _name_hash(names: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "little")
                     for n in names], np.uint64)


def shard_keys(folder: Path, entry: dict) -> dict[str, np.ndarray]:
    """One shard's fingerprints, fidelity name hashes and periodicity (from its metadata,
    or computed from its records for a shard built before fingerprints)."""
    reader = ShardReader(folder / entry["file"])
    header, arrays = reader.meta()
    n = int(header["n_records"])
    fid = _name_hash(header["fidelities"])[arrays["fidelity"].astype(np.int64)] if n else np.zeros(0, np.uint64)
    if all(k in arrays for k in KEYS):
        out = {k: arrays[k] for k in KEYS}
        periodic = None  # read below, only where the formula check needs it
    else:
        recs = [decode(reader.get(i), where=f"{reader.path} record {i}") for i in range(n)]
        out = record_fingerprints(recs)
        periodic = np.array([bool(np.any(r.pbc)) for r in recs], bool)
    out["fidelity"] = fid
    out["periodic"] = periodic
    out["reader"] = reader
    return out


def _periodic(keys: dict) -> np.ndarray:
    if keys["periodic"] is None:
        reader = keys["reader"]
        keys["periodic"] = np.array([bool(np.any(decode(reader.get(i)).pbc)) for i in range(len(keys["fp_exact"]))],
                                    bool)
    return keys["periodic"]


def _with(key: np.ndarray, fid: np.ndarray) -> np.ndarray:
    """The key tied to a fidelity: equal only for the same structure at the same fidelity."""
    with np.errstate(over="ignore"):
        return _mix(key ^ _mix(fid))


def _lookup(train: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Per query, the index of an equal element of ``train``, or -1."""
    order = np.argsort(train, kind="stable")
    s = train[order]
    at = np.clip(np.searchsorted(s, query), 0, max(len(s) - 1, 0))
    hit = (s[at] == query) if len(s) else np.zeros(len(query), bool)
    return np.where(hit, order[at] if len(s) else -1, -1)


def leakage(eval_folder: str | Path, train_folder: str | Path, progress: bool = True) -> dict:
    """The leakage report of ``eval_folder`` against ``train_folder`` (every rank calls this
    under a process group and gets the same report); ``report["leaked"]`` is the bool mask
    of the evaluation records in ShardedDataset order (not JSON: pop it before writing)."""
    import torch.distributed as dist  # noqa: PLC0415

    eval_folder, train_folder = Path(eval_folder), Path(train_folder)
    em, tm = read_manifest(eval_folder), read_manifest(train_folder)
    shards = [shard_keys(eval_folder, e) for e in em["shards"]]
    ev = {k: np.concatenate([s[k] for s in shards]) for k in (*KEYS, "fidelity")}
    where = np.concatenate([np.stack([np.full(len(s["fp_exact"]), i), np.arange(len(s["fp_exact"]))], 1)
                            for i, s in enumerate(shards)]) if shards else np.zeros((0, 2), np.int64)
    n = len(ev["fp_exact"])
    flags = np.zeros((len(_FLAGS), n), np.int8)
    match = np.full(n, -1, np.int64)  # a training record per leaked record: shard << 32 | index
    molecules = ~np.concatenate([_periodic(s) for s in shards]) if shards else np.zeros(0, bool)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(tm["shards"]), world))
    with Progress(len(mine), "leakage", "shard", enabled=progress and rank == 0) as bar:
        for s in mine:
            t = shard_keys(train_folder, tm["shards"][s])
            _compare(ev, t, flags, match, s, molecules, eval_folder, shards, where)
            bar.update(1)
    if world > 1:
        import torch  # noqa: PLC0415

        both = torch.from_numpy(np.concatenate([flags.astype(np.int64), match[None]]))
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        flags, match = both[:-1].numpy().astype(np.int8), both[-1].numpy()
    return _report(em, tm, eval_folder, train_folder, ev, flags.astype(bool), match, molecules, shards, where)


def _compare(ev, t, flags, match, shard, molecules, eval_folder, shards, where) -> None:
    """Flag the evaluation records found in one training shard."""
    same_e, any_e = _with(ev["fp_exact"], ev["fidelity"]), ev["fp_exact"]
    hit_same = _lookup(_with(t["fp_exact"], t["fidelity"]), same_e)
    hit_any = _lookup(t["fp_exact"], any_e)
    near_same = np.maximum(_lookup(_with(t["fp_near_a"], t["fidelity"]), _with(ev["fp_near_a"], ev["fidelity"])),
                           _lookup(_with(t["fp_near_b"], t["fidelity"]), _with(ev["fp_near_b"], ev["fidelity"])))
    near_any = np.maximum(_lookup(t["fp_near_a"], ev["fp_near_a"]), _lookup(t["fp_near_b"], ev["fp_near_b"]))
    # a near copy may be an exact one whose coordinates straddle the exact key's rounding
    for i in np.flatnonzero((near_any >= 0) & (hit_any < 0)).tolist():
        a = decode(shards[where[i, 0]]["reader"].get(int(where[i, 1])))
        j = int(near_same[i] if near_same[i] >= 0 else near_any[i])
        if match_atoms(a, decode(t["reader"].get(j))) is not None:
            hit_any[i] = j
            if near_same[i] >= 0:
                hit_same[i] = j
    flags[0] |= hit_same >= 0
    flags[1] |= (hit_any >= 0) & (hit_same < 0)
    flags[2] |= near_same >= 0
    flags[3] |= near_any >= 0
    if molecules.any():  # from the metadata alone: a training structure of the same element counts
        flags[4] |= molecules & np.isin(ev["fp_formula"], t["fp_formula"])
    found = np.where(hit_same >= 0, hit_same, np.where(near_same >= 0, near_same, -1))
    match[:] = np.where((match < 0) & (found >= 0), (shard << 32) | np.maximum(found, 0), match)


def _report(em, tm, eval_folder, train_folder, ev, flags, match, molecules, shards, where) -> dict:
    exact_same, exact_other, near_same, near_other, formula = flags
    exact_any = exact_same | exact_other
    near_same &= ~exact_same
    near_other &= ~exact_any & ~near_same
    leaked = exact_same | near_same
    ids = em["fidelities"]
    per_fidelity = {}
    names = np.array([None] * len(ev["fp_exact"]), object)
    name_of = {int(h): f for f, h in zip(ids, _name_hash(ids))}
    for i, h in enumerate(ev["fidelity"].tolist()):
        names[i] = name_of[h]
    for f in ids:
        sel = names == f
        if sel.any():
            per_fidelity[f] = {"records": int(sel.sum()), "exact_same_fidelity": int((exact_same & sel).sum()),
                               "near_same_fidelity": int((near_same & sel).sum()),
                               "exact_other_fidelity": int((exact_other & sel).sum()),
                               "near_other_fidelity": int((near_other & sel).sum()),
                               "molecules": int((molecules & sel).sum()),
                               "molecules_formula_in_training": int((formula & sel).sum())}
    examples = []
    for i in np.flatnonzero(leaked | exact_other)[:EXAMPLES].tolist():
        rec = decode(shards[where[i, 0]]["reader"].get(int(where[i, 1])))
        kind = "exact" if exact_any[i] else "near"
        entry = {"record": i, "source_id": rec.source_id, "fidelity": names[i], "kind": kind,
                 "same_fidelity": bool(leaked[i])}
        if match[i] >= 0:
            s, j = int(match[i]) >> 32, int(match[i]) & 0xFFFFFFFF
            entry["train"] = decode(ShardReader(Path(train_folder) / tm["shards"][s]["file"]).get(j)).source_id
        examples.append(entry)
    return {
        "eval": {"folder": Path(eval_folder).name, "content_hash": em["content_hash"], "records": len(leaked)},
        "train": {"folder": Path(train_folder).name, "content_hash": tm["content_hash"], "records": tm["records"]},
        "fidelities": per_fidelity,
        "leaked_same_fidelity": int(leaked.sum()),
        "exact_other_fidelity": int(exact_other.sum()),
        "examples": examples,
        "definitions": "exact: the same structure (atoms, positions to 5e-8 A, cell, charge, spin; any order, "
                       "translation, wrapping); near: rotation-invariant geometry equal to 1e-3 A, not exact; "
                       "same fidelity: that label was trained on; formula: a training structure with the same "
                       "element counts",
        "leaked": leaked,
    }


def leakage_table(report: dict) -> str:
    """Printed lines of a leakage report."""
    lines = [f"train/test overlap: {report['eval']['folder']} vs training data {report['train']['folder']}"]
    for f, c in report["fidelities"].items():
        mol = (f"; molecules whose formula is in training {c['molecules_formula_in_training']}/{c['molecules']}"
               if c["molecules"] else "")
        lines.append(f"  [{f}] {c['records']} records: {c['exact_same_fidelity']} exact and "
                     f"{c['near_same_fidelity']} near copies of training records at this fidelity; "
                     f"{c['exact_other_fidelity']} exact at another fidelity{mol}")
    for e in report["examples"][:5]:
        lines.append(f"  e.g. {e['source_id']} ({e['fidelity']}, {e['kind']}) = training {e.get('train', '?')}")
    return "\n".join(lines)


def write_leakage(report: dict, path: Path) -> None:
    """The report as JSON without the mask (the examples name the records)."""
    from common.atomic import write_atomic  # noqa: PLC0415

    write_atomic(path, json.dumps({k: v for k, v in report.items() if k != "leaked"}, indent=1) + "\n")
