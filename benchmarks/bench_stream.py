"""Streaming benchmark: batches from our loader vs an ASE database + ASE's neighbor list.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_stream [--structures 3000] [--repeats 3] [--work DIR]

All in the same run, on the same structures, at a 6 A cutoff:

1. (once, cached in the work dir) ~75% periodic crystals of 8-200 atoms (8 lattice types
   from ``ase.build.bulk``, primitive/cubic/orthorhombic, random supercells and sheared
   strain, so most cells are triclinic, rattled by 0.05 A) and ~25% of 5-60 atoms without
   a cell (G2 molecules >= 2 A apart, metal nanoparticles), cheap finite labels; written
   as extxyz, built into shards by our ``build`` (2 workers) and copied into an
   ASE SQLite ``ase.db`` in the builder's record order.
2. Peer path, in this process: ``row = db.get(id=k); atoms = row.toatoms();
   neighbor_list("ijS", atoms, 6.0)`` for ``--sample`` random ids, one open connection.
   For ``--check`` of them our edge set must equal ASE's (same structure, by source id).
3. Our path: one epoch (every record once) of ``build_loader(LoaderConfig(...))`` for
   (local, 1), (local, 2), (ray, 1), (ray, 2) workers, each in a fresh subprocess that
   imports torch first (a trainer has it) and, for Ray, runs ``ray.init(num_cpus=W)``
   (reported as ``ray_init_s``, not timed). ``startup_s``: ``build_loader`` to the first
   batch (worker spawn, imports in the workers, the first build). The steady rate counts
   the batches after the first ``1 + prefetch * W`` over the time after that one arrived
   (batches that piled up in flight during start-up would come at once and inflate it).
   The consumer does nothing, so it waits ~100% of the time: this is the delivery rate.
4. ``--repeats`` interleaved repetitions; median and min-max. CPU used meanwhile by other
   processes is read from /proc (``benchmarks.harness``); a skewed run is retried
   (``--tries``) and flagged if kept. Table on stdout, raw timings in ``<work>/results.json``.

``--profile`` adds a cProfile of ``BatchBuilder.__call__`` and one batch's transfer cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import (
    REPO, WORK, Runs, header, load_note, log, markdown, parser, run_child, summarise, timed,
    write_result)
from benchmarks.structures import make_structure

SEED, CUTOFF, FILES, PREFETCH = 20261122, 6.0, 4, 4
GENERATOR = 1  # bump when the structure generator changes: the cached data is then rebuilt
CONFIGS = (("local", 1), ("local", 2), ("ray", 1), ("ray", 2))
CHILD = r"""
import json, sys, time
import numpy as np
import torch  # a trainer has torch loaded already: keep its import out of the timings
from benchmarks.harness import cpu_snapshot, other_cpu
from data_pipeline import keys as K
from data_pipeline.stream.sampler import SamplerConfig
from data_pipeline.stream import LoaderConfig, StreamConfig, build_loader
a = json.loads(sys.argv[1])
ray_init_s = None
if a["backend"] == "ray":
    import ray
    t = time.perf_counter()
    ray.init(num_cpus=a["workers"], include_dashboard=False, configure_logging=False)
    ray_init_s = time.perf_counter() - t
cfg = LoaderConfig(folder=a["folder"], cutoff=a["cutoff"],
                   sampler=SamplerConfig(max_atoms=a["max_atoms"], temperature=1.0),
                   stream=StreamConfig(backend=a["backend"], workers=a["workers"],
                                       prefetch=a["prefetch"]))
before = cpu_snapshot()
t0 = time.perf_counter()
stream = build_loader(cfg, progress=False)
n_batches, records = len(stream), len(stream.builder.dataset)
stamps, structures, atoms, edges, seen = [], [], [], [], []
for batch in stream:
    stamps.append(time.perf_counter() - t0)
    structures.append(len(batch[K.N_ATOMS]))
    atoms.append(len(batch[K.NUMBERS]))
    edges.append(int(batch[K.EDGE_INDEX].shape[1]))
    seen.append(batch[K.INDEX].numpy())
    if len(stamps) == n_batches:  # before the workers exit: /proc forgets dead processes
        after = cpu_snapshot()
