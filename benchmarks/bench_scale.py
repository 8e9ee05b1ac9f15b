"""Scale benchmark: sampler planning at 1e8 records, a reader over thousands of shards, and
the build of one big extended-XYZ file with 1 and 2 workers.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_scale [--records 100000000] [--worlds 8 64 1024]
        [--shards 500 5000] [--frames 100000] [--unit-mib 8] [--work benchmarks/_work/scale]

Each measurement runs in a fresh interpreter (so its peak RSS, ``ru_maxrss``, is its own):

Wall times on a loaded machine are inflated by other processes; where a part runs in one
process its own CPU time (``time.process_time``) is reported as well.

1. **sampler**: per world size, ``records`` records' metadata only (atom counts 1-64,
   30 dataset x fidelity groups; no record exists), an :class:`AtomBudgetSampler` at
   ``max_atoms=512``; timed: construction, the epoch plan (mix, pack, split to a
   multiple of the world size, each timed), and the per-step bookkeeping
   (``advance()``), next to the per-rank loop it replaced (``batch(step, r)`` and a
   bincount for every rank, timed on 20 steps). Peak RSS with and without the metadata.
2. **reader**: a folder of ``shards`` tiny shards (2 records each) built by the real
   builder; one process opens ``ShardedDataset``, reads every shard's metadata and
   20,000 random records; open file descriptors and peak RSS, with the LRU bound
   (128 environments) and with it lifted (``MLIP_MAX_OPEN_SHARDS=10**6``: the old
   behaviour of one open environment per shard ever read).
3. **build**: one extxyz file of ``frames`` frames (``synthetic.labelled_frames``,
   ``linear`` labels, 20% clusters, 2-64 atoms); ``ase.io.iread(f, index=":")`` (and, up
   to 2e5 frames, ``ase.io.read``, which keeps every ``Atoms``) in one process, then
   ``build`` with 1 and 2 workers (fresh Ray with N CPUs, workers up before timing, only
   ``build`` timed) with ``text_unit_bytes = unit-mib`` MiB, so the file is split into
   byte-range units.

CPU that other processes used during each timed part is recorded (``other_cpu_s``).
Results go to stdout (JSON per part) and ``<work>/results.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from benchmarks.harness import (
    REPO, WORK, cpu_snapshot, header, log, other_cpu, parser, run_child, write_result)

# a fresh interpreter runs one part: bench_scale.<part>(args), printing its JSON result
CHILD = ("import json, sys; from benchmarks import bench_scale as b; a = json.loads(sys.argv[1]); "
         "print('RESULT ' + json.dumps(getattr(b, a['part'])(a)))")


def _ray_init(cpus: int, tries: int = 5) -> None:
    """Start a local Ray, retrying: on an overloaded machine the raylet can miss Ray's
    fixed 30 s start-up wait."""
    import ray  # noqa: PLC0415

    for attempt in range(1, tries + 1):
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False)
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception here
            ray.shutdown()
            if attempt == tries:
                raise
            log(f"ray start failed ({err}); retrying")
            time.sleep(10)


def _rss_mib() -> float:
    import resource  # noqa: PLC0415

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- 1. sampler


def sampler_part(args: dict) -> dict:
    """Plan one epoch of ``records`` records' metadata for ``world`` ranks (child)."""
    import numpy as np  # noqa: PLC0415

    import data_pipeline.stream.sampler as S  # noqa: PLC0415

    rng = np.random.default_rng(0)
    n, world = args["records"], args["world"]
    n_atoms = rng.integers(1, 65, n, dtype=np.int64)
    groups = rng.integers(0, 30, n, dtype=np.int64)
    keys = [(f"set{g // 3}", f"fid{g % 3}") for g in range(30)]
    rss_meta = _rss_mib()
    times: dict[str, float] = {}
    for name in ("pack", "split_to_multiple"):
        fn = getattr(S, name)

        def wrapped(*a, _fn=fn, _name=name):
            t = time.perf_counter()
            out = _fn(*a)
            times[_name] = time.perf_counter() - t
            return out
        setattr(S, name, wrapped)
    t0 = time.perf_counter()
    s = S.AtomBudgetSampler(n_atoms, groups, keys, S.SamplerConfig(max_atoms=512), 0, world)
    times["construct"] = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    steps = s.steps_per_epoch
    times["plan"] = time.perf_counter() - t0
    times["plan_cpu"] = time.process_time() - c0  # this process's CPU: what others' load cannot inflate
    c0 = time.process_time()
    for _ in range(200):
        s.advance()
    times["advance_per_step_cpu"] = (time.process_time() - c0) / 200
    c0 = time.process_time()
    for step in range(200, 220):  # the replaced bookkeeping: every rank's batch, one by one
        for r in range(world):
            idx = s.batch(step, r)
            np.bincount(s._fid_of_group[s.groups[idx]], weights=s.n_atoms[idx], minlength=3)
    times["per_rank_loop_per_step_cpu"] = (time.process_time() - c0) / 20
    return {"records": n, "world": world, "steps_per_epoch": steps,
            "batches": int(len(s._bounds) - 1), "seconds": {k: round(v, 6) for k, v in times.items()},
            "rss_metadata_mib": round(rss_meta), "rss_peak_mib": round(_rss_mib())}


