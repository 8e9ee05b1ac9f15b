"""``mlip-pretrain data build``: raw files -> N LMDB shards + manifest.json, as Ray tasks.

Two phases, both idempotent, so a build killed at any moment and rerun skips what was
finished and ends with the same bytes:

1. **convert** (:mod:`data_pipeline.build.convert`): a task per work unit (a file, a row
   range of a database, or a byte range of a big text file) parses, validates and
   encodes its records into ``.build/``. The driver then fits and audits the elemental
   references (:mod:`data_pipeline.build.audit`), which may reject further records.
2. **write**: a task per shard. The kept records in global order (units in recipe
   order, then records in file order) are cut into ``shards`` consecutive runs whose
   sizes differ by at most one, so a shard task opens only the few units its run
   overlaps (about ``units / shards + 1``; never every unit), and the files opened by
   the whole write phase grow as ``units + shards``, not their product. The sampler
   mixes groups across all shards, so nothing depends on a shard mixing sources. Each
   shard is written to a temporary name and renamed; its size and SHA-256 come back
   from the task (and are kept in ``.build/`` for a resumed build), so the driver never
   re-reads a shard to hash it.

The record order, the unit split and the shard assignment depend only on the recipe and
the inputs, never on the worker count: 1 or 64 workers write byte-identical shards. The
output folder must be visible to every Ray node (a shared file system on a cluster).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from common.atomic import atomic_output, write_atomic
from common.config import save_config, to_dict
from common.errors import UserError
from common.progress import Progress
from data_pipeline.build.assemble import assemble_manifest, write_manifest
from data_pipeline.build.audit import audit_references
from data_pipeline.build.convert import JOIN_KEYS, convert_unit, load_npz, unit_file
from data_pipeline.build.duplicate_report import classes, combine, write_conflicts
from data_pipeline.build.duplicates import Policy, UnitInfo, join_task, key_ranges
from data_pipeline.build.recipe import Recipe
from data_pipeline.build.sources import plan_units
from data_pipeline.fingerprints import KEYS
from data_pipeline.manifest import summary_table
from data_pipeline.raysession import ray_session, run_tasks
from data_pipeline.shards import shard_name, write_shard

MANIFEST = "manifest.json"


class BuildError(UserError, RuntimeError):
    """A build that cannot go on; the message says why and what to do."""


def plan_hash(recipe: Recipe, units) -> str:
    """Hash of what determines the output: the recipe and each input's size and mtime."""
    h = hashlib.sha256(json.dumps(to_dict(recipe), sort_keys=True).encode())
    for u in units:
        st = os.stat(u.path)
        h.update(json.dumps([u.rel, u.fmt, u.start, u.stop, st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


STAGING_VERSION = 3  # what a unit stages (2: fingerprints, coverage and the join file; 3: extras)


def _restage_if_older(staging: Path) -> None:
    """A killed build resumed by a version of this code that stages more per unit: the
    finished units of the older code lack it, so they are converted again (shards the
    older code wrote are rewritten too; the inputs and the recipe are the same)."""
    plan = staging / "plan.json"
    if plan.exists() and json.loads(plan.read_text()).get("staging") != STAGING_VERSION:
        print(f"[build] {staging} was staged by an older version: converting every unit again", flush=True)
        shutil.rmtree(staging)
        for shard in staging.parent.glob("shard-*.lmdb"):
            shard.unlink()


def _check_out_dir(out: Path, digest: str) -> bool:
    """True when ``out`` already holds this build, complete; raise if it holds another."""
    manifest = out / MANIFEST
    plan = out / ".build" / "plan.json"
    for path in (manifest, plan):
        if path.exists():
            found = json.loads(path.read_text()).get("plan_hash")
            if found != digest:
                raise BuildError(
                    f"{out} holds a build of a different recipe or of inputs that changed "
                    f"since ({path.name}); use a new --out folder or delete {out}"
                )
            return path is manifest
    if out.exists() and any(out.glob("shard-*.lmdb")):
        raise BuildError(f"{out} holds shards of an unknown build; use a new --out folder")
    return False


def shard_runs(counts: list[int], n_shards: int) -> list[list[tuple[int, int, int]]]:
    """Per shard, its consecutive run of the global record order as ``(unit, first, stop)``
    pieces (rows of the unit's kept records); the first ``N % n_shards`` shards get one
    record more. O(units + shards)."""
    q, r = divmod(int(sum(counts)), n_shards)
    runs: list[list[tuple[int, int, int]]] = [[] for _ in range(n_shards)]
    uid, row = 0, 0
    for s in range(n_shards):
        need = q + (s < r)
        while need:
            while counts[uid] - row == 0:
                uid, row = uid + 1, 0
            take = min(need, counts[uid] - row)
            runs[s].append((uid, row, row + take))
            row, need = row + take, need - take
    return runs


def write_shard_task(s: int, staging: str, out: str, pieces: list[tuple], fidelities, datasets) -> dict:
    """Write shard ``s`` from its run: ``pieces`` of ``(unit, first, stop, fidelity id,
    dataset id, rejected rows)``, rows counted among the unit's kept records."""
    path = Path(out) / shard_name(s)
    picks, keys = [], {k: [] for k in KEYS}
    for uid, first, stop, fid, did, drops in pieces:
        idx = np.load(unit_file(staging, uid, ".index.npy"))
        with np.load(unit_file(staging, uid, ".table.npz"), allow_pickle=False) as table:
            fps = {k: table[k] for k in KEYS}  # only the fingerprints of the unit's table
        if drops:
            idx = np.delete(idx, drops, axis=0)
            fps = {k: np.delete(v, drops) for k, v in fps.items()}
        picks.append((uid, idx[first:stop], fid, did))
        for k in KEYS:
            keys[k].append(fps[k][first:stop])
    n_atoms = np.concatenate([p[1][:, 2] for p in picks]) if picks else np.zeros(0, np.int64)
    fidelity = np.concatenate([np.full(len(p[1]), p[2]) for p in picks]) if picks else n_atoms
    dataset = np.concatenate([np.full(len(p[1]), p[3]) for p in picks]) if picks else n_atoms
    total = int(sum(int(p[1][:, 1].sum()) for p in picks))

    def records():
        for uid, rows, _, _ in picks:
            with open(unit_file(staging, uid, ".bin"), "rb") as f:
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    for off, length, _ in rows:
                        yield mm[off : off + length]

    extra = {k: np.concatenate(v) if v else np.zeros(0, np.uint64) for k, v in keys.items()}
    info = write_shard(path, records(), n_atoms, fidelity, dataset, fidelities, datasets, total, extra)
    record = Path(staging) / f"{shard_name(s)}.json"
    write_atomic(record, json.dumps(info))
    return info


def build(recipe: Recipe, out: str | Path, workers: int | None = None, strict: bool = False,
          progress: bool = True) -> dict:
    """Run a data build; return the manifest (also written to ``out/manifest.json``).

    ``workers`` caps the tasks running at once (default: every CPU Ray has). With
    ``strict`` the first rejected frame stops the build with a BuildError naming it.
    """
    out = Path(out).resolve()
    units = plan_units(recipe)
    digest = plan_hash(recipe, units)
    if _check_out_dir(out, digest):
        return json.loads((out / MANIFEST).read_text())
    staging = out / ".build"
    _restage_if_older(staging)
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "plan.json").write_text(json.dumps({"plan_hash": digest, "units": len(units),
                                                   "staging": STAGING_VERSION}))
    save_config(recipe, out / "recipe.resolved.yaml")
    fidelities, datasets = recipe.fidelities(), recipe.datasets()
    with ray_session(workers) as limit:
        summaries = _convert_all(recipe, units, staging, limit, strict, progress)
        audit = _audit(recipe, units, staging, strict)
        dups = _duplicates(recipe, units, summaries, staging, audit, limit, progress)
        fid = [fidelities.index(recipe.sources[u.source].fidelity) for u in units]
        did = [datasets.index(recipe.sources[u.source].dataset) for u in units]
        drops = {uid: rows.tolist() for uid, rows in audit.drops.items()}
        counts = [s["records"] - len(drops.get(uid, [])) for uid, s in enumerate(summaries)]
        args = [(s, str(staging), str(out),
                 [(u, a, b, fid[u], did[u], drops.get(u, [])) for u, a, b in run], fidelities, datasets)
                for s, run in enumerate(shard_runs(counts, recipe.shards))]
        shards = _finished_shards(out, staging, recipe.shards)
        todo = [a for a in args if a[0] not in shards]
        with Progress(len(args), "write shards", "shard", enabled=progress) as bar:
            bar.update(len(args) - len(todo))
            done = run_tasks(write_shard_task, todo, limit, on_done=lambda *_: bar.update(1))
        shards.update((a[0], info) for a, info in zip(todo, done))
    manifest = assemble_manifest(recipe, units, staging, out, digest, audit, summaries,
                                 [shards[s] for s in range(recipe.shards)], dups.report)
    _concat_rejects(units, staging, out, audit)
    write_conflicts(dups.conflicts, out / "conflicts.jsonl")
    write_manifest(manifest, out / MANIFEST)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def _convert_all(recipe, units, staging, limit, strict, progress) -> list[dict]:
    tasks = [(uid, u, recipe.sources[u.source], recipe.validation, str(staging), strict)
             for uid, u in enumerate(units)]
    records = [0]

    def on_done(args, summary):
        records[0] += summary["records"]
        bar.update(1, records=records[0])
        if strict and summary["rejects"]:
            r = summary["first_reject"]
            raise BuildError(f"--strict: {r['file']} frame {r['index']}: {r['reason']}: {r['detail']}")

    with Progress(len(tasks), "convert", "unit", enabled=progress) as bar:
        return run_tasks(convert_unit, tasks, limit, on_done=on_done)


def _finished_shards(out: Path, staging: Path, n_shards: int) -> dict[int, dict]:
    """Info of the shards a previous run of this build finished: from the task's record,
    or (killed between the rename and that record) by reading the shard once."""
    from data_pipeline.build.assemble import shard_info  # noqa: PLC0415

    found = {}
    for s in range(n_shards):
        record = staging / f"{shard_name(s)}.json"
        if record.exists():
            found[s] = json.loads(record.read_text())
        elif (out / shard_name(s)).exists():
            found[s] = shard_info(out, s)
    return found


def _audit(recipe, units, staging: Path, strict: bool):
    """The robust reference fit and residual audit; with ``strict`` an outlier stops the build."""
    audit = audit_references(recipe, units, lambda uid: unit_file(staging, uid, ".table.npz"), load_npz)
    if strict and audit.rejects:
        r = audit.rejects[min(audit.rejects)][0]
        raise BuildError(f"--strict: {r['file']} frame {r['index']}: {r['reason']}: {r['detail']}")
    return audit


def _duplicates(recipe, units, summaries, staging: Path, audit, limit: int, progress: bool):
    """The duplicate join as Ray tasks over key ranges; its drops and rejects lines join
    the audit's (so the shard write and the manifest see one list)."""
    fidelities, datasets = recipe.fidelities(), recipe.datasets()
    infos, first = [], 0
    for uid, (u, s) in enumerate(zip(units, summaries)):
        src = recipe.sources[u.source]
        infos.append(UnitInfo(uid, first, s["records"], fidelities.index(src.fidelity),
                              datasets.index(src.dataset), u.rel))
        first += s["records"]
    excluded = np.sort(np.concatenate([infos[u].first_gid + np.asarray(rows, np.int64)
                                       for u, rows in audit.drops.items()] or [np.zeros(0, np.int64)]))
    policy = Policy(recipe.duplicates, recipe.conflicts, recipe.conflict_energy_tolerance,
                    recipe.conflict_force_tolerance)
    ranges = key_ranges(first)
    import ray  # noqa: PLC0415 - the session is up: the shared arguments go to the object store once

    base = (ray.put(infos), str(staging), ray.put(excluded), policy, fidelities, datasets)
    near_args = [(kind, lo, hi, *base) for kind in JOIN_KEYS[1:] for lo, hi in ranges]
    with Progress(2 * len(ranges) + len(ranges) + 1, "duplicates", "range", enabled=progress) as bar:
        near = run_tasks(join_task, near_args, limit, on_done=lambda *_: bar.update(1))
        remap = classes(near)  # exact keys the near groups showed to be one structure
        shared = ray.put(remap)
        exact_args = [("fp_exact", lo, hi, *base, shared) for lo, hi in ranges]
        exact_args.append(("fp_exact", 0, 1 << 64, *base, shared, True))
        exact = run_tasks(join_task, exact_args, limit, on_done=lambda *_: bar.update(1))
    dups = combine(exact, near, remap, infos, fidelities, policy)
    if recipe.conflicts == "fail" and dups.conflicts:
        c = dups.conflicts[0]
        named = "; ".join(f"{m['file']} frame {m['index']} (E = {m['energy']})" for m in c["records"][:4])
        raise BuildError(f"conflicts: fail: {len(dups.conflicts)} structures have copies with different "
                         f"labels at one fidelity; the first, at {c['fidelity']}: {named}; energy spread "
                         f"{c['energy_spread_per_atom']:.4g} eV/atom, forces {c['force_spread']} eV/A. "
                         "Fix the sources, or set conflicts: keep or drop in the recipe")
    for uid, rows in dups.drops.items():
        audit.drops[uid] = np.union1d(np.asarray(audit.drops.get(uid, []), np.int64), rows)
        audit.rejects.setdefault(uid, []).extend(dups.rejects[uid])
    return dups


def _concat_rejects(units, staging: Path, out: Path, audit) -> None:
    with atomic_output(out / "rejects.jsonl", "w") as f:
        for uid in range(len(units)):
            f.write(unit_file(staging, uid, ".rejects.jsonl").read_text())
            f.writelines(json.dumps(r) + "\n" for r in audit.rejects.get(uid, []))


def report(manifest: dict, stream=None) -> None:
    """Print the inspect summary of a manifest (to ``sys.stdout`` as it is at the call)."""
    (stream or sys.stdout).write(summary_table(manifest) + "\n")