wait_s = stream.wait_s
stream.close()
seen = np.sort(np.concatenate(seen))
print("RESULT " + json.dumps({
    "ray_init_s": ray_init_s, "seconds": stamps[-1], "other_cpu_s": other_cpu(before, after),
    "wait_s": wait_s, "batch_stamps": stamps, "batch_structures": structures,
    "batch_atoms": atoms, "batch_edges": edges,
    "every_record_once": bool(np.array_equal(seen, np.arange(records)))}))
"""

# --------------------------------------------------------------------------- data


def prepare(work: Path, structures: int) -> tuple[Path, Path, dict]:
    """(shard folder, ase.db, dataset description): made once, then reused from ``work``."""
    import ase.io  # noqa: PLC0415

    from data_pipeline.build import build  # noqa: PLC0415
    from data_pipeline.build.recipe import Recipe, SourceConfig  # noqa: PLC0415
    from tests.synthetic import with_calculator, write_frames  # noqa: PLC0415

    data, shards, db, stamp = work / "data", work / "shards", work / "ase.db", work / "dataset.json"
    want = {"structures": structures, "seed": SEED, "generator": GENERATOR, "files": FILES}
    desc = json.loads(stamp.read_text()) if stamp.exists() else {}
    if desc.get("params") == want and (shards / "manifest.json").exists() and db.exists():
        log(f"data: reusing {structures} structures, shards and ase.db in {work}")
        return shards, db, desc
    t0 = time.perf_counter()
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    db.unlink(missing_ok=True)
    data.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    frames = [make_structure(rng) for _ in range(structures)]
    for f in range(FILES):
        ase.io.write(data / f"part-{f:02d}.xyz", frames[f::FILES])
    # filled from the files, in file order: the builder's record order and its very numbers
    back = [a for p in sorted(data.glob("*.xyz")) for a in ase.io.read(p, index=":")]
    write_frames(work / "ase.tmp.db", with_calculator(back), fmt="db")
    os.replace(work / "ase.tmp.db", db)
    log(f"data: generated, extxyz and ase.db written ({time.perf_counter() - t0:.0f} s); "
        f"building shards with 2 workers")
    src = SourceConfig(path="data/*.xyz", dataset="mix", fidelity="synthetic",
                       energy_key="REF_energy", forces_key="REF_forces", stress_key="REF_stress")
    # starts a local Ray with 2 CPUs and shuts it down (no timing is taken in this process yet)
    m = build(Recipe(sources=[src], shards=8, root=str(work)), shards, workers=2, progress=False)
    n = np.array([len(a) for a in frames])
    desc = {"params": want, "structures": structures, "atoms": int(n.sum()),
            "mean_atoms": float(n.mean()), "atoms_min_max": [int(n.min()), int(n.max())],
            "fraction_periodic": float(np.mean([a.pbc.all() for a in frames])),
            "records": m["records"], "rejects": m["rejects"]["total"],
            "prepare_s": time.perf_counter() - t0}
    stamp.write_text(json.dumps(desc, indent=1))
    log(f"data: prepared in {desc['prepare_s']:.0f} s ({m['records']} records, "
        f"{desc['rejects']} rejected)")
    return shards, db, desc


# --------------------------------------------------------------------------- timings


def time_ase(db_path: Path, ids: list[int]) -> dict:
    """The peer path: ASE SQLite row -> Atoms -> ASE neighbor list, in this process."""
    import ase.db  # noqa: PLC0415
    from ase.neighborlist import neighbor_list  # noqa: PLC0415

    db = ase.db.connect(str(db_path))
    edges = atoms = 0
    with db:  # one open connection for all reads (the fast way to use ase.db)
        t0 = time.perf_counter()
        for k in ids:
            a = db.get(id=k).toatoms()
            i, j, S = neighbor_list("ijS", a, CUTOFF)
            edges += len(i)
            atoms += len(a)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "structures": len(ids), "atoms": atoms, "edges": edges,
            "structures_per_s": len(ids) / seconds, "edges_per_s": edges / seconds}


def time_stream(folder: Path, backend: str, workers: int, max_atoms: int) -> dict:
    """One epoch of our loader in a fresh subprocess, with start-up and steady-state rates."""
    r = run_child(CHILD, {"folder": str(folder), "cutoff": CUTOFF, "backend": backend,
                          "workers": workers, "max_atoms": max_atoms, "prefetch": PREFETCH},
                  REPO, f"stream {backend} with {workers} worker(s)")
    s, n, e = r["batch_stamps"], r["batch_structures"], r["batch_edges"]
    k = min(1 + PREFETCH * workers, len(s) // 2)  # skip what may have piled up in flight
    steady = s[-1] - s[k - 1]
    r.update(structures=sum(n), atoms=sum(r["batch_atoms"]), edges=sum(e), batches=len(s),
             startup_s=s[0], steady_from_batch=k, steady_s=steady,
             structures_per_s=sum(n[k:]) / steady, edges_per_s=sum(e[k:]) / steady,
             epoch_structures_per_s=sum(n) / s[-1], wait_fraction=r["wait_s"] / s[-1])
    return r


def check_edges(folder: Path, db_path: Path, ids: list[int]) -> list[dict]:
    """Our edges (i, j, S) vs ASE's for the same structures (matched by source id)."""
    import ase.db  # noqa: PLC0415
    from ase.neighborlist import neighbor_list as ase_nl  # noqa: PLC0415

    from data_pipeline.stream.dataset import ShardedDataset  # noqa: PLC0415
    from data_pipeline.graph import neighbor_list  # noqa: PLC0415

    ds = ShardedDataset(folder)
    sid = [ds[i]["source_id"].split("#") for i in range(len(ds))]  # "data/part-01.xyz#17"
    file_order = sorted(range(len(ds)), key=lambda i: (sid[i][0], int(sid[i][1])))
    db, out = ase.db.connect(str(db_path)), []
    for k in ids:
        rec = ds[file_order[k - 1]]  # db row k holds the k-th structure in file order
        a = db.get(id=k).toatoms()
        i, j, S = ase_nl("ijS", a, CUTOFF)
        ours, shifts = neighbor_list(rec["positions"], rec["cell"], rec["pbc"], CUTOFF)
        same = (np.array_equal(a.positions, rec["positions"]) and len(i) == ours.shape[1]
                and set(zip(i, j, *S.T)) == set(zip(*ours, *shifts.T)))
        out.append({"id": k, "atoms": len(a), "periodic": bool(a.pbc.any()),
                    "ase_edges": len(i), "our_edges": int(ours.shape[1]), "identical": same})
    return out


