"""Data build benchmark: our Ray shard build vs plain ``ase.io`` reading, and random reads.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_build [--structures 20000] [--files 20] [--work DIR]

What it measures, all in the same run and on the same files:

1. (once, cached in the work dir) synthetic extxyz files with MACE-style ``REF_energy``,
   ``REF_forces`` and ``REF_stress`` keys: periodic alloy crystals of 2-64 atoms and about
   20% free clusters (``tests.synthetic``, ``linear`` labels), plus an ASE SQLite
   ``.db`` holding the same structures;
2. baseline: ``ase.io.read(path, index=":")`` of every file, in this process;
3. ``build(recipe, out, workers=N)`` for N = 1 and 2, each in a fresh subprocess that
   starts Ray with ``num_cpus=N`` (Ray start-up and worker spawn are excluded; only the
   ``build`` call is timed), into a fresh output folder;
4. that the 1- and 2-worker builds are byte-identical (manifest ``content_hash``);
5. random reads: ``ShardedDataset[i]`` at random indices, and, as the comparable peer,
   ``ase.db.connect(db).get(id=k).toatoms()`` at random ids;
6. a markdown table on stdout and every raw timing in ``<work>/results.json``.

Each measurement is repeated ``--repeats`` times (default 3; the repetitions of steps 2-3
are interleaved) and reported as median, min and max. Timing uses ``time.perf_counter``.
CPU that other processes use during a timed run (from /proc) is recorded with it; a run
where they took over 10% of a core is retried (``--tries``) and, if kept, flagged.
``--profile`` also prints a cProfile summary of one convert task and one shard write.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import time
from pathlib import Path

from benchmarks.harness import (
    REPO, WORK, Runs, header, load_note, log, markdown, parser, run_child, timed,
    write_result)

SEED = 20261121
DATASET, FIDELITY = "bench", "linear"


# Runs in a fresh interpreter: start Ray with N CPUs, wait until N workers are up, then
# time build() alone and print one JSON line.
CHILD = r"""
import json, sys, time
from benchmarks.harness import cpu_snapshot, other_cpu
args = json.loads(sys.argv[1])
import ray
ray.init(num_cpus=args["workers"], include_dashboard=False, configure_logging=False,
         log_to_driver=True)

@ray.remote(num_cpus=1)
def _up():
    import os, time
    time.sleep(0.2)
    return os.getpid()

pids = set(ray.get([_up.remote() for _ in range(args["workers"])]))
from data_pipeline.build import build
from data_pipeline.build.recipe import Recipe, SourceConfig
recipe = Recipe(
    sources=[SourceConfig(path="data/*.xyz", dataset=args["dataset"], fidelity=args["fidelity"],
                          energy_key="REF_energy", forces_key="REF_forces",
                          stress_key="REF_stress")],
    shards=args["shards"], root=args["root"])
snap = cpu_snapshot()
t0 = time.perf_counter()
manifest = build(recipe, args["out"], workers=args["workers"], progress=False)
seconds = time.perf_counter() - t0
other = other_cpu(snap, cpu_snapshot())
ray.shutdown()
print("RESULT " + json.dumps({
    "workers": args["workers"], "ray_worker_pids": len(pids), "seconds": seconds,
    "other_cpu_s": other,
    "records": manifest["records"], "atoms": manifest["atoms"],
    "rejects": manifest["rejects"]["total"], "content_hash": manifest["content_hash"],
    "shard_sha256": [s["sha256"] for s in manifest["shards"]]}))
