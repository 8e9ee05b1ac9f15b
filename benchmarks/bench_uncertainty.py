"""LLPR vs a trained shallow ensemble on the demo data: calibration and cost
(BENCHMARKS.md, "Uncertainty").

Two runs of the demo's training config on the shipped QM splits, one plain and one with
``model.uncertainty=ensemble`` (same seed, data and steps), each released with its
uncertainty (LLPR fitted post hoc on the plain run; the ensemble's own on the other):
calibrated on the even half of the held-out split, scored on the odd half (Spearman,
coverage, miscalibration area, NLL) and out of distribution (compressed structures,
unseen elements), all read from the releases' ``metrics.json``. Cost: a force call of
``Predictor`` with and without the uncertainty on a 64-atom and a 512-atom Cu cell (EMT)
and 16 molecules (DFT), alternating, median over ``--repeats``; and the training
throughput of each run (atoms/s, mean over its log lines).

    .venv/bin/python -m benchmarks.bench_uncertainty [--work benchmarks/_work/uncertainty] [--repeats 15]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import REPO, RESULTS, WORK, header, log, parser, write_result

RUNS = {"llpr": [], "ensemble": ["model.uncertainty=ensemble"]}
DFT = "PBE/def2-SVP"


def _release(work: Path, method: str, splits: dict) -> Path:
    """Train (unless done) and release (unless done) one run."""
    run, release = work / f"run-{method}", work / f"release-{method}"
    if not (run / "checkpoints").is_dir():
        log(f"training the demo config ({method})")
        subprocess.run([sys.executable, "-m", "launch.cli", "train", "configs/train/demo.yaml",
                        f"data.folder={splits['train']}", f"eval.folder={splits['test']}", f"out={run}",
                        "tracking.enabled=false", *RUNS[method]], check=True, cwd=REPO)
    if not (release / "config.json").is_file():
        log(f"releasing {run} with its uncertainty")
        from pretrain.release.create import create

        create(run, release, progress=False, register=False, uncertainty=method)
    return release


def _cost(release: Path, repeats: int) -> dict:
    """Median force-call seconds with and without the uncertainty, per structure set."""
    import numpy as np
    import torch
    from ase.build import bulk, molecule

    from pretrain.release import Predictor
    from pretrain.release.loader import load_release

    torch.set_num_threads(2)
    trained = load_release(release)
    cells = {}
    for n, reps in ((64, (2, 2, 4)), (512, (4, 4, 8))):
        cell = bulk("Cu", cubic=True) * reps
        cell.rattle(0.05, seed=0)
        cells[f"Cu {n} atoms (EMT)"] = ("EMT", [cell])
    mols = [molecule(name) for name in ("CH3CH2OH", "C6H6", "CH3COOH", "H2O")] * 4
    for m in mols:
        m.info.update(charge=0, spin=1)
    cells["16 molecules (DFT)"] = (DFT, mols)
    out = {}
    for what, (fid, structures) in cells.items():
        on = Predictor(trained, fid)
        off = Predictor(trained, fid)
        off.uncertainty = False
        times = {"on": [], "off": []}
        for p in (on, off):
            p.run(structures, stress=False)
        for _ in range(repeats):
            for key, p in (("off", off), ("on", on)):
                t0 = time.perf_counter()
                p.run(structures, stress=False)
                times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[what] = {"atoms": int(sum(len(a) for a in structures)), "plain_ms": 1e3 * med["off"],
                     "with_uncertainty_ms": 1e3 * med["on"], "ratio": med["on"] / med["off"],
                     "ratio_spread": [float(np.min(times["on"]) / np.max(times["off"])),
                                      float(np.max(times["on"]) / np.min(times["off"]))]}
    return out


def _scores(release: Path) -> dict:
    metrics = json.loads((release / "metrics.json").read_text())
    unc = metrics["uncertainty"]
    rows = {}
    for fid, m in unc["fidelities"].items():
        o = unc.get("out_of_distribution", {}).get(fid, {})
        rows[fid] = {"spearman_energy": m["energy"].get("spearman"),
                     "spearman_forces_structure": m["forces"].get("spearman_structure"),
                     "spearman_forces_atom": m["forces"].get("spearman"),
                     "coverage_68": m["forces"].get("coverage_68"), "coverage_95": m["forces"].get("coverage_95"),
                     "gaussian_coverage_68": m["forces"].get("gaussian_coverage_68"),
                     "width_68": m["forces"].get("width_68"),
                     "energy_coverage_95": m["energy"].get("coverage_95"),
                     "miscalibration_area": m["forces"].get("miscalibration_area"), "nll": m["forces"].get("nll"),
                     "compressed_ratio": o.get("compressed_ratio"), "unseen_ratio": o.get("unseen_ratio"),
                     "energy_compressed_ratio": o.get("energy_compressed_ratio"),
                     "energy_unseen_ratio": o.get("energy_unseen_ratio"),
                     "forces_mae": metrics["fidelities"][fid].get("forces_mae")}
    return rows


def _throughput(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/atoms_per_s"] for r in rows if "train/atoms_per_s" in r]
    return sum(rates) / len(rates)


def main(argv=None) -> int:
    p = parser(__doc__, repeats=15, work=WORK / "uncertainty", out=RESULTS / "uncertainty.json")
    a = p.parse_args(argv)
    from launch.demo import build_splits

    work = Path(a.work).resolve()
    splits = build_splits(work, workers=2)
    result = header(("torch",)) | {"methods": {}}
    for method in RUNS:
        release = _release(work, method, splits)
        log(f"timing force calls of {release.name}")
        result["methods"][method] = {"scores": _scores(release), "cost": _cost(release, a.repeats),
                                     "train_atoms_per_s": _throughput(work / f"run-{method}")}
    print(f"\n{'method':<9} {'fidelity':<14} {'rho F/s':>7} {'rho F/a':>7} {'rho E':>6} {'w68':>5} {'cov68':>6} {'g68':>5} {'cov95':>6} "
          f"{'E cov95':>7} {'area':>6} {'NLL':>6} {'xcomp':>6} {'xunseen':>7} {'E xcomp':>7} {'E xunseen':>9} {'F MAE':>6}")
    fmt = lambda v, w=6, d=2: f"{v:>{w}.{d}f}" if isinstance(v, float) else f"{'-':>{w}}"  # noqa: E731
    for method, m in result["methods"].items():
        for fid, r in m["scores"].items():
            print(f"{method:<9} {fid:<14} {fmt(r['spearman_forces_structure'], 7)} {fmt(r['spearman_forces_atom'], 7)} "
                  f"{fmt(r['spearman_energy'])} {fmt(r['width_68'], 5)} {fmt(r['coverage_68'])} "
                  f"{fmt(r['gaussian_coverage_68'], 5)} {fmt(r['coverage_95'])} "
                  f"{fmt(r['energy_coverage_95'], 7)} {fmt(r['miscalibration_area'], 6, 3)} {fmt(r['nll'])} "
                  f"{fmt(r['compressed_ratio'], 6, 1)} {fmt(r['unseen_ratio'], 7, 1)} "
                  f"{fmt(r['energy_compressed_ratio'], 7, 1)} {fmt(r['energy_unseen_ratio'], 9, 1)} {fmt(r['forces_mae'], 6, 3)}")
    print(f"\n{'method':<9} {'structures':<22} {'plain ms':>9} {'with ms':>9} {'ratio':>6}   training atoms/s")
    for method, m in result["methods"].items():
        for what, c in m["cost"].items():
            print(f"{method:<9} {what:<22} {c['plain_ms']:>9.2f} {c['with_uncertainty_ms']:>9.2f} "
                  f"{c['ratio']:>6.3f}   {m['train_atoms_per_s']:.0f}")
    write_result(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
