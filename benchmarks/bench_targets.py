"""Extra targets on the demo data: held-out errors next to the labels' spread, what they
cost per training step and per MD step, whether atomic dipoles help, and the IR spectrum
(BENCHMARKS.md, "Extra targets").

Runs of the demo's training config on the shipped QM splits (same seed, data and steps):
energy and forces only; with the demo's charge and dipole targets; and with the dipole
from the latent charges alone (``atomic_dipoles: false``); plus the targets run trained
4x longer (1,600 steps), whose release the IR spectra use. Each is evaluated on
the held-out split (``pretrain.evaluate``: per target and fidelity MAE, RMSE, label RMS
and std; force and energy MAE, to see whether the targets cost accuracy). Cost: a force
call with and without the property heads (the same model, ``properties=False``) on one
CO2 molecule (an IR MD step), 16 molecules and a 64-atom Cu cell, alternating, median
over ``--repeats``; and the training throughput of each run (atoms/s, mean over its log
lines). Then ``release ir`` of the longer run on the references of ``data/qm/test/ir``
of :data:`IR_MOLECULES` at the fidelities it trained dipoles at.

    .venv/bin/python -m benchmarks.bench_targets [--work benchmarks/_work/targets] [--repeats 15]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import REPO, RESULTS, WORK, header, log, parser, write_result

TARGETS = "[{name: charges, kind: charges, weight: 5.0}, {name: dipole, kind: dipole, weight: 5.0%s}]"
LONG_STEPS = 1600
#: held-out molecules whose IR spectra are computed (every level they have a reference at)
IR_MOLECULES = ("g2-CO2", "g2-C2H4", "g2-H3CNH2")
RUNS = {"energy-forces": ["model.targets=[]"], "targets": [],
        "targets-no-atomic-dipoles": [f"model.targets={TARGETS % ', atomic_dipoles: false'}"],
        f"targets-{LONG_STEPS}-steps": [f"steps={LONG_STEPS}"]}


def _train(work: Path, name: str, splits: dict) -> Path:
    run = work / f"run-{name}"
    if not (run / "checkpoints").is_dir():
        log(f"training the demo config ({name})")
        subprocess.run([sys.executable, "-m", "launch.cli", "train", "configs/train/demo.yaml",
                        f"data.folder={splits['train']}", f"eval.folder={splits['test']}", f"out={run}",
                        "tracking.enabled=false", *RUNS[name]], check=True, cwd=REPO)
    return run


def _held_out(run: Path, test: Path) -> dict:
    from pretrain.evaluate import evaluate
    from pretrain.release.loader import load_model

    trained = load_model(run)
    metrics = evaluate(trained.potential, test, progress=False, direct=trained.direct)
    return {"targets": metrics["targets"],
            "fidelities": {f: {k: m.get(k) for k in ("energy_mae_per_atom", "forces_mae")}
                           for f, m in metrics["fidelities"].items()}}


def _cost(run: Path, repeats: int) -> dict:
    """Median force-call ms with and without the property heads, per structure set."""
    import numpy as np
    import torch
    from ase.build import bulk, molecule

    from pretrain.release import Predictor
    from pretrain.release.loader import load_model

    torch.set_num_threads(2)
    trained = load_model(run)
    cell = bulk("Cu", cubic=True) * (2, 2, 4)
    cell.rattle(0.05, seed=0)
    mols = [molecule(name) for name in ("CH3CH2OH", "C6H6", "CH3COOH", "H2O")] * 4
    for m in [*mols]:
        m.info.update(charge=0, spin=1)
    co2 = molecule("CO2")
    co2.info.update(charge=0, spin=1)
    sets = {"CO2 (an IR MD step, GFN2-xTB)": ("GFN2-xTB", [co2]), "16 molecules (GFN2-xTB)": ("GFN2-xTB", mols),
            "Cu 64 atoms (EMT)": ("EMT", [cell])}
    out = {}
    for what, (fid, structures) in sets.items():
        p = Predictor(trained, fid)
        batch = p.batch(structures)

        def call(properties: bool) -> float:
            t0 = time.perf_counter()
            with torch.enable_grad():
                p.model(batch, forces=True, create_graph=False, properties=properties)
            return time.perf_counter() - t0

        call(True), call(False)
        times = {"on": [], "off": []}
        for _ in range(repeats):
            times["off"].append(call(False))
            times["on"].append(call(True))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[what] = {"atoms": int(sum(len(a) for a in structures)), "plain_ms": 1e3 * med["off"],
                     "with_targets_ms": 1e3 * med["on"], "ratio": med["on"] / med["off"],
                     "ratio_spread": [float(np.min(times["on"]) / np.max(times["off"])),
                                      float(np.max(times["on"]) / np.min(times["off"]))]}
    return out


def _throughput(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/atoms_per_s"] for r in rows if "train/atoms_per_s" in r]
    return sum(rates) / len(rates)


def _ir(run: Path, work: Path, steps: int, runs: int) -> dict:
    from pretrain.release.create import create
    from pretrain.release.spectra import ir_spectrum

    release = work / f"release-{run.name}"
    if not (release / "config.json").is_file():
        create(run, release, progress=False, register=False, uncertainty="none")
    trained_at = set(next(t for t in json.loads((release / "config.json").read_text())["targets"]
                          if t["kind"] == "dipole")["fidelities"])
    out = {}
    for ref in sorted((REPO / "data" / "qm" / "test" / "ir").glob("*.json")):
        if ref.name.split(".")[0] in IR_MOLECULES and json.loads(ref.read_text())["fidelity"] in trained_at:
            log(f"IR spectrum of {ref.name}")
            r = ir_spectrum(release, ref, work / "ir", steps=steps, runs=runs, progress=False)
            out[ref.name] = {k: r[k] for k in ("mol_id", "fidelity", "md_vs_reference", "harmonic_vs_reference",
                                               "md_peak_mae_cm1", "harmonic_mae_cm1", "md_peak_missed",
                                               "harmonic_missed")}
            out[ref.name]["resolution_cm1"] = r["md"]["resolution_cm1"]
    return out


def main(argv=None) -> int:
    p = parser(__doc__, repeats=15, work=WORK / "targets", out=RESULTS / "targets.json")
    p.add_argument("--ir-steps", type=int, default=4000)
    p.add_argument("--ir-runs", type=int, default=2)
    a = p.parse_args(argv)
    from launch.demo import build_splits

    work = Path(a.work).resolve()
    splits = build_splits(work, workers=2)
    result = header(("torch",)) | {"runs": {}}
    for name in RUNS:
        run = _train(work, name, splits)
        result["runs"][name] = {"held_out": _held_out(run, splits["test"]),
                                "train_atoms_per_s": _throughput(run)}
    log("timing force calls with and without the property heads")
    result["cost"] = _cost(work / "run-targets", a.repeats)
    result["ir"] = _ir(work / f"run-targets-{LONG_STEPS}-steps", work, a.ir_steps, a.ir_runs)
    _print(result)
    write_result(a.out, result)
    return 0


def _print(result: dict) -> None:
    print(f"\n{'run':<26} {'target':<8} {'fidelity':<14} {'MAE':>8} {'RMSE':>8} {'label RMS':>9} {'label std':>9}")
    for name, r in result["runs"].items():
        for target, t in r["held_out"]["targets"].items():
            for fid, m in t["fidelities"].items():
                print(f"{name:<26} {target:<8} {fid:<14} {m['mae']:>8.4f} {m['rmse']:>8.4f} {m['ref_rms']:>9.4f} "
                      f"{m['ref_std']:>9.4f}")
    print(f"\n{'run':<26} {'fidelity':<14} {'E MAE meV/at':>12} {'F MAE meV/A':>11}   training atoms/s")
    for name, r in result["runs"].items():
        for fid, m in r["held_out"]["fidelities"].items():
            print(f"{name:<26} {fid:<14} {1e3 * m['energy_mae_per_atom']:>12.2f} {1e3 * m['forces_mae']:>11.1f}   "
                  f"{r['train_atoms_per_s']:.0f}")
    print(f"\n{'structures':<32} {'plain ms':>9} {'with ms':>9} {'ratio':>6}")
    for what, c in result["cost"].items():
        print(f"{what:<32} {c['plain_ms']:>9.2f} {c['with_targets_ms']:>9.2f} {c['ratio']:>6.3f}")
    for name, r in result["ir"].items():
        print(f"\nIR {name} ({r['fidelity']}, resolution {r['resolution_cm1']:.0f} cm^-1): reference -> MD peak / "
              f"release harmonic, cm^-1 (missed: {r['md_peak_missed']} / {r['harmonic_missed']})")
        for md, h in zip(r["md_vs_reference"], r["harmonic_vs_reference"]):
            print(f"  {md['reference_cm1']:7.0f} -> {md['model_cm1'] or float('nan'):7.0f} / "
                  f"{h['model_cm1'] or float('nan'):7.0f}")


if __name__ == "__main__":
    raise SystemExit(main())
