"""``mlip-pretrain demo``: the whole life cycle on the shipped multi-fidelity QM dataset.

Ray build of the train and test shards -> DeepSpeed training on all four fidelities in
two jobs (paused with a checkpoint, then resumed exactly, as a scheduler would run them)
-> ``eval`` per fidelity on the held-out test split -> a control run of the same model on
the DFT records alone (same steps, same DFT atoms: what the cheap fidelities bought) -> release (with calibrated LLPR
uncertainty) -> release verify -> NVE molecular dynamics with the release's ASE calculator
on a held-out molecule at the DFT fidelity, its force uncertainty watched -> a summary. ``--quick`` runs the same stages with 60 training steps (a smoke
run: every stage works, the model has not learned yet).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DFT = "PBE/def2-SVP"
QUICK_STEPS = 60  # --quick: a smoke run of every stage; its model has not learned yet
IR_REFERENCE = "g2-C2H4.gfn2.json"  # data/qm/test/ir: a held-out molecule, GFN2-xTB harmonic modes
IR_STEPS = 2000  # NVE steps per run (0.5 fs): 33 cm^-1 resolution


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def build_splits(out: Path, workers: int) -> dict[str, Path]:
    """Ray builds of the train and test recipes (a rerun skips finished shards)."""
    from data_pipeline.build import build, report
    from data_pipeline.build.recipe import load_recipe

    folders = {}
    for split in ("train", "test"):
        recipe = load_recipe(REPO / "configs" / "data" / f"qm-{split}.yaml")
        folders[split] = out / f"shards-{split}"
        _say(f"building the {split} split into {folders[split]}")
        report(build(recipe, folders[split], workers=workers))
    return folders


def train(out: Path, shards: dict[str, Path], quick: bool) -> Path:
    """Two training jobs: one pauses at 3/4 of the steps with a checkpoint, one resumes."""
    config = REPO / "configs" / "train" / "demo.yaml"
    run = out / "train"
    steps = QUICK_STEPS if quick else int(_yaml(config)["steps"])
    pause = (3 * steps) // 4
    args = [sys.executable, "-m", "launch.cli", "train", str(config), f"data.folder={shards['train']}",
            f"eval.folder={shards['test']}", f"out={run}", f"steps={steps}",
            f"checkpoint.every={pause}"]
    _say(f"training {config.name} for {steps} steps: a job that stops at step {pause}, then a job "
         f"that resumes from its checkpoint (outputs in {run})")
    for extra in (["--stop-at", str(pause)], ["--resume"]):
        subprocess.run(args + extra, check=True, cwd=REPO)
    return run


def dft_only_control(out: Path, shards: dict[str, Path], run: Path) -> Path:
    """The demo's model trained on the DFT records alone, for as many steps and as many DFT
    atoms as the demo run (sampler weight 0 for the other fidelities, the atom budget whose
    packed batches hold the DFT atoms the demo run drew per step): what the cheap fidelities
    bought the DFT one."""
    from data_pipeline.manifest import read_manifest

    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    seen = next(r[f"data/atoms_seen/{DFT}"] for r in reversed(rows) if f"data/atoms_seen/{DFT}" in r)
    steps = rows[-1]["step"]
    budget = _budget_for(shards["train"], seen / steps)
    fids = read_manifest(shards["train"])["fidelities"]
    control = out / "train-dft-only"
    _say(f"control: the same model on the {DFT} records alone, {steps} steps of <= {budget} atoms "
         f"({seen:.0f} {DFT} atoms, as the demo run saw), to measure what the other fidelities added")
    args = [sys.executable, "-m", "launch.cli", "train", str(REPO / "configs" / "train" / "demo.yaml"),
            f"data.folder={shards['train']}", f"out={control}", f"steps={steps}", f"data.sampler.max_atoms={budget}",
            "eval.folder=null", "tracking.enabled=false", f"checkpoint.every={steps}",
            *(f"data.sampler.weights.{f}={1 if f == DFT else 0}" for f in fids)]
    subprocess.run(args, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return control


def _budget_for(folder: Path, per_step: float) -> int:
    """The smallest atom budget whose packed batches of the DFT records (shuffled, as the
    sampler packs them) hold at least ``per_step`` atoms on average."""
    import numpy as np

    from data_pipeline.stream.dataset import ShardedDataset
    from data_pipeline.stream.packing import pack

    ds = ShardedDataset(folder)
    sizes = ds.n_atoms[ds.fidelity_ids == ds.manifest["fidelities"].index(DFT)]
    order = np.random.default_rng(0).permutation(np.tile(sizes, 4))
    budget = int(sizes.max())
    while sizes.size and order.sum() / (len(pack(order, budget)) - 1) < per_step:
        budget += 1
    return budget


def multifidelity_line(metrics: dict, control: dict) -> str:
    """The DFT fidelity's held-out errors of the demo run against its DFT-only control."""
    a, b = metrics["fidelities"][DFT], control["fidelities"][DFT]
    return (f"multi-fidelity: {DFT} held-out force MAE {1000 * a['forces_mae']:.0f} meV/A with the cheap "
            f"fidelities vs {1000 * b['forces_mae']:.0f} on its own data alone ({100 * (a['forces_mae'] / b['forces_mae'] - 1):+.0f}%), "
            f"energy MAE {1000 * a['energy_mae_per_atom']:.0f} vs {1000 * b['energy_mae_per_atom']:.0f} meV/atom "
            f"({100 * (a['energy_mae_per_atom'] / b['energy_mae_per_atom'] - 1):+.0f}%); same steps, same {DFT} atoms seen")