"""


# --------------------------------------------------------------------------- data


def _make_file(path: str, n: int, seed: int) -> tuple[str, int, int]:
    from tests.synthetic import labelled_frames, write_frames  # noqa: PLC0415

    frames = labelled_frames(n, seed, method="linear", clusters=0.2, max_atoms=64)
    tmp = Path(path).with_suffix(".tmp.xyz")
    write_frames(tmp, frames)
    os.replace(tmp, path)
    return path, n, sum(len(a) for a in frames)


def prepare_data(work: Path, structures: int, files: int) -> list[Path]:
    """Create (or reuse) the extxyz files; returns them sorted."""
    data = work / "data"
    stamp = data / "dataset.json"
    want = {"structures": structures, "files": files, "seed": SEED, "method": "linear",
            "clusters": 0.2, "max_atoms": 64}
    if stamp.exists() and json.loads(stamp.read_text()).get("params") == want:
        paths = sorted(data.glob("*.xyz"))
        log(f"data: reusing {len(paths)} files in {data}")
        return paths
    shutil.rmtree(data, ignore_errors=True)
    (work / "ase.db").unlink(missing_ok=True)
    data.mkdir(parents=True)
    sizes = [structures // files + (i < structures % files) for i in range(files)]
    jobs = [(str(data / f"part-{i:04d}.xyz"), n, SEED + i) for i, n in enumerate(sizes)]
    log(f"data: generating {structures} structures in {files} extxyz files ({os.cpu_count()} processes)")
    done = atoms = 0
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        futures = [pool.submit(_make_file, *j) for j in jobs]
        for fut in concurrent.futures.as_completed(futures):
            _, n, a = fut.result()
            done += n
            atoms += a
            log(f"  generated {done}/{structures} structures ({time.perf_counter() - t0:.0f} s)")
    stamp.write_text(json.dumps({"params": want, "atoms": atoms}, indent=1))
    return sorted(data.glob("*.xyz"))


def prepare_db(work: Path, paths: list[Path]) -> Path:
    """An ASE SQLite database holding the same structures (read back from the files)."""
    import ase.io  # noqa: PLC0415

    from tests.synthetic import write_frames  # noqa: PLC0415

    db = work / "ase.db"
    if db.exists():
        log(f"ase.db: reusing {db}")
        return db
    log("ase.db: building from the extxyz files (once)")
    t0 = time.perf_counter()
    frames = [a for p in paths for a in ase.io.read(p, index=":")]
    tmp = work / "ase.tmp.db"
    tmp.unlink(missing_ok=True)
    write_frames(tmp, frames, fmt="db")
    os.replace(tmp, db)
    log(f"ase.db: {len(frames)} rows written in {time.perf_counter() - t0:.0f} s")
    return db


# --------------------------------------------------------------------------- timings


def time_ase_io(paths: list[Path]) -> dict:
    import ase.io  # noqa: PLC0415

    t0 = time.perf_counter()
    n = atoms = 0
    for p in paths:
        frames = ase.io.read(p, index=":")
        n += len(frames)
        atoms += sum(len(a) for a in frames)
    return {"seconds": time.perf_counter() - t0, "records": n, "atoms": atoms}


def time_build(work: Path, workers: int, rep: int, shards: int) -> dict:
    out = work / "out" / f"w{workers}-r{rep}"
    shutil.rmtree(out, ignore_errors=True)
    args = {"workers": workers, "out": str(out), "root": str(work), "shards": shards,
            "dataset": DATASET, "fidelity": FIDELITY}
    result = run_child(CHILD, args, REPO, f"build with {workers} worker(s)")
    result["out"] = str(out)
    return result


def time_shard_reads(out: Path, reads: int, seed: int) -> dict:
    import numpy as np  # noqa: PLC0415

    from data_pipeline.stream.dataset import ShardedDataset  # noqa: PLC0415

    ds = ShardedDataset(out)
    idx = np.random.default_rng(seed).integers(0, len(ds), size=reads).tolist()
    t0 = time.perf_counter()
    atoms = 0
    for i in idx:
        atoms += len(ds[i]["numbers"])
    return {"seconds": time.perf_counter() - t0, "records": reads, "atoms": atoms}


def time_db_reads(db_path: Path, reads: int, seed: int) -> dict:
    import ase.db  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    db = ase.db.connect(str(db_path))
    n = db.count()
    ids = (np.random.default_rng(seed).integers(0, n, size=reads) + 1).tolist()
    atoms = 0
    with db:  # one open connection for all reads (the fast way to use ase.db)
        t0 = time.perf_counter()
        for k in ids:
            atoms += len(db.get(id=k).toatoms())
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "records": reads, "atoms": atoms}


# --------------------------------------------------------------------------- profile


def profile_one_unit(work: Path, paths: list[Path], shards: int) -> None:
    """cProfile of the convert task of the first file and of one shard write, in-process."""
    import cProfile  # noqa: PLC0415
    import pstats  # noqa: PLC0415

    from data_pipeline.build.driver import write_shard_task  # noqa: PLC0415
    from data_pipeline.build.convert import convert_unit  # noqa: PLC0415
    from data_pipeline.build.recipe import Recipe, SourceConfig  # noqa: PLC0415
    from data_pipeline.build.sources import plan_units  # noqa: PLC0415

    recipe = Recipe(sources=[SourceConfig(path="data/*.xyz", dataset=DATASET, fidelity=FIDELITY,
                                          energy_key="REF_energy", forces_key="REF_forces",
                                          stress_key="REF_stress")],
                    shards=shards, root=str(work))
    unit = plan_units(recipe)[0]
    prof_dir = work / "profile"
    shutil.rmtree(prof_dir, ignore_errors=True)
    staging = prof_dir / ".build"
    staging.mkdir(parents=True)
    from data_pipeline.build.sources import read_unit  # noqa: PLC0415
    from scipy.spatial import cKDTree  # noqa: F401, PLC0415 - validation's; warm it first

    next(iter(read_unit(unit)))  # import the reader before profiling
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    summary = convert_unit(0, unit, recipe.sources[0], recipe.validation, str(staging))
    prof.disable()
    seconds = time.perf_counter() - t0
    print(f"\n## cProfile: convert_unit of {Path(unit.path).name} "
          f"({summary['records']} records, {seconds:.2f} s with profiling)\n")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    write_shard_task(0, str(staging), str(prof_dir), [summary["records"]], 1, [0], [0],
                     [FIDELITY], [DATASET])
    prof.disable()
    print(f"\n## cProfile: write_shard_task of that unit into 1 shard "
          f"({time.perf_counter() - t0:.2f} s with profiling)\n")
    pstats.Stats(prof).sort_stats("tottime").print_stats(15)


# --------------------------------------------------------------------------- report


def table(r: dict) -> str:
    def rate(key):
        s = r["rates"][key]
        return f"{s['median']:,.0f}", f"{s['min']:,.0f} - {s['max']:,.0f}"

    io, b1, b2 = (r["rates"][k]["median"] for k in ("ase_io", "build_1", "build_2"))
    sd, db = r["rates"]["shard_random"]["median"], r["rates"]["db_random"]["median"]
    rows = [
        ("`ase.io.read(f, index=':')`, all files, 1 process (baseline)", "structures/s",
         *rate("ase_io"), "1.00x (reference)"),
        ("`build`, 1 worker", "structures/s", *rate("build_1"), f"{b1 / io:.2f}x ase.io"),
        ("`build`, 2 workers", "structures/s", *rate("build_2"),
         f"{b2 / b1:.2f}x 1 worker; {b2 / 2 / io:.2f}x ase.io per worker"),
        ("`ShardedDataset[i]`, random i, 1 process", "records/s", *rate("shard_random"),
         f"{sd / db:.1f}x ase.db random; {sd / io:.1f}x ase.io sequential"),
        ("`ase.db` `get(id=k).toatoms()`, random k, 1 process", "records/s", *rate("db_random"),
         "1.00x (peer reference)"),
    ]
    return markdown(["measurement", "unit", "median", "min - max", "ratio (medians)"], rows,
                    "llrrl")


def main(argv=None) -> int:
    p = parser(__doc__, repeats=3, tries=3, work=WORK, out_help="default <work>/results.json")
    p.add_argument("--structures", type=int, default=20000)
    p.add_argument("--files", type=int, default=20)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--reads", type=int, default=20000, help="random ShardedDataset reads")
    p.add_argument("--db-reads", type=int, default=2000, help="random ase.db reads")
    p.add_argument("--profile", action="store_true",
                   help="also print a cProfile of one convert task and one shard write")
    a = p.parse_args(argv)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start, head = time.perf_counter(), header(("ray", "ase"))

    paths = prepare_data(work, a.structures, a.files)
    db = prepare_db(work, paths)
    shutil.rmtree(work / "out", ignore_errors=True)

    runs = Runs(("ase_io", "build_1", "build_2", "shard_random", "db_random"), a.repeats, a.tries)

    def measure(key: str, what: str, rep: int, fn, *args) -> dict:
        return runs.measure(key, rep, lambda r: f"{what}  {r['records']} in {r['seconds']:.2f} s = "
                            f"{r['records'] / r['seconds']:,.0f}/s", fn, *args)

    for rep in range(a.repeats):
        measure("ase_io", "ase.io.read, structures", rep, timed, time_ase_io, paths)
        for w in (1, 2):  # each build is accounted inside its subprocess
            r = measure(f"build_{w}", f"build, {w} worker(s), records", rep,
                        time_build, work, w, rep, a.shards)
            log(f"  content hash {r['content_hash'][:16]}")

    hashes = {r["content_hash"] for k in ("build_1", "build_2") for r in runs.runs[k]}
    identical = len(hashes) == 1
    print(f"\n1-worker vs 2-worker shards byte-identical (manifest content_hash): "
          f"{'YES' if identical else 'NO'} ({', '.join(sorted(h[:16] for h in hashes))})",
          flush=True)

    out1 = Path(runs.runs["build_1"][0]["out"])
    for rep in range(a.repeats):
        measure("shard_random", "ShardedDataset random reads", rep,
                timed, time_shard_reads, out1, a.reads, SEED + rep)
        measure("db_random", "ase.db random reads", rep,
                timed, time_db_reads, db, a.db_reads, SEED + rep)

    rates = runs.summary(lambda x: x["records"] / x["seconds"])
    io, b1, b2 = (rates[k]["median"] for k in ("ase_io", "build_1", "build_2"))
    first = runs.runs["build_1"][0]
    results = head | {
        "params": vars(a) | {"work": str(work)},
        "structures": first["records"], "atoms": first["atoms"], "rejects": first["rejects"],
        "rates": rates,
        "ratios": {"build2_over_build1": b2 / b1, "build1_over_ase_io": b1 / io,
                   "build2_per_worker_over_ase_io": b2 / 2 / io,
                   "shard_random_over_db_random": rates["shard_random"]["median"]
                   / rates["db_random"]["median"],
                   "shard_random_over_ase_io_sequential": rates["shard_random"]["median"] / io},
        "targets": {"speedup_2_over_1": {"target": 1.8, "measured": b2 / b1, "met": b2 / b1 >= 1.8},
                    "per_worker_vs_ase_io": {"target": 1.0, "measured": b2 / 2 / io,
                                             "met": b1 / io >= 1.0 and b2 / 2 / io >= 1.0}},
        "byte_identical_1_vs_2_workers": identical, "content_hashes": sorted(hashes),
    } | runs.record() | {"total_seconds": time.perf_counter() - t_start}

    print(f"\n{results['structures']} structures ({results['atoms']} atoms, "
          f"{results['rejects']} rejected) in {a.files} extxyz files; {a.shards} shards; "
          f"median of {a.repeats} runs")
    t = results["targets"]
    write_result(a.out or work / "results.json", results, table(results))
    print(f"\ntarget >= 1.8x from 1 to 2 workers: {t['speedup_2_over_1']['measured']:.2f}x "
          f"-> {'met' if t['speedup_2_over_1']['met'] else 'NOT met'}")
    print(f"target build per worker >= ase.io: 1 worker {b1 / io:.2f}x, 2 workers "
          f"{b2 / 2 / io:.2f}x per worker -> {'met' if t['per_worker_vs_ase_io']['met'] else 'NOT met'}")
    print(f"byte-identical 1 vs 2 workers: {identical}")
    print(load_note(results))

    if a.profile:
        profile_one_unit(work, paths, a.shards)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
