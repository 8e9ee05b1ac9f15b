"""What fingerprints, the duplicate join and the leakage check cost (BENCHMARKS.md, "What the data holds").

1. **Fingerprints in the build.** The conversion of every unit of the build benchmark's
   extxyz data (``bench_build.prepare_data``: EMT-like crystals and clusters, 1-64 atoms),
   in one process, with the fingerprints on and with them replaced by zeros; 3 interleaved
   repetitions, medians. Then whole builds (1 worker, fresh interpreter each), with the
   duplicate join's share of the build timed inside.
2. **The join at scale.** Staged units of synthetic records (random 64-bit keys, 1% exact
   copies, 1% near copies) at 1e5 to 2e6 records, joined in a fresh interpreter (its peak
   RSS), every key range of the three keys in turn as the Ray tasks would. The time per
   record gives the law; a task holds about ``JOIN_RECORDS`` (500,000) records whatever
   the total, so the peak memory stops growing once there are several ranges.
3. **Leakage lookups.** An evaluation set of 1e5 keys against training shards of 1e5
   records each: seconds per training record.

    .venv/bin/python -m benchmarks.bench_duplicates [--structures 20000] [--work benchmarks/_work]
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

from benchmarks.bench_build import prepare_data
from benchmarks.harness import (
    REPO, RESULTS, WORK, header, log, parser, run_child, summarise, write_result)

CONVERT_CHILD = r"""
import json, sys, time, shutil
from pathlib import Path
import numpy as np
args = json.loads(sys.argv[1])
import data_pipeline.build.convert as convert
from data_pipeline.build.recipe import Recipe, SourceConfig, ValidationConfig
from data_pipeline.build.sources import plan_units
from data_pipeline.fingerprints import KEYS
real = convert.record_fingerprints
off = lambda recs: {k: np.zeros(len(recs), np.uint64) for k in KEYS}
src = SourceConfig(path=args["glob"], dataset="bench", fidelity="linear", energy_key="REF_energy",
                   forces_key="REF_forces", stress_key="REF_stress")
recipe = Recipe(sources=[src], shards=4, root=args["root"])
units = plan_units(recipe)
times = {"on": [], "off": []}
fp_only = []
for rep in range(3):
    for mode in ("on", "off"):
        convert.record_fingerprints = real if mode == "on" else off
        staging = Path(args["work"]) / f"staging-{mode}"
        shutil.rmtree(staging, ignore_errors=True); staging.mkdir(parents=True)
        t = time.perf_counter()
        for uid, u in enumerate(units):
            convert.convert_unit(uid, u, src, ValidationConfig(max_atoms=500), str(staging))
        times[mode].append(time.perf_counter() - t)
# the fingerprints alone, on the same records (decoded back from one staging)
from data_pipeline.schema import decode
staging = Path(args["work"]) / "staging-on"
recs = []
for uid in range(len(units)):
    idx = np.load(staging / f"unit-{uid:06d}.index.npy")
    buf = (staging / f"unit-{uid:06d}.bin").read_bytes()
    recs += [decode(buf[o:o + n]) for o, n, _ in idx]
for _ in range(3):
    t = time.perf_counter()
    for i in range(0, len(recs), 256):
        real(recs[i:i + 256])
    fp_only.append(time.perf_counter() - t)
print("RESULT " + json.dumps({"convert_on": times["on"], "convert_off": times["off"], "fingerprints": fp_only,
                              "records": len(recs)}))
"""

BUILD_CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import ray
ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
import data_pipeline.build.driver as driver
from data_pipeline.build.recipe import Recipe, SourceConfig
spent = {}
real = driver._duplicates
def timed(*a, **k):
    t = time.perf_counter(); out = real(*a, **k); spent["join"] = time.perf_counter() - t; return out
driver._duplicates = timed
src = SourceConfig(path=args["glob"], dataset="bench", fidelity="linear", energy_key="REF_energy",
                   forces_key="REF_forces", stress_key="REF_stress")
t = time.perf_counter()
driver.build(Recipe(sources=[src], shards=4, root=args["root"]), args["out"], workers=1, progress=False)
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "join": spent["join"]}))
"""

JOIN_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import numpy as np
args = json.loads(sys.argv[1])
from data_pipeline.build import duplicates as D
from data_pipeline.build.duplicate_report import classes, combine
from data_pipeline.build.convert import JOIN_DTYPE, JOIN_KEYS, unit_file
from data_pipeline.schema import AtomsRecord, encode
n, per_unit, staging = args["records"], args["per_unit"], Path(args["staging"])
rng = np.random.default_rng(0)
rec = encode(AtomsRecord(numbers=np.array([29, 29]), positions=np.array([[0.0, 0, 0], [1.3, 1.3, 0]]),
                         cell=np.diag([3.6] * 3), pbc=np.array([True] * 3), energy=-7.0,
                         forces=np.zeros((2, 3), np.float32)))