def _yaml(path: Path) -> dict:
    from common.config import load_yaml

    return load_yaml(path)


def md_drift(release: Path, test_shards: Path, steps: int) -> dict:
    """NVE (velocity Verlet, 0.5 fs, 300 K start) on the first held-out DFT molecule, its
    force uncertainty watched by the guard (flagging at 3x the held-out median)."""
    import numpy as np
    from ase import Atoms, units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    from data_pipeline.stream.dataset import ShardedDataset
    from pretrain.release import MLIPCalculator, UncertaintyGuard

    ds = ShardedDataset(test_shards)
    fid = ds.manifest["fidelities"].index(DFT)
    first = int(np.flatnonzero(ds.fidelity_ids == fid)[0])
    rec = ds[first]
    atoms = Atoms(numbers=rec["numbers"], positions=rec["positions"])
    atoms.info.update(charge=rec["charge"] or 0, spin=rec["spin"] or 0)
    atoms.calc = MLIPCalculator.from_release(release, fidelity=DFT, dtype="float64")
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    energies = [atoms.get_total_energy()]
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    dyn.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    guard = None
    if atoms.calc.has_uncertainty:
        ood = json.loads((release / "metrics.json").read_text())["uncertainty"].get("out_of_distribution", {})
        threshold = 3 * ood.get(DFT, {}).get("in_distribution", float("inf"))
        guard = UncertaintyGuard(atoms, threshold=threshold, action="flag", dyn=dyn)
        dyn.attach(guard, interval=1)
    t0 = time.perf_counter()
    dyn.run(steps)
    seconds = time.perf_counter() - t0
    drift = max(abs(e - energies[0]) for e in energies) / len(atoms)
    return {"molecule": rec["source_id"], "formula": atoms.get_chemical_formula(), "atoms": len(atoms),
            "steps": steps, "max_drift_ev_per_atom": drift, "steps_per_s": steps / seconds,
            "max_force_uncertainty": guard.max_seen if guard else None,
            "guard_threshold": guard.threshold if guard else None, "guard_flags": len(guard.events) if guard else None}


