"""The duplicate join's results as one report (:mod:`data_pipeline.build.duplicates` runs
the join): the exact keys the near groups showed to be one structure, merged; the counts
per fidelity for the manifest's ``duplicates`` section; the drops and rejects lines by
unit for the shard write; the warnings; ``conflicts.jsonl``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np

from data_pipeline.build.duplicates import EXAMPLES, Policy, UnitInfo


def classes(near: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Exact keys the near tasks matched, merged (union-find): ``(raw keys sorted, the
    smallest key of each one's class)``."""
    parent: dict[int, int] = {}

    def root(k: int) -> int:
        while parent.get(k, k) != k:
            parent[k] = parent.get(parent[k], parent[k])
            k = parent[k]
        return k

    for r in near:
        for a, b in r["pairs"]:
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
                parent.setdefault(min(ra, rb), min(ra, rb))
    raw = np.array(sorted(parent), np.uint64)
    return raw, np.array([root(int(k)) for k in raw.tolist()], np.uint64)


def _near_counts(near: list[dict], remap: tuple[np.ndarray, np.ndarray], fidelities: list[str]) -> dict:
    """Per fidelity, records sharing a near key with a record of another structure (after
    merging matched exact keys) at the same fidelity."""
    members = np.concatenate([r["members"] for r in near]) if near else np.zeros((0, 4), np.int64)
    flagged: set[int] = set()
    raw, rep = remap
    for block in (r["members"] for r in near):
        if not len(block):
            continue
        exact = block[:, 2].view(np.uint64).copy()
        if len(raw):
            at = np.clip(np.searchsorted(raw, exact), 0, len(raw) - 1)
            hit = raw[at] == exact
            exact[hit] = rep[at[hit]]
        run = block[:, 3]
        for key in np.unique(np.stack([run, block[:, 1]], axis=1), axis=0):
            sel = (run == key[0]) & (block[:, 1] == key[1])
            if len(np.unique(exact[sel])) > 1:
                flagged.update(block[sel, 0].tolist())
    fid_of = dict(zip(members[:, 0].tolist(), members[:, 1].tolist()))
    counts = collections.Counter(fidelities[fid_of[g]] for g in flagged)
    return counts


@dataclasses.dataclass
class Duplicates:
    """The join's outcome, for the manifest and the shard write."""

    report: dict
    drops: dict[int, np.ndarray]  # unit id -> rows to leave out of the shards
    rejects: dict[int, list[dict]]  # unit id -> their rejects lines
    conflicts: list[dict]


def combine(results: list[dict], near: list[dict], remap, units: list[UnitInfo], fidelities: list[str],
            policy: Policy) -> Duplicates:
    """The join tasks' results as one report, and the drops by unit."""
    total = collections.Counter
    within, across, groups, pairs = total(), total(), total(), total()
    cgroups, crecords = total(), total()
    drops, lines, conflicts, examples = [], [], [], []
    several, e_max, f_max = 0, 0.0, 0.0
    for r in results:
        within.update(r["within"])
        across.update(r["across"])
        groups.update(r["groups"])
        pairs.update(r["pairs"])
        cgroups.update(r["conflict_groups"])
        crecords.update(r["conflict_records"])
        drops += r["drop"]
        lines += r["rejects"]
        conflicts += r["conflicts"]
        examples += r["examples"][: max(0, EXAMPLES - len(examples))]
        several += r["several"]
        e_max, f_max = max(e_max, r["energy_spread_max"]), max(f_max, r["force_spread_max"])
    near_counts = _near_counts(near, remap, fidelities)
    per_fidelity = {f: {"exact_duplicates_within_dataset": within[f], "exact_duplicates_across_datasets": across[f],
                        "duplicated_structures": groups[f], "near_duplicates": near_counts[f],
                        "conflicting_structures": cgroups[f], "conflicting_records": crecords[f]}
                    for f in fidelities}
    report = {
        "fidelities": per_fidelity,
        "across_fidelities": {"structures_at_several": several, "pairs": dict(sorted(pairs.items()))},
        "conflicts": {"structures": sum(cgroups.values()), "records": sum(crecords.values()),
                      "energy_spread_max": e_max, "force_spread_max": f_max},
        "policy": dataclasses.asdict(policy),
        "dropped": len(drops),
        "examples": examples,
        "warnings": _warnings(per_fidelity, sum(cgroups.values()), policy),
        "definitions": "exact: same atoms, positions (1e-8 A), cell, charge and spin up to order, "
                       "translation and wrapping; near: same composition, charge, spin and rotation-"
                       "invariant geometry to 1e-3 A, not an exact copy; counts are records after a "
                       "structure's first copy at the same fidelity",
    }
    first_gid = np.array([u.first_gid for u in units], np.int64)
    by_unit: dict[int, list] = collections.defaultdict(list)
    rejects: dict[int, list] = collections.defaultdict(list)
    for g, line in sorted(zip(drops, lines), key=lambda x: x[0]):
        i = int(np.searchsorted(first_gid, g, side="right")) - 1
        by_unit[units[i].uid].append(g - units[i].first_gid)
        rejects[units[i].uid].append(line)
    return Duplicates(report, {u: np.array(r, np.int64) for u, r in by_unit.items()}, dict(rejects), conflicts)


def _warnings(per_fidelity: dict, conflicts: int, policy: Policy) -> list[str]:
    out = []
    if conflicts:
        out.append(f"{conflicts} structures have copies with different labels at one fidelity "
                   f"(conflicts.jsonl; policy conflicts: {policy.conflicts}): two codes or settings "
                   "under one fidelity label?")
    for f, c in per_fidelity.items():
        n = c["exact_duplicates_within_dataset"] + c["exact_duplicates_across_datasets"]
        if n and policy.duplicates == "keep_all":
            out.append(f"{f}: {n} records are exact copies of earlier ones (kept: recipe duplicates: "
                       "keep_all; keep_first writes one copy)")
    return out


def write_conflicts(conflicts: list[dict], path: Path) -> None:
    """One line per conflicting structure (written even when empty, so its absence is news)."""
    from common.atomic import atomic_output  # noqa: PLC0415

    with atomic_output(path, "w") as f:
        f.writelines(json.dumps(c) + "\n" for c in conflicts)