# --------------------------------------------------------------------------- profile

PARTS = {"decode records (ShardedDataset.__getitem__)": ("dataset.py", "__getitem__"),
         "neighbor_list, all": ("graph.py", "neighbor_list"),
         "  vesin NeighborList.compute": ("vesin", "compute"),
         "  _edge_order (argsort of one int64 key)": ("graph.py", "_edge_order"),
         "  _validated (input checks)": ("graph.py", "_validated"),
         "collate (concatenate, offsets, casts)": ("collate.py", "collate")}


def profile_batches(folder: Path, max_atoms: int, batches: int = 8) -> None:
    """cProfile of ``BatchBuilder.__call__`` on a few batches, and one batch's transfer cost."""
    import cProfile  # noqa: PLC0415
    import pickle  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    from data_pipeline.batch import to_torch  # noqa: PLC0415
    from data_pipeline.stream.collate import BatchBuilder  # noqa: PLC0415
    from data_pipeline.stream.sampler import AtomBudgetSampler, SamplerConfig  # noqa: PLC0415

    builder = BatchBuilder(folder, CUTOFF)
    sampler = AtomBudgetSampler.from_dataset(builder.dataset, SamplerConfig(max_atoms=max_atoms))
    plan = [sampler.batch(k) for k in range(batches + 1)]
    builder(plan[0])  # imports vesin (and torch), opens the shards: start-up, not steady state
    t0 = time.perf_counter()
    out = [builder(b) for b in plan[1:]]
    plain = (time.perf_counter() - t0) / batches
    prof = cProfile.Profile()
    prof.runcall(lambda: [builder(b) for b in plan[1:]])
    n = len(np.concatenate(plan[1:])) / batches
    e = sum(o["edge_index"].shape[1] for o in out) / batches
    print(f"\n## cProfile: BatchBuilder.__call__, {batches} batches ({n:.0f} structures, "
          f"{e:,.0f} edges each): {plain * 1e3:.1f} ms per batch unprofiled, "
          f"{n / plain:,.0f} structures/s in one process\n")
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())
    for label, (path, name) in PARTS.items():
        ct = sum(v[3] for (f, _, fn), v in stats.stats.items() if fn == name and path in f)
        print(f"  {label:46s} {ct / batches * 1e3:7.2f} ms/batch {ct / total:6.1%}")
    stats.sort_stats("tottime").print_stats(12)
    t0 = time.perf_counter()
    back = pickle.loads(pickle.dumps(out[0], protocol=pickle.HIGHEST_PROTOCOL))
    pickled = time.perf_counter() - t0
    for v in back.values():
        v.flags.writeable = False  # as Ray hands arrays out: to_torch must copy them
    t0 = time.perf_counter()
    to_torch(back)
    print(f"one batch: {sum(v.nbytes for v in out[0].values()) / 2**20:.1f} MiB; pickle round "
          f"trip {pickled * 1e3:.1f} ms; to_torch of read-only arrays (as from Ray) "
          f"{(time.perf_counter() - t0) * 1e3:.1f} ms")


