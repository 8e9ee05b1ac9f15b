"""Peak memory of one force call of the ``benchmarks/md_model.yaml`` release vs the cell size
(issue 28, item 2). ``MLIP_PRETRAIN_KERNELS=torch`` in the environment measures the torch
ops instead of the fused CPU kernels (the baseline before them).

Each size runs in a fresh interpreter: load the release through the ASE calculator
(float32, CPU), call it once on an 8-atom cell (so the weights and the code are resident),
read the peak RSS, then one force call on an fcc Cu supercell of N atoms (rattled 0.05 A)
and read the peak RSS again. The difference is that call's memory; a linear fit over the
sizes gives bytes per atom, and where 24 GiB would be reached.

    .venv/bin/python -m benchmarks.bench_memory [--sizes 1000,4000,16000,50000] [--work benchmarks/_work/md]
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.bench_md import ensure_release
from benchmarks.harness import REPO, RESULTS, WORK, header, log, markdown, parser, run_child, write_result

CHILD = r"""
import json, resource, sys, time
import numpy as np
import torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
from ase.build import bulk
from pretrain.release import MLIPCalculator
calc = MLIPCalculator.from_release(a["release"], fidelity=a["fidelity"], dtype="float32", coverage="ignore")
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
small = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1, 1, 2))
small.calc = calc
small.get_forces()
base = rss()
reps = max(1, round((a["atoms"] / 4) ** (1 / 3)))
atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((reps, reps, max(1, round(a["atoms"] / (4 * reps * reps)))))
atoms.rattle(0.05, seed=0)
atoms.calc = calc
t = time.perf_counter()
atoms.get_forces()
print("RESULT " + json.dumps({"atoms": len(atoms), "base_bytes": base, "peak_bytes": rss(),
                              "seconds": time.perf_counter() - t}))
"""


def _available() -> float:
    """Bytes of memory available now (/proc/meminfo), inf where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def main(argv=None) -> int:
    ap = parser(__doc__, work=WORK / "md", out=RESULTS / "memory.json")
    ap.add_argument("--sizes", default="500,1000,2000,4000")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    release = ensure_release(work)
    fidelity = json.loads((release / "config.json").read_text())["fidelities"][0]["name"]
    res = header(("torch",)) | {"release": str(release), "rows": []}
    rows = res["rows"]
    for n in (int(x) for x in a.sizes.split(",")):
        if rows and _available() < 1.25 * n * rows[-1]["call_bytes"] / rows[-1]["atoms"]:
            log(f"{n} atoms: skipped (it would need about {n * rows[-1]['call_bytes'] / rows[-1]['atoms'] / 2**30:.0f} "
                f"GiB; {_available() / 2**30:.0f} GiB available)")
            continue
        r = run_child(CHILD, {"release": str(release), "fidelity": fidelity, "atoms": n, "threads": a.threads},
                      REPO, f"force call of {n} atoms", timeout=1800)
        r["call_bytes"] = r["peak_bytes"] - r["base_bytes"]
        rows.append(r)
        log(f"{r['atoms']:>7} atoms: force call +{r['call_bytes'] / 2**20:,.0f} MiB over the loaded model "
            f"({r['call_bytes'] / r['atoms'] / 1024:.1f} KiB/atom), {r['seconds']:.2f} s")
    import numpy as np  # noqa: PLC0415

    n = np.array([r["atoms"] for r in rows], float)
    b = np.array([r["call_bytes"] for r in rows], float)
    slope, intercept = np.polyfit(n, b, 1)
    limit = (24 * 2**30 - rows[-1]["base_bytes"] - intercept) / slope
    res["fit"] = {"bytes_per_atom": slope, "intercept_bytes": intercept, "atoms_in_24_GiB": limit}
    log(f"linear fit: {slope / 1024:.1f} KiB per atom (+{intercept / 2**20:.0f} MiB); 24 GiB holds about "
        f"{limit:,.0f} atoms in one force call")
    write_result(a.out, res, markdown(
        ["atoms", "force call MiB over the loaded model", "KiB per atom", "seconds"],
        [[r["atoms"], f"{r['call_bytes'] / 2**20:,.0f}", f"{r['call_bytes'] / r['atoms'] / 1024:.1f}",
          f"{r['seconds']:.2f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