def summary(out: Path, run: Path, release: Path, eval_dir: Path, metrics: dict, md: dict,
            test_manifest: dict, robust: dict, train_manifest: dict | None = None, ir: dict | None = None,
            control: dict | None = None) -> str:
    """The closing report: test errors vs the data's force RMS, throughput, MD, robustness,
    where things are."""
    from pretrain.release.robustness import robustness_failures, summary_line

    rms = {}
    for g in test_manifest["groups"]:
        rms.setdefault(g["fidelity"], []).append((g["force_rms"], g["atoms"]))
    lines = ["", "held-out test split, per fidelity (errors in meV):",
             f"  {'fidelity':<14} {'structs':>7} {'E MAE/atom':>11} {'F MAE':>8} {'F RMS (data)':>13} "
             f"{'F MAE/RMS':>9} {'S MAE':>8}"]
    for fid, m in metrics["fidelities"].items():
        f_rms = _weighted_rms(rms.get(fid, []))
        ratio = m["forces_mae"] / f_rms if "forces_mae" in m and f_rms else float("nan")
        lines.append(f"  {fid:<14} {m['structures']:>7} {1000 * m.get('energy_mae_per_atom', float('nan')):>11.2f} "
                     f"{1000 * m.get('forces_mae', float('nan')):>8.1f} {1000 * f_rms:>13.1f} {ratio:>9.2f} "
                     + (f"{1000 * m['stress_mae']:>8.3f}" if "stress_mae" in m else f"{'-':>8}"))
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/atoms_per_s" in r]
    rate = sum(r["train/atoms_per_s"] for r in train_rows) / max(len(train_rows), 1)
    wait = sum(r["train/data_wait_fraction"] for r in train_rows) / max(len(train_rows), 1)
    db = run / "mlflow.db"
    lines += [f"training: {rows[-1]['step']} steps, {rate:.0f} atoms/s, data wait {100 * wait:.1f}% "
              "(mean over log lines)",
              *([multifidelity_line(metrics, control)] if control else []),
              f"MD: {md['steps']} NVE steps of held-out {md['formula']} ({md['molecule']}) at {DFT}: "
              f"max energy drift {1000 * md['max_drift_ev_per_atom']:.3f} meV/atom, {md['steps_per_s']:.0f} steps/s",
              *_md_guard_line(md),
              *uncertainty_lines(release),
              *data_lines(train_manifest, release),
              *strata_lines(metrics),
              *target_lines(metrics),
              *ir_lines(ir),
              "robustness of the release (dimers, compression, hot MD): " + summary_line(robust),
              *(f"  failed: {w}" for w in robustness_failures(robust)),
              f"release: {release} (verified{'' if robust['passed'] else ', fragile'})",
              f"metrics and parity plots: {eval_dir}",
              f"checkpoints: {run / 'checkpoints'}", f"MLflow store: sqlite:///{db}",
              f"open the MLflow UI: {Path(sys.executable).parent / 'mlflow'} ui --backend-store-uri "
              f"sqlite:///{db} --port 5000"]
    return "\n".join(lines)


def _md_guard_line(md: dict) -> list[str]:
    if md.get("max_force_uncertainty") is None:
        return []
    return [f"  force uncertainty during the MD: max {1000 * md['max_force_uncertainty']:.0f} meV/A; guard at "
            f"{1000 * md['guard_threshold']:.0f} meV/A (3x the held-out median) flagged {md['guard_flags']} step(s)"]


def uncertainty_lines(release: Path) -> list[str]:
    """The release's calibrated uncertainty on held-out data: ranking, coverage, and out of
    distribution (from its metrics.json)."""
    scores = json.loads((release / "metrics.json").read_text()).get("uncertainty")
    if not scores:
        return ["uncertainty: none in this release"]
    method = json.loads((release / "config.json").read_text())["uncertainty"]["method"]
    lines = [f"uncertainty ({method}, calibrated on half of the held-out split, scored on the other half):",
             f"  {'fidelity':<14} {'Spearman F':>10} {'F cov. 95%':>10} {'E cov. 95%':>10} "
             f"{'x compressed F/E':>16} {'x unseen elements F/E':>21}"]
    ood = scores.get("out_of_distribution", {})
    for fid, m in scores["fidelities"].items():
        o = ood.get(fid, {})
        ratio = lambda key: f"{o[key]:.1f}/{o['energy_' + key]:.1f}" if key in o else "-"  # noqa: E731
        lines.append(f"  {fid:<14} {m['forces'].get('spearman_structure', float('nan')):>10.2f} "
                     f"{100 * m['forces'].get('coverage_95', float('nan')):>9.1f}% "
                     f"{100 * m['energy'].get('coverage_95', float('nan')):>9.1f}% "
                     f"{ratio('compressed_ratio'):>16} {ratio('unseen_ratio'):>21}")
    lines.append("  (Spearman: predicted vs actual per-structure force error; x: median force (F) and energy-per-atom "
                 "(E) uncertainty of held-out structures compressed to 0.7, or with elements the fidelity never saw, "
                 "over the held-out median)")
    return lines


