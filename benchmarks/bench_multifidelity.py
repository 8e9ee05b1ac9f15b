"""Does multi-fidelity training help the expensive fidelity? (BENCHMARKS.md, "Multi-fidelity").

On the shipped QM dataset (data/qm), DFT-fidelity held-out energy and force MAE of:

(a) ``dft-only``: training on the DFT subset alone, S steps at an atom budget B;
(b) ``joint``: training on all four fidelities at once (one head each), S steps at a
    budget 2B with the DFT fidelity drawn for about half the structures, so the DFT
    atoms seen are about those of (a), in the same number of optimizer steps;
(c) ``pretrain+finetune``: P steps on the cheap fidelities (GFN1-xTB, GFN2-xTB, EMT),
    then ``init_from`` that run and S steps on the DFT subset alone at budget B (the DFT
    head is new; the backbone and the other heads move by name).

Equal DFT data (the same train split), equal optimizer steps on the DFT data, the same
model and optimizer; every figure is on the held-out DFT test molecules, with the EMA
weights; ``--seeds`` repeats everything (weights and data order), mean and spread.

    .venv/bin/python benchmarks/bench_multifidelity.py [--seeds 0 1 2] [--steps 300] [--out out/bench-mf]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DFT = "PBE/def2-SVP"


def recipe_subset(split: str, keep, out: Path) -> Path:
    """``configs/data/qm-<split>.yaml`` with only the sources whose fidelity ``keep`` accepts."""
    recipe = yaml.safe_load((REPO / "configs" / "data" / f"qm-{split}.yaml").read_text())
    recipe["root"] = str(REPO)
    recipe["sources"] = [s for s in recipe["sources"] if keep(s["fidelity"])]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def build_all(out: Path) -> dict[str, Path]:
    from data_pipeline.build import build
    from data_pipeline.build.recipe import load_recipe

    subsets = {"all": ("train", lambda f: True), "dft": ("train", lambda f: f == DFT),
               "cheap": ("train", lambda f: f != DFT), "test-dft": ("test", lambda f: f == DFT)}
    folders = {}
    for name, (split, keep) in subsets.items():
        recipe = recipe_subset(split, keep, out / "recipes" / f"{name}.yaml")
        folders[name] = out / "shards" / name
        if not (folders[name] / "manifest.json").is_file():  # a rerun reuses its shards
            build(load_recipe(recipe), folders[name], workers=2, progress=False)
    return folders


def train(run: Path, data: Path, steps: int, seed: int, budget: int, extra: list[str]) -> float:
    """One training run of configs/train/demo.yaml (no evaluation, no tracking); seconds."""
    if (run / "checkpoints" / "latest").is_file():
        return 0.0  # finished in an earlier invocation
    args = [sys.executable, "-m", "launch.cli", "train", str(REPO / "configs" / "train" / "demo.yaml"),
            f"data.folder={data}", f"out={run}", f"steps={steps}", f"seed={seed}",
            f"data.sampler.seed={seed}", f"data.sampler.max_atoms={budget}", "eval.folder=null",
            "tracking.enabled=false", f"checkpoint.every={steps}", "log_every=50", *extra]
    t0 = time.perf_counter()
    subprocess.run(args, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def dft_metrics(run: Path, test: Path) -> dict:
    from pretrain.evaluate import evaluate
    from pretrain.release.loader import load_model

    m = evaluate(load_model(run).potential, test, progress=False)["fidelities"][DFT]
    seen = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]).get(f"data/atoms_seen/{DFT}")
    return {"energy_mae_per_atom": m["energy_mae_per_atom"], "forces_mae": m["forces_mae"],
            "dft_atoms_seen": seen}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="S: optimizer steps on the DFT data")
    p.add_argument("--pretrain-steps", type=int, default=300, help="P: steps on the cheap fidelities")
    p.add_argument("--budget", type=int, default=128, help="B: atoms per batch of the DFT-only runs")
    p.add_argument("--out", default="out/bench-mf")
    args = p.parse_args()
    out = Path(args.out).resolve()
    folders = build_all(out)
    # half of the joint run's structures from the DFT fidelity, the rest shared by the others
    joint_weights = [f"data.sampler.weights.{DFT}=3", "data.sampler.weights.GFN1-xTB=1",
                     "data.sampler.weights.GFN2-xTB=1", "data.sampler.weights.EMT=1"]
    results: dict[str, list[dict]] = {"dft-only": [], "joint": [], "pretrain+finetune": []}
    seconds = {}
    for seed in args.seeds:
        s = out / f"seed{seed}"
        seconds[f"dft-only/{seed}"] = train(s / "dft-only", folders["dft"], args.steps, seed, args.budget, [])
        results["dft-only"].append(dft_metrics(s / "dft-only", folders["test-dft"]))
        seconds[f"joint/{seed}"] = train(s / "joint", folders["all"], args.steps, seed, 2 * args.budget,
                                         joint_weights)
        results["joint"].append(dft_metrics(s / "joint", folders["test-dft"]))
        seconds[f"pretrain/{seed}"] = train(s / "pretrain", folders["cheap"], args.pretrain_steps, seed,
                                            args.budget, [])
        seconds[f"finetune/{seed}"] = train(s / "finetune", folders["dft"], args.steps, seed, args.budget,
                                            [f"init_from={s / 'pretrain'}"])
        results["pretrain+finetune"].append(dft_metrics(s / "finetune", folders["test-dft"]))
        print(f"seed {seed}: " + ", ".join(f"{k} F MAE {1000 * v[-1]['forces_mae']:.1f} meV/A"
                                            for k, v in results.items()), flush=True)
    report = summarise(results, args, seconds)
    (out / "bench_multifidelity.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))


def summarise(results: dict, args, seconds: dict) -> dict:
    summary = {}
    base = statistics.mean(r["forces_mae"] for r in results["dft-only"])
    for name, rows in results.items():
        f = [1000 * r["forces_mae"] for r in rows]
        e = [1000 * r["energy_mae_per_atom"] for r in rows]
        summary[name] = {"forces_mae_meV_A": [statistics.mean(f), statistics.pstdev(f)],
                         "energy_mae_meV_atom": [statistics.mean(e), statistics.pstdev(e)],
                         "forces_vs_dft_only": statistics.mean(r["forces_mae"] for r in rows) / base,
                         "dft_atoms_seen": [r["dft_atoms_seen"] for r in rows]}
    return {"summary": summary, "runs": results, "settings": vars(args), "train_seconds": seconds}


if __name__ == "__main__":
    main()