# --------------------------------------------------------------------------- 2. reader


def make_shard_folder(work: Path, n_shards: int) -> Path:
    """``n_shards`` shards of 2 tiny records each, built by the real builder (cached)."""
    out = work / f"shards-{n_shards}"
    if (out / "manifest.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)  # an unfinished earlier attempt
    import numpy as np  # noqa: PLC0415

    from data_pipeline.build import build  # noqa: PLC0415
    from data_pipeline.build.recipe import Recipe, SourceConfig  # noqa: PLC0415

    rng = np.random.default_rng(1)
    lines = []
    for _ in range(2 * n_shards):
        lines += ["2", f'energy={-7.0 + 0.01 * rng.normal():.6f} pbc="F F F"',
                  "Cu 0.0 0.0 0.0", f"Au 0.0 0.0 {2.0 + rng.random():.5f}"]
    raw = work / f"raw-{n_shards}" / "tiny.xyz"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("\n".join(lines) + "\n")
    recipe = Recipe(sources=[SourceConfig(path=str(raw), dataset="tiny", fidelity="toy",
                                          energy_key="energy")], shards=n_shards, root=str(work))
    log(f"reader: building {n_shards} shards (once)")
    import ray  # noqa: PLC0415

    _ray_init(2)
    build(recipe, out, workers=2, progress=False)
    ray.shutdown()
    return out


def reader_part(args: dict) -> dict:
    """Open a many-shard folder, read its metadata and random records (child)."""
    os.environ["MLIP_MAX_OPEN_SHARDS"] = str(args["max_open"])
    import numpy as np  # noqa: PLC0415

    from data_pipeline.stream import ShardedDataset  # noqa: PLC0415

    fds0 = len(os.listdir("/proc/self/fd"))
    t0 = time.process_time()
    ds = ShardedDataset(args["folder"])
    n_atoms = ds.n_atoms
    t_meta = time.process_time() - t0
    idx = np.random.default_rng(0).integers(0, len(ds), 20_000)
    t0 = time.process_time()
    atoms = sum(len(ds[int(i)]["numbers"]) for i in idx)
    t_read = time.process_time() - t0
    return {"shards": len(ds.shards), "records": len(ds), "max_open": args["max_open"],
            "open_fds_added": len(os.listdir("/proc/self/fd")) - fds0,
            "open_cpu_s": round(t_meta, 3), "reads_per_cpu_s": round(len(idx) / t_read),
            "atoms_read": int(atoms), "atoms_meta": int(n_atoms.sum()), "rss_peak_mib": round(_rss_mib())}


# --------------------------------------------------------------------------- 3. build


def make_big_file(work: Path, frames: int) -> Path:
    """One extxyz file of ``frames`` synthetic frames, generated in 2 processes (cached).

    Parts of at most 50,000 frames (seeds 7, 8, ...; at least two parts), so memory stays
    bounded at 1e6 frames and a file of up to 1e5 frames is the same as before.
    """
    import concurrent.futures  # noqa: PLC0415

    path = work / "big" / f"one-{frames}.xyz"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    n_parts = max(2, -(-frames // 50_000))
    parts = [(str(path) + f".part{k}", frames // n_parts + (k < frames % n_parts), 7 + k)
             for k in range(n_parts)]
    log(f"build: generating {frames} frames (once)")
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        list(pool.map(_make_part, *zip(*parts)))
    with open(str(path) + ".tmp", "wb") as out:
        for p, _, _ in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out)
            os.unlink(p)
    os.replace(str(path) + ".tmp", path)
    return path


def _make_part(path: str, n: int, seed: int) -> None:
    from tests.synthetic import labelled_frames, write_frames  # noqa: PLC0415

    tmp = Path(path + ".tmp.xyz")  # ase.io picks the format by suffix
    write_frames(tmp, labelled_frames(n, seed, "linear", 0.2, 64))
    os.replace(tmp, path)


def ase_part(args: dict) -> dict:
    """Plain ``ase.io`` reading of the file (child): ``read(f, index=":")``, which keeps
    every ``Atoms``, or ``iread``, which streams them (no list: the stricter baseline on
    big files, and constant memory)."""
    import ase.io  # noqa: PLC0415

    snap = cpu_snapshot()
    t0, c0 = time.perf_counter(), time.process_time()
    if args["mode"] == "read":
        records = len(ase.io.read(args["file"], index=":"))
    else:
        records = sum(1 for _ in ase.io.iread(args["file"], index=":"))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"mode": args["mode"], "seconds": seconds, "cpu_s": cpu, "records": records,
            "other_cpu_s": other_cpu(snap, cpu_snapshot()), "rss_peak_mib": round(_rss_mib())}


def build_part(args: dict) -> dict:
    """``build`` of the one file with N workers (child: fresh Ray, workers up first)."""
    import ray  # noqa: PLC0415

    _ray_init(args["workers"])

    @ray.remote(num_cpus=1)
    def _up():
        time.sleep(0.2)
        return os.getpid()

    ray.get([_up.remote() for _ in range(args["workers"])])
    from data_pipeline.build import build  # noqa: PLC0415
    from data_pipeline.build.recipe import Recipe, SourceConfig  # noqa: PLC0415

    recipe = Recipe(sources=[SourceConfig(path=args["file"], dataset="big", fidelity="linear",
                                          energy_key="REF_energy", forces_key="REF_forces",
                                          stress_key="REF_stress")],
                    shards=8, root=str(Path(args["file"]).parent), text_unit_bytes=args["unit_bytes"])
    shutil.rmtree(args["out"], ignore_errors=True)
    snap = cpu_snapshot()
    t0 = time.perf_counter()
    m = build(recipe, args["out"], workers=args["workers"], progress=False)
    seconds = time.perf_counter() - t0
    after = cpu_snapshot()
    other = other_cpu(snap, after)
    ours = None if snap is None or after is None else round(  # driver + raylet + Ray workers
        sum(t - snap[1].get(p, 0.0) for p, t in after[1].items()), 2)
    ray.shutdown()
    return {"workers": args["workers"], "seconds": seconds, "records": m["records"],
            "units": len(m["inputs"]), "content_hash": m["content_hash"], "other_cpu_s": other,
            "ours_cpu_s": ours,
            "rss_driver_peak_mib": round(_rss_mib())}


# --------------------------------------------------------------------------- main


def _child(part: str, args: dict) -> dict:
    return run_child(CHILD, {"part": part, **args}, REPO, part)


def main(argv=None) -> int:
    p = parser(__doc__, work=WORK / "scale", out_help="default <work>/results.json")
    p.add_argument("--records", type=int, default=100_000_000)
    p.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 1024])
    p.add_argument("--shards", type=int, nargs="+", default=[500, 5000])
    p.add_argument("--frames", type=int, default=100_000)
    p.add_argument("--unit-mib", type=float, default=8.0)
    p.add_argument("--parts", nargs="+", default=["sampler", "reader", "build"])
    a = p.parse_args(argv)
    a.work = Path(a.work).resolve()  # the children and the recipe's root need an absolute path
    a.work.mkdir(parents=True, exist_ok=True)
    results = header(("ray", "ase", "numpy"))
    if "sampler" in a.parts:
        results["sampler"] = []
        for world in a.worlds:
            r = _child("sampler_part", {"records": a.records, "world": world})
            log(f"sampler: {json.dumps(r)}")
            results["sampler"].append(r)
    if "reader" in a.parts:
        results["reader"] = []
        for n in a.shards:
            folder = make_shard_folder(a.work, n)
            for max_open in (128, 10**6):
                r = _child("reader_part", {"folder": str(folder), "max_open": max_open})
                log(f"reader: {json.dumps(r)}")
                results["reader"].append(r)
    if "build" in a.parts:
        big = make_big_file(a.work, a.frames)
        runs = []
        for mode in ("iread", "read") if a.frames <= 200_000 else ("iread",):  # read keeps every Atoms
            runs.append(_child("ase_part", {"file": str(big), "mode": mode}))
            log(f"build: ase.io {json.dumps(runs[-1])}")
        for workers in (1, 2):
            runs.append(_child("build_part", {"file": str(big), "workers": workers,
                                              "out": str(a.work / f"out-w{workers}"),
                                              "unit_bytes": int(a.unit_mib * (1 << 20))}))
            log(f"build: {json.dumps(runs[-1])}")
        results["build"] = {"file_bytes": big.stat().st_size, "frames": a.frames, "runs": runs}
    print(json.dumps(results, indent=1))
    write_result(a.out or a.work / "results.json", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