def data_lines(train_manifest: dict | None, release: Path) -> list[str]:
    """What the training data holds (copies, conflicts, pairing across fidelities) and how
    much of the held-out split it already holds (from the release's metrics.json)."""
    lines = []
    d = (train_manifest or {}).get("duplicates")
    if d:
        copies = ", ".join(f"{f} {c['exact_duplicates_within_dataset'] + c['exact_duplicates_across_datasets']}"
                           f"/{c['near_duplicates']}" for f, c in d["fidelities"].items())
        pairs = ", ".join(f"{k} {v}" for k, v in d["across_fidelities"]["pairs"].items()) or "none"
        lines += [f"training data: exact/near copies per fidelity {copies}; label conflicts "
                  f"{d['conflicts']['structures']}; structures labelled at several fidelities "
                  f"{d['across_fidelities']['structures_at_several']} ({pairs})"]
    if train_manifest and train_manifest.get("coverage"):
        from data_pipeline.coverage_report import counts_text, known_limits

        lines.append("training data coverage per fidelity (rare: in fewer than 10 structures):")
        for fid, lim in known_limits(train_manifest["coverage"]).items():
            near = lim["nearest_distance"]
            span = f"{near[0]:.2f}-{near[1]:.2f} A" if near else "-"
            lines.append(f"  {fid:<14} nearest distance {span}; rare elements "
                         f"{counts_text(lim['rare_elements'], 3)}; rare pairs {counts_text(lim['rare_pairs'], 3)}")
    leak = json.loads((release / "metrics.json").read_text()).get("leakage")
    if leak:
        per = ", ".join(f"{f} {c['exact_same_fidelity']}+{c['near_same_fidelity']}/{c['records']}"
                        + (f" (formula {c['molecules_formula_in_training']}/{c['molecules']})" if c["molecules"] else "")
                        for f, c in leak["fidelities"].items())
        lines += [f"held-out structures also in training at their fidelity (exact+near/all): {per}; exact at "
                  f"another fidelity {leak['exact_other_fidelity']}"]
    return lines


def strata_lines(metrics: dict) -> list[str]:
    """Held-out force MAE per element and in the largest-force band, per fidelity."""
    strata = metrics.get("strata") or {}
    if not strata:
        return []
    lines = ["held-out force MAE by element, and on atoms with |F_ref| >= 3 eV/A (meV/A):"]
    for fid, s in strata.items():
        els = ", ".join(f"{el} {1000 * r['forces_mae']:.0f}" for el, r in s["elements"].items() if "forces_mae" in r)
        big = [r for r in s["force_bins"] if r["lo"] is not None and r["lo"] >= 3 and "forces_mae" in r]
        atoms = sum(r["atoms"] for r in big)
        mae = sum(r["forces_mae"] * r["atoms"] for r in big) / atoms if atoms else None
        lines.append(f"  {fid:<14} {els}; |F_ref| >= 3: " + (f"{1000 * mae:.0f} ({atoms} atoms)" if mae else "-"))
    return lines


