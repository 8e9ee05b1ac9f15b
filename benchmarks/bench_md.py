"""Inference benchmark: ASE MD steps/s and batched ``predict`` structures/s of a released model
vs SevenNet-0 (sevenn) and a mace-torch MACE of comparable size.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_md [--repeats 3] [--steps 10 3] [--predict 1000]
        [--work benchmarks/_work/md] [--release DIR] [--profile]

All in the same run, float32, 2 torch threads, CPU, on the same structures and MD settings:

1. Peers, each in its own venv under ``<work>`` (``harness.peer_env``; torch held to the CPU
   build): ``sevenn`` (SevenNet-0's weights ship in the wheel) and ``mace-torch``.
2. Ours: ``--release``, or (once, cached in ``<work>``) a release of
   ``benchmarks/md_model.yaml`` (a MACE the size of SevenNet-0: 5 layers, cutoff 5 A,
   l <= 2, 0.89 M parameters) trained 2 steps on the shipped sample with
   ``benchmarks/md_train.yaml`` (``mlip-pretrain data build``, ``train``, ``release create``);
   weights do not matter for speed. Fidelity EMT, ``MLIPCalculator.from_release``.
3. mace-torch: a ScaleShiftMACE at our model's hyperparameters (benchmarks.mace_build);
   if its parameter count is > 15% off ours, one with channels for an equal count too.
4. Structures (seeded): rattled (0.05 A) fcc Cu/Ni alloy cells of 64 and 512 atoms
   (a = 3.6 A); for ``predict``, ``--predict`` rattled, strained fcc cells of 8-64 atoms
   of the release's metals. MD: VelocityVerlet (NVE, 1 fs) from 300 K, 2 warm-up steps
   (``--warmup``) not timed, then ``--steps`` (64, 512 atoms) timed; ``predict``: our
   ``calc.predict(max_atoms=--max-atoms)`` vs each peer's own batched model call (batches of
   the same atom count, default 128).
5. Each model runs in a fresh process per repetition (MD 64, MD 512, predict);
   ``--repeats`` interleaved, median and min-max. The CPU others used meanwhile is read
   from /proc (benchmarks.harness); a skewed run is retried (``--tries``), flagged if kept.
   Process CPU seconds per step are reported too (less sensitive to others' load).

``--profile`` adds, for ours, a split of a force call into neighbor list, collate, forward
and autograd backward (cProfile) and torch.profiler's top operators (benchmarks.md_profile).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import (
    REPO, WORK, Runs, child_script, header, load_note, log, parser, peer_env, run_child, summarise,
    write_result)

SEED, THREADS, SIZE_TOLERANCE = 20261201, 2, 0.15
METALS = ["Cu", "Ni", "Pd", "Ag", "Pt", "Au", "Al"]  # the sample release's elements
CHILD = {w: child_script(f"md_child_{w}") for w in ("ours", "sevenn", "mace")}
PEERS = {"sevenn": ("sevenn==0.13.0", ("sevenn", "e3nn", "torch", "torch-geometric")),
         "mace": ("mace-torch", ("mace-torch", "e3nn", "torch"))}


def cli(*args: str) -> None:
    """``mlip-pretrain ARGS`` in a subprocess (exits naming the command if it fails)."""
    cmd = [sys.executable, "-m", "launch.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"mlip-pretrain {' '.join(args)} failed (exit {proc.returncode})")


def ensure_release(work: Path) -> Path:
    """``<work>/release``, built once: sample shards, 2 training steps, release create."""
    release = work / "release"
    if (release / "config.json").exists():
        log(f"release: reusing {release}")
        return release
    log("release: building shards, training 2 steps and creating the release (minutes)")
    shards, train = work / "shards", work / "train"
    if not (shards / "manifest.json").exists():
        cli("data", "build", "configs/data/sample.yaml", "--out", str(shards))
    cli("train", "benchmarks/md_train.yaml", f"out={train}", f"data.folder={shards}",
        f"eval.folder={shards}")
    cli("release", "create", str(train), "--out", str(release), "--name", "bench-md-mace",
        "--no-eval")
    return release


def write_structures(work: Path, count: int) -> dict:
    """The MD cells (64, 512 atoms) and ``count`` predict structures, as extxyz files."""
    import ase.io  # noqa: PLC0415
    from ase.build import bulk  # noqa: PLC0415

    rng = np.random.default_rng(SEED)
    md = {}
    for name, rep in (("64", (2, 2, 4)), ("512", (4, 4, 8))):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(rep)
        atoms.symbols = rng.choice(["Cu", "Ni"], size=len(atoms))
        atoms.rattle(stdev=0.05, seed=int(rng.integers(1 << 31)))
        md[name] = str(work / f"md-{name}.extxyz")
        ase.io.write(md[name], atoms, format="extxyz")
    reps = [(x, y, z) for x in range(1, 5) for y in range(1, 5) for z in range(1, 5)
            if 8 <= x * y * z <= 64]
    frames = []
    for _ in range(count):
        atoms = bulk("Cu", "fcc", a=float(rng.uniform(3.5, 4.1))).repeat(reps[rng.integers(len(reps))])
        atoms.symbols = rng.choice(METALS, size=len(atoms))
        atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.normal(0, 0.02, (3, 3))), scale_atoms=True)
        atoms.rattle(stdev=0.05, seed=int(rng.integers(1 << 31)))
        frames.append(atoms)
    path = work / "predict.extxyz"
    ase.io.write(path, frames, format="extxyz")
    n = [len(f) for f in frames]
    return {"md": md, "predict": str(path), "predict_structures": count,
            "predict_atoms": sum(n), "predict_atoms_min_max": [min(n), max(n)]}


def plan(a, release: Path, data: dict, pythons: dict) -> tuple[dict, dict]:
    """Jobs ``{key: (child, args, python)}`` and the mace-torch sizing."""
    cfg = json.loads((release / "config.json").read_text())
    m = cfg["model"]
    base = {"md": data["md"], "predict": data["predict"] if a.predict else None,
            "threads": a.threads, "warmup": a.warmup, "max_atoms": a.max_atoms,
            "steps": {"64": a.steps[0], "512": a.steps[1]}}
    jobs = {"ours": ("ours", base | {"release": str(release), "fidelity": a.fidelity}, None),
            "sevennet-0": ("sevenn", base, pythons["sevenn"])}
    ours = cfg["weights"]["parameters"]
    hp = base | {k: m[k] for k in ("cutoff", "num_basis", "lmax", "correlation", "layers",
                                   "channels", "hidden_lmax", "avg_neighbors")}
    hp["elements"] = sorted({int(z) for z in _numbers(METALS)})
    s = run_child(CHILD["mace"], hp | {"mode": "size", "target": ours, "tolerance": SIZE_TOLERANCE},
                  REPO, "sizing mace-torch", python=pythons["mace"])
    log(f"mace-torch: {s['params']:,} parameters at {m['channels']} channels vs ours {ours:,}; "
        f"tried (channels: parameters) {s['tried']}")
    jobs["mace-torch"] = ("mace", hp, pythons["mace"])
    if s["equal_size_channels"] != m["channels"]:
        jobs["mace-torch-eq"] = ("mace", hp | {"channels": s["equal_size_channels"]}, pythons["mace"])
    return jobs, s | {"ours": ours, "channels": m["channels"]}


def _numbers(symbols):
    from ase.data import atomic_numbers  # noqa: PLC0415

    return [atomic_numbers[s] for s in symbols]


def launch(job: tuple, key: str, **extra) -> dict:
    child, args, python = job
    return run_child(CHILD[child], args | extra, REPO, key, python=python)


def describe(key: str):
    def text(r):
        md = ", ".join(f"MD {n}: {v['steps_per_s']:.3g} steps/s ({v['cpu_s_per_step']:.2f} CPU s/step)"
                       for n, v in r["md"].items())
        p = r.get("predict")
        return f"{key:14s} {md}" + (f", predict {p['structures_per_s']:.3g} structures/s" if p else "")
    return text


METRICS = (("MD 64 atoms, steps/s", lambda r: r["md"]["64"]["steps_per_s"]),
           ("MD 512 atoms, steps/s", lambda r: r["md"]["512"]["steps_per_s"]),
           ("predict, structures/s", lambda r: r["predict"]["structures_per_s"]))
CPU = (("MD 64, CPU s/step", lambda r: r["md"]["64"]["cpu_s_per_step"]),
       ("MD 512, CPU s/step", lambda r: r["md"]["512"]["cpu_s_per_step"]))


def rates(runs: dict, with_predict: bool) -> dict:
    """``{key: {metric: summary}}`` over the kept runs."""
    chosen = METRICS if with_predict else METRICS[:2]
    return {k: {name: summarise([f(r) for r in v]) for name, f in chosen + CPU}
            for k, v in runs.items()}


def table(res: dict, names: dict) -> str:
    """Markdown: one row per model, median (min - max) per metric, ours vs each peer."""
    stats, params = res["rates"], res["parameters"]
    metrics = [m for m in stats["ours"] if "CPU" not in m]
    f = lambda v: f"{v:.3g}"  # noqa: E731
    rows = ["| model | parameters | " + " | ".join(metrics) + " | " +
            " | ".join(m.split(",")[0] + ", CPU s/step" for m, _ in CPU) + " |",
            "|---|---:|" + "---:|" * (len(metrics) + len(CPU))]
    for key in stats:
        s = stats[key]
        cells = [f"{f(s[m]['median'])} ({f(s[m]['min'])} - {f(s[m]['max'])})" for m in metrics]
        cells += [f(s[m]["median"]) for m, _ in CPU]
        rows.append(f"| {names[key]} | {params[key]:,} | " + " | ".join(cells) + " |")
    rows += ["", "| ours vs | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for key in [k for k in stats if k != "ours"]:
        x = [stats["ours"][m]["median"] / stats[key][m]["median"] for m in metrics]
        rows.append(f"| {names[key]} | " + " | ".join(f"{v:.2f}x" for v in x) + " |")
    return "\n".join(rows)


def print_profile(p: dict) -> None:
    print("\n## profile of ours (wall ms per call, cProfile; collate excludes the neighbor list)\n")
    cols = ("neighbor_list_s", "collate_s", "forward_s", "autograd_backward_s", "rest_s")
    print("| call | total | " + " | ".join(c[:-2].replace("_", " ") for c in cols) + " |")
    print("|---|---:|" + "---:|" * len(cols))
    for name, r in p.items():
        if name == "top_ops":
            continue
        label = (f"predict batch ({r['structures']} structures, {r['atoms']} atoms)"
                 if name == "predict_batch" else f"MD force call, {name} atoms")
        print(f"| {label} | {r['total_s'] * 1e3:.0f} | " + " | ".join(
            f"{r[c] * 1e3:.0f} ({r[c] / r['total_s']:.0%})" for c in cols) + " |")
    print("\n| operator (self CPU, one force call, largest cell) | calls | ms | share |\n"
          "|---|---:|---:|---:|")
    for k, c, s, share in p["top_ops"]:
        print(f"| `{k}` | {c} | {s * 1e3:.0f} | {share:.1%} |")


def report(res: dict, names: dict) -> None:
    d, a = res["dataset"], res["params"]
    v = {k: p["versions"] for k, p in res["peers"].items()}
    print(f"\nMD: fcc Cu/Ni cells of 64 and 512 atoms, VelocityVerlet 1 fs from 300 K, "
          f"{a['warmup']} warm-up + {a['steps'][0]} / {a['steps'][1]} timed steps; predict: "
          f"{d['predict_structures']} fcc metal cells of {d['predict_atoms_min_max'][0]}-"
          f"{d['predict_atoms_min_max'][1]} atoms ({d['predict_atoms']} in all), batches of "
          f"{a['max_atoms']} atoms. float32, {a['threads']} threads, median (min - max) of "
          f"{a['repeats']}. sevenn {v['sevenn']['sevenn']} (e3nn {v['sevenn']['e3nn']}), "
          f"mace-torch {v['mace']['mace-torch']} (e3nn {v['mace']['e3nn']}), torch "
          f"{res['machine']['torch']}; code {res['code']['commit']}"
          f"{' + uncommitted changes' if res['code']['uncommitted'] else ''}.\n")
    print(table(res, names))
    for key, path in res["predict_paths"].items():
        print(f"- predict path, {names[key]}: {path}")
    print(load_note(res))


def main(argv=None) -> int:
    p = parser(__doc__, repeats=3, tries=2, work=WORK / "md", out_help="default <work>/results.json")
    p.add_argument("--steps", type=int, nargs=2, default=[10, 3], metavar=("N64", "N512"),
                   help="timed MD steps on the 64- and 512-atom cells")
    p.add_argument("--warmup", type=int, default=2, help="MD steps before timing")
    p.add_argument("--predict", type=int, default=300, help="predict structures (0: skip)")
    p.add_argument("--max-atoms", type=int, default=128,
                   help="atoms per predict batch, the same for every model (default 128: "
                        "our CPU default; on CPU larger batches are slower per structure)")
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--release", help="our release folder (default: build one in <work>)")
    p.add_argument("--fidelity", default="EMT")
    p.add_argument("--profile", action="store_true", help="profile ours after the timings")
    a = p.parse_args(argv)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start, head = time.perf_counter(), header(("torch", "e3nn", "ase"))
    peers = {k: peer_env(work / f"{k}-venv", spec, pkgs) for k, (spec, pkgs) in PEERS.items()}
    release = Path(a.release).resolve() if a.release else ensure_release(work)
    data = write_structures(work, max(a.predict, 16))
    jobs, sizing = plan(a, release, data, {k: v["python"] for k, v in peers.items()})
    runs = Runs(jobs, a.repeats, a.tries)
    runs.interleaved({key: lambda key=key: launch(jobs[key], key) for key in jobs}, describe)
    names = {"ours": f"ours ({release.name}, MACE {sizing['channels']} ch)",
             "sevennet-0": "SevenNet-0 (sevenn)",
             "mace-torch": f"mace-torch MACE, {sizing['channels']} ch (our hyperparameters)",
             "mace-torch-eq": f"mace-torch MACE, {sizing['equal_size_channels']} ch (equal size)"}
    res = head | {"peers": peers, "release": str(release), "params": vars(a),
                  "dataset": data, "mace_torch_sizing": sizing,
                  "rates": rates(runs.runs, bool(a.predict)),
                  "parameters": {k: v[0]["params"] for k, v in runs.runs.items()},
                  "predict_paths": {k: v[0]["predict_path"] for k, v in runs.runs.items()}
                  } | runs.record()
    report(res, names)
    if a.profile:  # after all timings, so that it cannot disturb them
        res["profile"] = launch(jobs["ours"], "profile", profile=True,
                                 predict=data["predict"])["profile"]
        print_profile(res["profile"])
    res["total_seconds"] = time.perf_counter() - t_start
    write_result(a.out or work / "results.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
