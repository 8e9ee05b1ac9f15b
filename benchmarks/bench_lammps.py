"""LAMMPS (``mlip-pretrain lammps``, ``fix external``) vs ASE MD of the same release
(BENCHMARKS.md, "LAMMPS").

NVE velocity Verlet of fcc Cu supercells of 64, 512 and 4,096 atoms (primitive cells
repeated 4, 8 and 16 times: triclinic boxes) at 600 K, the same release, fidelity and
precision in both: steps/s of LAMMPS (its loop time) and of ASE's ``VelocityVerlet`` (wall
time of ``run``), and the glue's share of LAMMPS's loop (gathering atoms, building the
structure, setting forces, energy and virial; the model's own time excluded). Medians over
``--repeats``; one process, one rank.

    .venv/bin/python -m benchmarks.bench_lammps [--release out/demo/release] [--fidelity EMT]
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO, RESULTS, header, markdown, parser, write_result

SIZES = {64: (4, 60), 512: (8, 20), 4096: (16, 4)}  # atoms: (repeat, steps)


def cell(repeat: int):
    import numpy as np
    from ase.build import bulk
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = bulk("Cu", "fcc", a=3.61).repeat((repeat,) * 3)
    atoms.rattle(0.02, seed=1)
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=np.random.default_rng(0))
    return atoms


def lammps_rate(atoms, steps: int, release: str, fidelity: str, dtype: str, work: Path) -> tuple[float, float]:
    """``(steps/s, glue share of the loop)`` of one LAMMPS run."""
    from ase.io import write

    from lammps_glue.run import run_lammps

    write(work / "cell.data", atoms, format="lammps-data", specorder=["Cu"], masses=True, velocities=True)
    (work / "in.bench").write_text("units metal\natom_style atomic\nread_data cell.data\npair_style mlip\n"
                                   f"pair_coeff * * Cu\ntimestep 0.001\nfix 1 all nve\nthermo {steps}\n"
                                   f"run 1 post no\nrun {steps}\n")  # the first call warms the model up
    import os

    cwd = os.getcwd()
    os.chdir(work)
    try:
        out = run_lammps("in.bench", release, fidelity, dtype=dtype, log="log.bench", screen=False)
    finally:
        os.chdir(cwd)
    loops = re.findall(r"Loop time of ([0-9.eE+-]+) on \d+ procs for (\d+) steps", (work / "log.bench").read_text())
    seconds, n = float(loops[-1][0]), int(loops[-1][1])
    per_call = out["glue_s"] / out["calls"]
    return n / seconds, per_call * n / seconds


def ase_rate(atoms, steps: int, release: str, fidelity: str, dtype: str) -> float:
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from pretrain.release.calculator import MLIPCalculator

    atoms = atoms.copy()
    atoms.calc = MLIPCalculator.from_release(release, fidelity, dtype=dtype)
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(1)
    t0 = time.perf_counter()
    dyn.run(steps)
    return steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = parser(__doc__, repeats=3, out=RESULTS / "lammps.json")
    default = REPO / "out" / "demo" / "release"
    p.add_argument("--release", default=str(default if default.exists() else REPO / "tests/fixtures/release-v1"))
    p.add_argument("--fidelity", default="EMT")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = p.parse_args(argv)
    res = header(("torch", "ase")) | {"release": args.release, "fidelity": args.fidelity,
                                      "dtype": args.dtype, "rows": []}
    for n, (repeat, steps) in SIZES.items():
        atoms = cell(repeat)
        lmp, glue, ase = [], [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                rate, share = lammps_rate(atoms, steps, args.release, args.fidelity, args.dtype, Path(tmp))
            lmp.append(rate)
            glue.append(share)
            ase.append(ase_rate(atoms, steps, args.release, args.fidelity, args.dtype))
        row = {"atoms": n, "steps": steps, "lammps_steps_per_s": statistics.median(lmp),
               "ase_steps_per_s": statistics.median(ase), "glue_share": statistics.median(glue)}
        row["lammps_over_ase"] = row["lammps_steps_per_s"] / row["ase_steps_per_s"]
        res["rows"].append(row)
        print(f"{n:>6} atoms: LAMMPS {row['lammps_steps_per_s']:8.2f} steps/s, ASE {row['ase_steps_per_s']:8.2f} "
              f"steps/s, ratio {row['lammps_over_ase']:.2f}, glue {100 * row['glue_share']:.1f}% of the loop",
              flush=True)
    write_result(args.out, res, markdown(
        ["atoms", "LAMMPS steps/s", "ASE steps/s", "LAMMPS / ASE", "glue share of the loop"],
        [[r["atoms"], f"{r['lammps_steps_per_s']:.2f}", f"{r['ase_steps_per_s']:.2f}",
          f"{r['lammps_over_ase']:.2f}x", f"{r['glue_share']:.1%}"] for r in res["rows"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