# --------------------------------------------------------------------------- report

NAMES = {"ase": "ASE: `db.get(id=k).toatoms()` + `neighbor_list('ijS', 6.0)`, 1 process",
         "local_1": "ours, local DataLoader, 1 worker",
         "local_2": "ours, local DataLoader, 2 workers",
         "ray_1": "ours, Ray, 1 actor", "ray_2": "ours, Ray, 2 actors"}
FIELDS = ("structures_per_s", "edges_per_s", "startup_s", "ray_init_s",
          "epoch_structures_per_s", "wait_fraction")


def rates(runs: dict) -> dict:
    """Median, min and max per measurement (steady rates for ours), start-up, waits."""
    return {k: {f: summarise([x[f] for x in v]) for f in FIELDS if v[0].get(f) is not None}
            for k, v in runs.items()}


def table(rr: dict) -> str:
    rows = []
    for key, name in NAMES.items():
        x = rr[key]
        s, e = x["structures_per_s"], x["edges_per_s"]["median"]
        up = "-" if key == "ase" else f"{x['startup_s']['median']:.2f}" + (
            f" (+{x['ray_init_s']['median']:.1f} ray.init)" if "ray_init_s" in x else "")
        whole = "-" if key == "ase" else f"{x['epoch_structures_per_s']['median']:,.0f}"
        rows.append([name, f"{s['median']:,.0f}", f"{s['min']:,.0f} - {s['max']:,.0f}", f"{e:,.0f}",
                     f"{s['median'] / rr['ase']['structures_per_s']['median']:.1f}x",
                     f"{e / rr['ase']['edges_per_s']['median']:.1f}x", up, whole])
    return markdown(["path", "structures/s (median)", "min - max", "edges/s (median)",
                     "x ASE, structures/s", "x ASE, edges/s", "start-up s",
                     "whole epoch incl. start-up, structures/s"], rows)


