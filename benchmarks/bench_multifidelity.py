"""Does training on cheap fidelities help the expensive one, and can a fidelity be added
without forgetting? (BENCHMARKS.md, "Multi-fidelity").

On the shipped QM dataset (data/qm), the DFT fidelity's (PBE/def2-SVP) held-out energy and
force MAE, EMA weights, learning curves every S/10 steps, of these settings (``--settings``):

- ``dft-only``: the DFT subset alone, S steps at an atom budget B.
- ``joint``: all four fidelities at once (one head each), S steps at a budget 2B, sampler
  weights that give the DFT fidelity half the atoms of a batch (equal DFT atoms seen).
- ``joint-natural``: the same with the old 3:1:1:1 structure weights (fewer DFT atoms).
- ``joint-film``: ``joint`` with ``model.fidelity_conditioning: layers``.
- ``joint-delta``: ``joint`` with the DFT head a correction to the GFN2-xTB head
  (``model.delta``).
- ``joint-learned-refs``: ``joint`` with trainable elemental references.
- ``finetune``: S steps on the cheap fidelities (GFN1-xTB, GFN2-xTB, EMT), then ``init_from``
  that run and S steps on the DFT subset at B with a lower learning rate.
- ``finetune-replay``: the same fine-tune at 2B with replay of the cheap shards (the share
  that gives half the atoms to DFT), the cheap heads' held-out errors measured before and
  after (forgetting), and ``finetune-delta`` with a delta head on GFN2-xTB as well.

Equal DFT data (the same train split) and equal DFT atoms seen (about S x B) in every
setting; the same model (``configs/train/demo.yaml`` without extra targets), optimizer and
schedule; ``--seeds`` vary weights and data order. Runs are kept in ``--work`` and reused;
the result JSON goes to ``--out`` (default ``<work>/bench_multifidelity.json``).

    .venv/bin/python -m benchmarks.bench_multifidelity [--seeds 0 1 2] [--steps 1000] [--settings ...]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.harness import REPO, header, markdown, parser, write_result

DFT, BASE = "PBE/def2-SVP", "GFN2-xTB"
CHEAP = ("GFN1-xTB", "GFN2-xTB", "EMT")
NO_TARGETS = ["model.targets=[]", "model.delta={}"]  # the demo model without extras; settings add theirs


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
               "cheap": ("train", lambda f: f != DFT), "test-dft": ("test", lambda f: f == DFT),
               "test-cheap": ("test", lambda f: f != DFT)}
    folders = {}
    for name, (split, keep) in subsets.items():
        recipe = recipe_subset(split, keep, out / "recipes" / f"{name}.yaml")
        folders[name] = out / "shards" / name
        if not (folders[name] / "manifest.json").is_file():  # a rerun reuses its shards
            build(load_recipe(recipe), folders[name], workers=2, progress=False)
    return folders


def mean_atoms(folder: Path) -> dict[str, float]:
    """Mean atoms per structure of each fidelity of a shard folder (from its manifest)."""
    groups = json.loads((folder / "manifest.json").read_text())["groups"]
    return {g["fidelity"]: g["atoms"] / g["structures"] for g in groups}


def joint_weights(folders: dict[str, Path], dft_share: float = 0.5) -> list[str]:
    """Structure weights that give DFT ``dft_share`` of a batch's atoms, the cheap
    fidelities one weight each."""
    atoms = mean_atoms(folders["all"])
    cheap = sum(atoms[f] for f in CHEAP)
    w = dft_share / (1 - dft_share) * cheap / atoms[DFT]
    return [f"data.sampler.weights.{DFT}={w:.4f}"] + [f"data.sampler.weights.{f}=1" for f in CHEAP]


def replay_fraction(folders: dict[str, Path], dft_share: float = 0.5) -> float:
    """The replay share of structures that leaves DFT ``dft_share`` of the atoms."""
    atoms, manifest = mean_atoms(folders["all"]), json.loads((folders["cheap"] / "manifest.json").read_text())
    cheap = sum(g["atoms"] for g in manifest["groups"]) / sum(g["structures"] for g in manifest["groups"])
    # DFT atoms / all atoms = (1 - f) a_dft / ((1 - f) a_dft + f a_cheap) = share, solved for f
    return round(atoms[DFT] * (1 - dft_share) / (atoms[DFT] * (1 - dft_share) + dft_share * cheap), 4)


def settings(folders: dict[str, Path], steps: int, budget: int, lr_finetune: float) -> dict[str, dict]:
    """Each setting: its training runs in order (a fine-tune's first run is its pretraining)."""
    w = joint_weights(folders)
    delta = [f'model.delta={{"{DFT}": "{BASE}"}}']
    frac = replay_fraction(folders)
    replay = [f"data.replay.folder={folders['cheap']}", f"data.replay.fraction={frac}",
              f"eval.replay_folder={folders['test-cheap']}"]
    pre = {"name": "pretrain", "data": "cheap", "budget": 2 * budget, "extra": [], "test": "test-cheap"}
    tune = ["init_from={pretrain}", f"optim.lr={lr_finetune}"]
    return {
        "dft-only": [{"name": "dft-only", "data": "dft", "budget": budget, "extra": []}],
        "joint": [{"name": "joint", "data": "all", "budget": 2 * budget, "extra": w}],
        "joint-natural": [{"name": "joint-natural", "data": "all", "budget": 2 * budget,
                           "extra": [f"data.sampler.weights.{DFT}=3"] + [f"data.sampler.weights.{f}=1" for f in CHEAP]}],
        "joint-film": [{"name": "joint-film", "data": "all", "budget": 2 * budget,
                        "extra": w + ["model.fidelity_conditioning=layers"]}],
        "joint-delta": [{"name": "joint-delta", "data": "all", "budget": 2 * budget, "extra": w + delta}],
        "joint-learned-refs": [{"name": "joint-learned-refs", "data": "all", "budget": 2 * budget,
                                "extra": w + ["model.learn_references=true"]}],
        "finetune": [pre, {"name": "finetune", "data": "dft", "budget": budget, "extra": tune}],
        "finetune-replay": [pre, {"name": "finetune-replay", "data": "dft", "budget": 2 * budget,
                                  "extra": tune + replay}],
        "finetune-delta": [pre, {"name": "finetune-delta", "data": "dft", "budget": 2 * budget,
                                 "extra": tune + replay + delta}],
    }


def train(run: Path, data: Path, steps: int, seed: int, budget: int, extra: list[str], test: Path) -> float:
    """One training run of configs/train/demo.yaml (no tracking, no extra targets), evaluated
    on ``test`` every steps/10; seconds (0 when an earlier invocation finished it)."""
    if (run / "checkpoints" / "latest").is_file():
        return 0.0
    args = [sys.executable, "-m", "launch.cli", "train", str(REPO / "configs" / "train" / "demo.yaml"),
            f"data.folder={data}", f"out={run}", f"steps={steps}", f"seed={seed}",
            f"data.sampler.seed={seed}", f"data.sampler.max_atoms={budget}", f"eval.folder={test}",
            f"eval.every={max(1, steps // 10)}", "tracking.enabled=false", f"checkpoint.every={steps}",
            "log_every=50", *NO_TARGETS, *extra]
    t0 = time.perf_counter()
    subprocess.run(args, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def read_run(run: Path) -> dict:
    """The DFT learning curve, DFT atoms seen and the forgetting record of a finished run."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "forces_mae": r[f"val/{DFT}/forces_mae"],
              "energy_mae_per_atom": r[f"val/{DFT}/energy_mae_per_atom"]} for r in rows if f"val/{DFT}/forces_mae" in r]
    seen = [r[f"data/atoms_seen/{DFT}"] for r in rows if f"data/atoms_seen/{DFT}" in r]
    out = {**curve[-1], "curve": curve, "dft_atoms_seen": seen[-1] if seen else None}
    before = next((r for r in rows if any(k.startswith("replay_before/") for k in r)), None)
    after = next((r for r in rows[::-1] if any(k.startswith("replay_after/") for k in r)), None)
    if before and after:
        out["forgetting"] = {fid: {label: [before.get(f"replay_before/{fid}/{label}"),
                                           after.get(f"replay_after/{fid}/{label}")]
                                   for label in ("forces_mae", "energy_mae_per_atom")} for fid in CHEAP}
    return out


def main(argv=None) -> int:
    p = parser(__doc__, work="out/bench-mf", out_help="default <work>/bench_multifidelity.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1000, help="S: optimizer steps of every run")
    p.add_argument("--budget", type=int, default=128, help="B: atoms per batch of the DFT-only runs")
    p.add_argument("--lr-finetune", type=float, default=0.002, help="learning rate of the fine-tunes")
    p.add_argument("--settings", nargs="+", default=["dft-only", "joint", "joint-delta", "finetune-delta"])
    args = p.parse_args(argv)
    out = Path(args.work).resolve()
    head = header(("torch",))
    folders = build_all(out)
    plans = settings(folders, args.steps, args.budget, args.lr_finetune)
    unknown = [s for s in args.settings if s not in plans]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {sorted(plans)}")
    results: dict[str, list[dict]] = {s: [] for s in args.settings}
    seconds = {}
    for seed in args.seeds:
        for name in args.settings:
            run = None
            for step in plans[name]:
                run = out / f"seed{seed}" / step["name"]
                extra = [e.replace("{pretrain}", str(out / f"seed{seed}" / "pretrain")) for e in step["extra"]]
                seconds[f"{step['name']}/{seed}"] = train(run, folders[step["data"]], args.steps, seed, step["budget"],
                                                          extra, folders[step.get("test", "test-dft")])
            results[name].append(read_run(run))
            print(f"seed {seed} {name}: DFT F MAE {1000 * results[name][-1]['forces_mae']:.0f} meV/A, "
                  f"E MAE {1000 * results[name][-1]['energy_mae_per_atom']:.0f} meV/atom", flush=True)
    report = summarise(results, args, seconds)
    plot_curves(results, out / "learning_curves.png")
    print(json.dumps(report["summary"], indent=1))
    write_result(args.out or out / "bench_multifidelity.json", head | report, table(report["summary"]))
    return 0


def table(summary: dict) -> str:
    """DFT held-out MAE per setting: mean +- spread over the seeds, and vs dft-only."""
    x = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    return markdown(["setting", "DFT force MAE meV/A", "vs dft-only", "DFT energy MAE meV/atom",
                     "vs dft-only"],
                    [[name, f"{s['forces_mae_meV_A'][0]:.0f} +- {s['forces_mae_meV_A'][1]:.0f}",
                      x(s["forces_vs_dft_only"]),
                      f"{s['energy_mae_meV_atom'][0]:.1f} +- {s['energy_mae_meV_atom'][1]:.1f}",
                      x(s["energy_vs_dft_only"])] for name, s in summary.items()])


def summarise(results: dict, args, seconds: dict) -> dict:
    base_f = statistics.mean(r["forces_mae"] for r in results.get("dft-only", [])) if results.get("dft-only") else None
    base_e = (statistics.mean(r["energy_mae_per_atom"] for r in results["dft-only"])
              if results.get("dft-only") else None)
    summary = {}
    for name, rows in results.items():
        f = [1000 * r["forces_mae"] for r in rows]
        e = [1000 * r["energy_mae_per_atom"] for r in rows]
        summary[name] = {"forces_mae_meV_A": [statistics.mean(f), statistics.pstdev(f)],
                         "energy_mae_meV_atom": [statistics.mean(e), statistics.pstdev(e)],
                         "forces_vs_dft_only": statistics.mean(f) / 1000 / base_f if base_f else None,
                         "energy_vs_dft_only": statistics.mean(e) / 1000 / base_e if base_e else None,
                         "dft_atoms_seen": [r["dft_atoms_seen"] for r in rows]}
        forgetting = [r["forgetting"] for r in rows if "forgetting" in r]
        if forgetting:
            summary[name]["forgetting_forces_after_over_before"] = {
                fid: statistics.mean(x[fid]["forces_mae"][1] / x[fid]["forces_mae"][0] for x in forgetting)
                for fid in CHEAP}
    return {"summary": summary, "runs": results, "settings": vars(args), "train_seconds": seconds}


def plot_curves(results: dict, path: Path) -> None:
    """DFT held-out force and energy MAE against steps, mean over seeds, per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in results.items():
        steps = [c["step"] for c in rows[0]["curve"]]
        for ax, key, scale in ((axes[0], "forces_mae", 1000), (axes[1], "energy_mae_per_atom", 1000)):
            ys = [statistics.mean(r["curve"][k][key] for r in rows) * scale for k in range(len(steps))]
            ax.plot(steps, ys, marker="o", ms=3, label=name)
    axes[0].set(xlabel="optimizer step", ylabel="DFT held-out force MAE (meV/A)")
    axes[1].set(xlabel="optimizer step", ylabel="DFT held-out energy MAE (meV/atom)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