def target_lines(metrics: dict) -> list[str]:
    """Held-out errors of the extra targets next to the labels' spread, per fidelity."""
    targets = metrics.get("targets") or {}
    if not targets:
        return []
    lines = ["held-out extra targets (MAE / RMSE, and the labels' std a mean predictor scores):"]
    for name, t in targets.items():
        unit = {"charges": "e", "dipole": "e*A"}.get(t["served_as"], "")
        rows = "; ".join(f"{fid} {r['mae']:.3f} / {r['rmse']:.3f} (std {r['ref_std']:.3f})"
                         for fid, r in t["fidelities"].items())
        lines.append(f"  {name} ({unit}): {rows}")
    return lines


def ir_spectrum_step(release: Path, out: Path) -> dict | None:
    """The IR spectrum of the held-out C2H4 at GFN2-xTB from the release's dipole (its
    harmonic modes and NVE MD) against the reference code's harmonic modes."""
    from pretrain.release.spectra import ir_spectrum

    reference = REPO / "data" / "qm" / "test" / "ir" / IR_REFERENCE
    if not reference.is_file():
        _say(f"no IR reference {reference}: skipping the spectrum")
        return None
    _say(f"IR spectrum of {IR_REFERENCE} from NVE dipoles of the release (into {out})")
    return ir_spectrum(release, reference, out, steps=IR_STEPS, runs=2, progress=False)


def ir_lines(ir: dict | None) -> list[str]:
    if ir is None:
        return []
    from pretrain.release.spectra import summary_line

    return [summary_line(ir)]


def _weighted_rms(parts: list[tuple[float | None, int]]) -> float:
    parts = [(r, n) for r, n in parts if r is not None]
    total = sum(n for _, n in parts)
    return (sum(r * r * n for r, n in parts) / total) ** 0.5 if total else 0.0


def run_demo(out: str | Path, workers: int = 2, quick: bool = False) -> dict:
    """Every step of the demo; returns the test metrics and MD figures (for tests)."""
    from data_pipeline.manifest import read_manifest
    from pretrain.evaluate import evaluate, table, write_outputs
    from pretrain.release.create import create
    from pretrain.release.loader import load_model
    from pretrain.release.format import ROBUSTNESS
    from pretrain.release.robustness import robustness_failures
    from pretrain.release.verify import verify

    t0 = time.perf_counter()
    out = Path(out).resolve()
    shards = build_splits(out, workers)
    run = train(out, shards, quick)
    _say(f"evaluating the run's EMA weights on the held-out test split {shards['test']}")
    trained = load_model(run)
    metrics = evaluate(trained.potential, shards["test"], direct=trained.direct)
    eval_dir = out / "eval"
    write_outputs(metrics, {"path": str(trained.path), "kind": trained.kind, "ema": trained.ema}, eval_dir)
    print(table(metrics), flush=True)
    release = out / "release"
    if release.exists():
        import shutil

        shutil.rmtree(release)
    _say(f"releasing {trained.path} into {release}")
    create(run, release, name="mlip-pretrain-demo-qm", progress=False)
    # a tiny model trained for minutes may be fragile somewhere: the demo shows the verdict
    # (card, summary) and goes on; a release meant for users is verified without the allowance
    for line in verify(release, shards["test"], allow_fragile=True):
        _say(f"verify ok: {line}")
    robust = json.loads((release / ROBUSTNESS).read_text())
    if not robust["passed"]:
        _say(f"the release is fragile (its card says so; `release verify` without --allow-fragile fails): "
             f"{'; '.join(robustness_failures(robust))}")
    control = evaluate(load_model(dft_only_control(out, shards, run)).potential, shards["test"], progress=False)
    md = md_drift(release, shards["test"], steps=200)
    ir = ir_spectrum_step(release, out / "ir")
    print(summary(out, run, release, eval_dir, metrics, md, read_manifest(shards["test"]), robust,
                  read_manifest(shards["train"]), ir, control), flush=True)
    _say(f"done in {time.perf_counter() - t0:.0f} s")
    return {"metrics": metrics, "md": md, "release": release, "test_manifest": read_manifest(shards["test"]),
            "ir": ir, "control": control}