def report(res: dict, a: argparse.Namespace) -> None:
    d, checks, rr = res["dataset"], res["edge_checks"], res["rates"]
    print(f"\nDataset: {d['structures']} structures, {d['atoms']} atoms, "
          f"{d['mean_atoms']:.1f} atoms per structure "
          f"({d['atoms_min_max'][0]}-{d['atoms_min_max'][1]}), "
          f"{d['edges_per_structure']:,.0f} edges per structure at {CUTOFF:g} A, "
          f"{d['fraction_periodic']:.1%} periodic; {d['batches_per_epoch']} batches of <= "
          f"{a.max_atoms} atoms per epoch. ASE sample: {a.sample} structures, "
          f"{res['ase_sample_atoms_mean']:.1f} atoms each on average. "
          f"Median of {a.repeats} runs.\n")
    print(table(rr))
    ase = rr["ase"]["structures_per_s"]["median"]
    x = {k: v["structures_per_s"]["median"] / ase for k, v in rr.items()}
    print("target >= 50x the ASE path in structures/s: " + ", ".join(
        f"{k} {v:.1f}x ({'met' if v >= 50 else 'NOT met'})" for k, v in x.items() if k != "ase"))
    print("consumer wait fraction (idle consumer, ~100% expected): " + ", ".join(
        f"{k} {v['wait_fraction']['median']:.0%}" for k, v in rr.items() if k != "ase"))
    print(f"edge sets identical to ASE's: {sum(c['identical'] for c in checks)}/{len(checks)}; "
          f"every record once per epoch: {res['every_record_once']}; same edge total in "
          f"every run: {res['same_edges_every_run']}")
    print(load_note(res))


def main(argv=None) -> int:
    p = parser(__doc__, repeats=3, tries=3, work=WORK / "stream",
               out_help="default <work>/results.json")
    p.add_argument("--structures", type=int, default=3000)
    p.add_argument("--sample", type=int, default=400, help="structures timed on the ASE path")
    p.add_argument("--check", type=int, default=20, help="structures whose edges are compared")
    p.add_argument("--max-atoms", type=int, default=4096, help="atom budget of one batch")
    p.add_argument("--profile", action="store_true", help="also profile BatchBuilder.__call__")
    a = p.parse_args(argv)
    a.work = str(Path(a.work).resolve())
    Path(a.work).mkdir(parents=True, exist_ok=True)
    t_start, head = time.perf_counter(), header(("ray", "ase", "vesin", "torch"))

    folder, db, desc = prepare(Path(a.work), a.structures)
    n = desc["records"]
    ids = (np.random.default_rng(SEED).choice(n, min(a.sample, n), replace=False) + 1).tolist()
    checks = check_edges(folder, db, ids[:a.check])
    log(f"edges vs ASE: {sum(c['identical'] for c in checks)}/{len(checks)} identical edge sets")

    runs = Runs(NAMES, a.repeats, a.tries)

    def describe(key: str):
        def line(r: dict) -> str:
            more = "" if key == "ase" else (f", steady {r['structures_per_s']:,.0f}/s, "
                                            f"start-up {r['startup_s']:.2f} s")
            return f"{key}  {r['structures']} structures in {r['seconds']:.2f} s{more}"
        return line

    jobs = {"ase": lambda: timed(time_ase, db, ids)}  # each of ours is accounted in its subprocess
    jobs |= {f"{b}_{w}": lambda b=b, w=w: time_stream(folder, b, w, a.max_atoms) for b, w in CONFIGS}
    runs.interleaved(jobs, describe)

    ours = [r for k, v in runs.runs.items() if k != "ase" for r in v]
    desc |= {"edges": ours[0]["edges"], "batches_per_epoch": ours[0]["batches"],
             "edges_per_structure": ours[0]["edges"] / ours[0]["structures"]}
    res = head | {
        "params": vars(a) | {"cutoff": CUTOFF, "prefetch": PREFETCH}, "dataset": desc,
        "ase_sample_atoms_mean": runs.runs["ase"][0]["atoms"] / len(ids), "rates": rates(runs.runs),
        "edge_checks": checks, "every_record_once": all(r["every_record_once"] for r in ours),
        "same_edges_every_run": len({r["edges"] for r in ours}) == 1,
    } | runs.record() | {"total_seconds": time.perf_counter() - t_start}
    report(res, a)
    write_result(a.out or Path(a.work) / "results.json", res)
    if a.profile:
        profile_batches(folder, a.max_atoms)
    ok = all(c["identical"] for c in checks) and res["every_record_once"]
    return 0 if ok and res["same_edges_every_run"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