exact = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + np.uint64(1)
near = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64)
dup = rng.choice(n, n // 100, replace=False)  # 1% exact copies of an earlier record
exact[dup] = exact[rng.integers(0, n, len(dup))]
nd = rng.choice(n, n // 100, replace=False)  # 1% near copies (another exact key)
near[nd] = near[rng.integers(0, n, len(nd))]
units = []
for u, lo in enumerate(range(0, n, per_unit)):
    hi = min(n, lo + per_unit)
    np.save(unit_file(staging, u, ".index.npy"), np.tile([0, len(rec), 2], (hi - lo, 1)).astype(np.int64))
    unit_file(staging, u, ".bin").write_bytes(rec)
    join = np.zeros((3, hi - lo), JOIN_DTYPE)
    for i, values in enumerate((exact, near, near + np.uint64(1))):
        rows = np.zeros(hi - lo, JOIN_DTYPE)
        rows["key"], rows["row"], rows["exact"] = values[lo:hi], np.arange(hi - lo), exact[lo:hi]
        rows["energy"], rows["n_atoms"], rows["frame"] = -7.0, 2, np.arange(hi - lo)
        join[i] = rows[np.argsort(rows["key"], kind="stable")]
    np.save(unit_file(staging, u, ".join.npy"), join)
    units.append(D.UnitInfo(u, lo, hi - lo, int(u % 2), 0, f"unit{u}"))
D.JOIN_RECORDS = args["join_records"]
policy = D.Policy()
t = time.perf_counter()
ranges = D.key_ranges(n)
base = (units, str(staging), np.zeros(0, np.int64), policy, ["A", "B"], ["d"])
near_r = [D.join_task(k, lo, hi, *base) for k in JOIN_KEYS[1:] for lo, hi in ranges]
remap = classes(near_r)
exact_r = [D.join_task("fp_exact", lo, hi, *base, remap) for lo, hi in ranges]
exact_r.append(D.join_task("fp_exact", 0, 1 << 64, *base, remap, True))
dups = combine(exact_r, near_r, remap, units, ["A", "B"], policy)
seconds = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps({"records": n, "seconds": seconds, "peak_rss_mib": rss, "tasks": 3 * len(ranges) + 1,
                              "duplicates": sum(c["exact_duplicates_within_dataset"] for c in dups.report["fidelities"].values())}))
"""

LEAK_CHILD = r"""
import json, sys, time
import numpy as np
args = json.loads(sys.argv[1])
from data_pipeline import leakage as L
from data_pipeline.fingerprints import KEYS
rng = np.random.default_rng(1)
def keys(n):
    out = {k: rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) for k in KEYS}
    out["fidelity"] = np.full(n, 7, np.uint64); out["periodic"] = np.ones(n, bool)
    return out
ev = keys(args["eval"])
shards = [keys(args["shard"]) for _ in range(args["shards"])]
flags = np.zeros((5, args["eval"]), np.int8); match = np.full(args["eval"], -1, np.int64)
t = time.perf_counter()
for s, tk in enumerate(shards):
    L._compare(ev, tk, flags, match, s, np.zeros(args["eval"], bool), None, [], np.zeros((0, 2), np.int64))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "train_records": args["shard"] * args["shards"]}))
"""


def main(argv=None) -> int:
    ap = parser(__doc__, work=WORK, out=RESULTS / "duplicates.json")
    ap.add_argument("--structures", type=int, default=20000)
    ap.add_argument("--files", type=int, default=20)
    ap.add_argument("--sizes", default="100000,500000,1000000,2000000")
    ap.add_argument("--join-records", type=int, default=500_000, help="records per join task (the build's default)")
    a = ap.parse_args(argv)
    work = Path(a.work)
    prepare_data(work, a.structures, a.files)
    data = {"glob": "data/*.xyz", "root": str(work), "work": str(work / "dups")}
    out = header()
    log("1. conversion with and without fingerprints (one process, 3 interleaved repetitions)")
    conv = run_child(CONVERT_CHILD, data, REPO, "convert")
    on, off = statistics.median(conv["convert_on"]), statistics.median(conv["convert_off"])
    out["convert"] = {"records": conv["records"], "on_s": summarise(conv["convert_on"]),
                      "off_s": summarise(conv["convert_off"]), "fingerprints_s": summarise(conv["fingerprints"]),
                      "share": (on - off) / on, "fingerprint_us_per_record": 1e6 * statistics.median(conv["fingerprints"]) / conv["records"]}
    log(f"   convert {on:.2f} s with, {off:.2f} s without: {100 * (on - off) / on:.1f}% of the conversion; "
        f"fingerprints alone {out['convert']['fingerprint_us_per_record']:.1f} us/record")
    builds = []
    for rep in range(3):
        shutil.rmtree(work / "dups-build", ignore_errors=True)
        builds.append(run_child(BUILD_CHILD, {**data, "out": str(work / "dups-build")}, REPO, "build"))
    b = {k: statistics.median(r[k] for r in builds) for k in ("seconds", "join")}
    out["build"] = {"seconds": summarise([r["seconds"] for r in builds]), "join_s": summarise([r["join"] for r in builds]),
                    "join_share": b["join"] / b["seconds"]}
    log(f"   build (1 worker) {b['seconds']:.1f} s, of which the duplicate join {b['join']:.2f} s "
        f"({100 * b['join'] / b['seconds']:.1f}%)")
    log("2. the join at scale (synthetic staged units, fresh interpreter per size)")
    out["join"] = []
    for n in (int(x) for x in a.sizes.split(",")):
        staging = work / f"join-{n}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        r = run_child(JOIN_CHILD, {"records": n, "per_unit": 10000, "staging": str(staging),
                                   "join_records": a.join_records}, REPO, f"join {n}")
        shutil.rmtree(staging, ignore_errors=True)
        out["join"].append(r)
        log(f"   {n:>9,} records: {r['seconds']:.2f} s ({1e6 * r['seconds'] / n:.2f} us/record), "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB, {r['tasks']} tasks")
    log("3. leakage lookups (1e5 evaluation keys vs 10 training shards of 1e5)")
    r = run_child(LEAK_CHILD, {"eval": 100000, "shard": 100000, "shards": 10}, REPO, "leakage")
    out["leakage"] = r
    log(f"   {1e9 * r['seconds'] / r['train_records']:.0f} ns per training record")
    write_result(a.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
