"""Training benchmark: weak scaling from 1 to 2 CPU processes, and training atoms/s of
``mlip-pretrain train`` vs mace-torch's own trainer (``mace_run_train``).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_train [--repeats 3] [--steps 24] [--max-atoms 512]
        [--epochs 3] [--structures 192] [--batch-size 8] [--wait-quiet 300] [--quick]

``--quick`` (1 repeat, 12 steps, 2 epochs of 32 structures) is a smoke run of about
3 minutes. Everything runs on CPU in float32 with 1 torch thread per process
(``OMP_NUM_THREADS=1``):

1. Data (cached in ``<work>``, default ``benchmarks/_work/train``): ``--structures``
   training and 16 validation structures: strained, rattled fcc alloys of 1-3 of EMT's
   metals, 3-72 atoms, labelled by ASE's EMT (energy, forces, stress), in extended XYZ.
   Ours: ``mlip-pretrain data build`` into 2 shards (timed once; not part of training).
2. Model: ours ``family: mace``, 32 channels, lmax 3, hidden_lmax 1, correlation 3,
   2 layers, 8 Bessel functions, cutoff 5 A. mace-torch: ``--model MACE --hidden_irreps
   '32x0e + 32x1o'`` with the same degrees, correlation, layers, radial basis and cutoff.
   mace-torch's model has more parameters at equal hyperparameters (element-dependent
   weights), so ours is also run at the channel count closest to its parameter count.
3. Weak scaling: one config with ``sampler.max_atoms = --max-atoms`` per rank (and an
   epoch longer than the run, so no partial end-of-epoch batch), run by ``torchrun`` with
   1 and with 2 processes (gloo, the default engine: DeepSpeed ZeRO-1), ``--steps``
   steps, a log line every ``--log-every``. atoms/s comes from ``metrics.jsonl``, after
   the first ``--skip`` lines (warm-up). Efficiency = atoms/s(2) / (2 * atoms/s(1)).
   Also timed: two independent 1-process runs at once ("pair"): they share the machine
   but never communicate, so their efficiency is the most this VM allows. The sampler's
   plan gives the rank imbalance (a synchronous step waits for the busier rank).
4. Ours vs mace-torch, 1 process each, ``--epochs`` epochs, loss on energy and forces
   (MSE), no EMA. mace-torch: ``--batch_size`` structures per step and validation on the
   16 structures after each epoch. Ours: ``sampler.max_atoms`` chosen so that an epoch has
   as many steps as mace-torch's (so the same mean atoms per step), no evaluation, batches
   built in the trainer (``stream.workers: 0``). Steady atoms/s skips the first epoch on
   both sides: ours from per-epoch lines of ``metrics.jsonl``; mace-torch from its log's
   timestamps of consecutive epoch lines minus each epoch's validation time (from its
   ``results`` file). "Compute-only" leaves out our data wait and, for mace-torch, all
   but its ``take_step`` times. Whole-process wall time for the same epochs too.
5. ``--repeats`` interleaved repetitions; median and min-max. Before each run the script
   waits (up to ``--wait-quiet`` s) for other processes to go quiet; CPU they use during
   each run's steady part is read from /proc (``benchmarks.harness``); a skewed run is
   retried (``--tries``) and flagged if kept. Table on stdout; raw numbers, machine and
   versions in ``<work>/results.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_models import CHILD_MACE
from benchmarks.harness import (
    REPO, WORK, Runs, header, load_note, log, markdown, parser, peer_env, run_child, write_result)
from benchmarks.train_plan import Plan
from benchmarks.train_runs import (
    free_port, read_mace, read_ours, steady_load, wait_quiet, watch, write_emt)

SEED, CUTOFF, THREADS, VALID = 20261121, 5.0, 1, 16
MODEL = {"family": "mace", "cutoff": CUTOFF, "channels": 32, "hidden": 64, "lmax": 3,
         "hidden_lmax": 1, "correlation": 3, "layers": 2, "num_basis": 8}
MACE_MODEL = ["--model", "MACE", "--hidden_irreps", "32x0e + 32x1o", "--r_max", str(CUTOFF),
              "--max_ell", "3", "--correlation", "3", "--num_interactions", "2",
              "--num_radial_basis", "8", "--num_cutoff_basis", "6"]
LONG_EPOCH = 100_000  # weak scaling: no epoch end (a partial batch) within a run
PEER_PARAMS = ("import json, sys; import mace, torch; a = json.loads(sys.argv[1]); "
               "m = torch.load(a['path'], map_location='cpu', weights_only=False); "
               "print('RESULT ' + json.dumps({'params': sum(p.numel() for p in m.parameters())}))")


def child_env() -> dict:
    """One torch thread per process, CPU DeepSpeed, unbuffered logs, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return env | {"OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
                  "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def prepare_data(work: Path, n_train: int) -> dict:
    """Training/validation extxyz and our shards (made once per ``n_train``)."""
    stamp, spec = work / "data.json", {"train": n_train, "valid": VALID, "seed": SEED}
    if stamp.exists() and json.loads(stamp.read_text())["spec"] == spec:
        return json.loads(stamp.read_text())
    log(f"data: writing {n_train} + {VALID} EMT-labelled structures")
    sizes = write_emt(work / "train.extxyz", n_train, SEED)
    write_emt(work / "valid.extxyz", VALID, SEED + 1)
    (work / "recipe.yaml").write_text(
        "sources:\n  - path: train.extxyz\n    dataset: emt-alloys\n    fidelity: EMT\n"
        "    energy_key: REF_energy\n    forces_key: REF_forces\n    stress_key: REF_stress\n"
        "shards: 2\n")
    shutil.rmtree(work / "shards", ignore_errors=True)
    t = time.perf_counter()
    with open(work / "build.txt", "w") as out:
        subprocess.run([sys.executable, "-m", "launch.cli", "data", "build",
                        str(work / "recipe.yaml"), "--out", str(work / "shards"), "--workers", "1"],
                       cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT, check=True)
    info = {"spec": spec, "build_s": time.perf_counter() - t, "atoms": sum(sizes),
            "structures": n_train, "atoms_min_max": [min(sizes), max(sizes)],
            "neighbours_per_atom": neighbours(work / "train.extxyz")}
    stamp.write_text(json.dumps(info, indent=1))
    return info


def neighbours(path: Path) -> float:
    """Mean neighbours per atom at CUTOFF in an extxyz file."""
    import ase.io  # noqa: PLC0415
    from ase.neighborlist import neighbor_list  # noqa: PLC0415

    frames = ase.io.read(path, index=":")
    return sum(len(neighbor_list("i", a, CUTOFF)) for a in frames) / sum(len(a) for a in frames)


def write_config(path: Path, shards: Path, steps: int, log_every: int, max_atoms: int,
                 model: dict = MODEL, samples_per_epoch: int | None = None) -> Path:
    """Our training config: MODEL, energy + force MSE, no EMA, no evaluation, no tracking,
    one checkpoint at the end, batches built in the trainer (``stream.workers: 0``)."""
    cfg = {"out": str(path.parent / "unused"), "steps": steps, "seed": 0, "ema_decay": 0.0,
           "log_every": log_every,
           "data": {"folder": str(shards), "cutoff": CUTOFF,
                    "sampler": {"max_atoms": max_atoms, "seed": SEED,
                                "samples_per_epoch": samples_per_epoch},
                    "stream": {"workers": 0}},
           "model": model, "loss": {"kind": "mse", "energy": 1.0, "forces": 10.0},
           "checkpoint": {"every": 0, "keep": 1}, "tracking": {"enabled": False}}
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def run_ours(job: dict, work: Path) -> dict:
    """One of ours: ``torchrun`` (1 or 2 ranks), plain (1 process) or a pair of plain runs."""
    runs = [work / "runs" / f"{job['key']}-{k}" for k in range(2 if job["kind"] == "pair" else 1)]
    for r in runs:
        shutil.rmtree(r, ignore_errors=True)
        r.mkdir(parents=True)
    train = ["-m", "launch.cli", "train", str(job["config"])]
    if job["kind"] == "torchrun":
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                 str(job["world"]), "--master-addr", "127.0.0.1", "--master-port",
                 str(free_port()), *train, f"out={runs[0]}"]]
    else:
        cmds = [[sys.executable, *train, f"out={r}"] for r in runs]
    w = watch(cmds, child_env(), REPO, runs[0] / "metrics.jsonl", None, runs[0] / "stdout.txt")
    reads = [read_ours(r / "metrics.jsonl", job["skip"]) for r in runs]
    seconds, other = steady_load(w, job["skip"] - 1, len(w["marks"]) - 1)
    return {"seconds": seconds, "other_cpu_s": other, "wall_s": w["seconds"],
            "run_other_cpu_s": w["run_other_cpu_s"], "reads": reads,
            "atoms_per_s": sum(r["atoms_per_s"] for r in reads),
            "compute_atoms_per_s": sum(r["compute_atoms_per_s"] for r in reads)}


def run_mace(job: dict, work: Path, peer: dict) -> dict:
    """mace-torch's ``mace_run_train`` for ``epochs`` epochs (validation each epoch)."""
    run = work / "runs" / job["key"]
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cmd = [str(Path(peer["python"]).parent / "mace_run_train"), "--name", "bench", "--seed",
           str(SEED), "--work_dir", str(run), "--train_file", str(work / "train.extxyz"),
           "--valid_file", str(work / "valid.extxyz"), "--energy_key", "REF_energy",
           "--forces_key", "REF_forces", *MACE_MODEL, "--batch_size", str(job["batch"]),
           "--valid_batch_size", str(VALID), "--max_num_epochs", str(job["epochs"]),
           "--device", "cpu", "--default_dtype", "float32", "--E0s", "average",
           "--loss", "weighted", "--plot", "False", "--patience", "1000",
           "--eval_interval", "1", "--num_workers", "0"]
    w = watch([cmd], child_env(), run, run / "logs" / f"bench_run-{SEED}.log",
              r"INFO: (Initial|Epoch \d+|Training complete)", run / "stdout.txt")
    r = read_mace(run, job["atoms_per_epoch"], job["steps_per_epoch"], job["skip"])
    seconds, other = steady_load(w, job["skip"], job["epochs"])
    return {"seconds": seconds, "other_cpu_s": other, "wall_s": w["seconds"],
            "to_training_complete_s": w["marks"][-1], "run_other_cpu_s": w["run_other_cpu_s"],
            **r, "model_file": str(run / "checkpoints" / f"bench_run-{SEED}.model")}


def plan(a, work: Path, data: dict, sizing: dict) -> dict:
    """The measurements: weak-1, weak-2, pair, ours, ours-eq and mace-torch (job dicts)."""
    shards = work / "shards"
    if a.structures % a.batch_size:
        raise SystemExit(f"--structures {a.structures} must be a multiple of --batch-size "
                         f"{a.batch_size} (mace-torch drops a last partial batch)")
    spe = a.structures // a.batch_size
    sampler_plan = Plan(shards, SEED, CUTOFF)
    budget = sampler_plan.match_budget(spe)
    n = sampler_plan.steps_per_epoch(budget)
    log(f"ours vs mace-torch: {spe} steps per epoch; our max_atoms {budget} gives {n}")
    weak = write_config(work / "weak.yaml", shards, a.steps, a.log_every, a.max_atoms,
                        samples_per_epoch=LONG_EPOCH)
    ours = write_config(work / "ours.yaml", shards, a.epochs * n, n, budget)
    eq = write_config(work / "ours-eq.yaml", shards, a.epochs * n, n, budget,
                      MODEL | {"channels": sizing["ours_eq_channels"]})
    base = {"config": weak, "skip": a.skip}
    ours_job = {"config": ours, "kind": "plain", "skip": 1, "max_atoms": budget,
                "steps_per_epoch": n}
    return {"weak-1": base | {"kind": "torchrun", "world": 1},
            "weak-2": base | {"kind": "torchrun", "world": 2},
            "pair": base | {"kind": "pair"},
            "ours": ours_job, "ours-eq": ours_job | {"config": eq},
            "mace-torch": {"kind": "mace", "skip": 1, "epochs": a.epochs, "batch": a.batch_size,
                           "steps_per_epoch": spe, "atoms_per_epoch": data["atoms"]}}


def ours_parameters(channels: int) -> int:
    """Parameters of our MODEL at ``channels`` (one fidelity)."""
    from common.config import from_dict  # noqa: PLC0415
    from models.build import ModelConfig, build_model  # noqa: PLC0415

    cfg = from_dict(ModelConfig, MODEL | {"channels": channels})
    return sum(p.numel() for p in build_model(cfg, ["EMT"], {"EMT": {}}).parameters())


def sizing(peer: dict, work: Path) -> dict:
    """Parameter counts: mace-torch's model at our hyperparameters (built as bench_models
    builds it, which matches ``mace_run_train``'s), and our channels closest to its count."""
    hp = {k: MODEL[k] for k in ("cutoff", "num_basis", "lmax", "correlation", "layers",
                                "channels", "hidden_lmax")}
    s = run_child(CHILD_MACE, hp | {"structures": str(work / "train.extxyz"), "threads": THREADS,
                                    "avg_neighbors": 30.0, "mode": "size", "target": 1,
                                    "tolerance": 1e9}, REPO, "mace sizing", python=peer["python"])
    ours = {c: ours_parameters(c) for c in range(16, 129, 8)}
    eq = min(ours, key=lambda c: abs(ours[c] / s["params"] - 1))
    return {"mace-torch": s["params"], "ours": ours[MODEL["channels"]], "ours-eq": ours[eq],
            "ours_eq_channels": eq}


def quiet_then(fn, limit_s: float) -> dict:
    """``fn()`` after waiting for the machine to go quiet (the wait is recorded)."""
    waited = wait_quiet(limit_s) if limit_s > 0 else 0.0
    if waited > 10:
        log(f"  waited {waited:.0f} s for other processes to go quiet")
    return fn() | {"waited_s": waited}


def describe(key: str):
    """The progress line of a run of ``key``."""
    def text(r: dict) -> str:
        return (f"{key:10s} {r['atoms_per_s']:7.1f} atoms/s steady (compute-only "
                f"{r['compute_atoms_per_s']:.1f}), wall {r['wall_s']:.0f} s")
    return text


def report(res: dict, a) -> None:
    """Both tables and the verdicts on the targets, on stdout."""
    rates, d = res["rates"], res["dataset"]
    f = lambda s: (f"{s['median']:,.1f}", f"{s['min']:,.1f} - {s['max']:,.1f}")  # noqa: E731
    print(f"\nData: {d['structures']} EMT fcc alloy structures, {d['atoms']} atoms "
          f"({d['atoms_min_max'][0]}-{d['atoms_min_max'][1]} each), {d['neighbours_per_atom']:.1f} "
          f"neighbours per atom at {CUTOFF:g} A; {THREADS} thread per process, float32; median "
          f"of {a.repeats}; code {res['code']['commit']}"
          f"{' + uncommitted changes' if res['code']['uncommitted'] else ''}.\n")
    one = rates["weak-1"]["median"]
    print(markdown([f"weak scaling, max_atoms {a.max_atoms} per rank", "atoms/s", "min - max",
                    "efficiency"],
                   [[name, *f(rates[key]),
                     "-" if key == "weak-1" else f"{rates[key]['median'] / (2 * one):.1%}"]
                    for key, name in (("weak-1", "torchrun, 1 process"),
                                      ("weak-2", "torchrun, 2 processes"),
                                      ("pair", "2 independent 1-process runs at once (ceiling)"))]))
    e = res["weak_efficiency_per_repeat"]
    print(f"efficiency per repeat (same-repeat pairs): {', '.join(f'{x:.1%}' for x in e)}; "
          f"target >= 90%: {'met' if statistics.median(e) >= 0.9 else 'NOT met'}")
    imb = res["weak_imbalance"]
    print(f"rank imbalance over the timed steps: the busier rank's batch has {imb['edges']:.1%} "
          f"more edges ({imb['atoms']:.1%} more atoms) than the two ranks' mean\n")
    p, c, w = res["parameters"], res["compute_rates"], res["wall"]
    names = {"ours": f"ours, {MODEL['channels']} channels (matching hyperparameters)",
             "ours-eq": f"ours, {p['ours_eq_channels']} channels (equal parameter count)",
             "mace-torch": f"mace-torch {res['peer']['versions']['mace-torch']}, "
                           f"{MODEL['channels']} channels"}
    print(markdown(["trainer", "parameters", "steady atoms/s", "min - max", "compute-only atoms/s",
                    "wall s, whole process", "vs mace-torch"],
                   [[name, f"{p[key]:,}", *f(rates[key]), f"{c[key]['median']:,.1f}",
                     f"{w[key]['median']:.0f}",
                     f"{rates[key]['median'] / rates['mace-torch']['median']:.2f}x"]
                    for key, name in names.items()]))
    for key in ("ours", "ours-eq"):
        x = rates[key]["median"] / rates["mace-torch"]["median"]
        y = c[key]["median"] / c["mace-torch"]["median"]
        print(f"{key} / mace-torch: {x:.2f}x steady (target >= 1.5x: "
              f"{'met' if x >= 1.5 else 'NOT met'}), {y:.2f}x compute-only, "
              f"{w['mace-torch']['median'] / w[key]['median']:.2f}x faster in whole-process "
              "wall time")
    print(load_note(res))


def main(argv=None) -> int:
    p = parser(__doc__, repeats=3, tries=3, work=WORK / "train",
               out_help="default <work>/results.json")
    p.add_argument("--steps", type=int, default=24, help="weak scaling: steps per run")
    p.add_argument("--log-every", type=int, default=4, help="weak scaling: steps per log line")
    p.add_argument("--skip", type=int, default=2, help="weak scaling: warm-up log lines skipped")
    p.add_argument("--max-atoms", type=int, default=512, help="weak scaling: atoms per rank")
    p.add_argument("--epochs", type=int, default=3, help="ours vs mace-torch: epochs per run")
    p.add_argument("--structures", type=int, default=192, help="training structures")
    p.add_argument("--batch-size", type=int, default=8, help="mace-torch: structures per batch")
    p.add_argument("--wait-quiet", type=float, default=300, help="before each run, wait up to "
                   "this many seconds for other processes to go quiet (0: never wait)")
    p.add_argument("--mace-venv", default=str(WORK / "models" / "mace-venv"))
    p.add_argument("--quick", action="store_true", help="smoke run: 12 steps, 2 epochs of 32")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.steps, a.log_every, a.skip, a.max_atoms = 1, 12, 3, 1, 256
        a.epochs, a.structures, a.batch_size = 2, 32, 4
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start, head = time.perf_counter(), header(("torch", "deepspeed", "e3nn", "ase"))
    peer = peer_env(Path(a.mace_venv).resolve(), "mace-torch", ("mace-torch", "e3nn", "torch"))
    data = prepare_data(work, a.structures)
    size = sizing(peer, work)
    log(f"parameters: ours {size['ours']:,} at {MODEL['channels']} channels, mace-torch "
        f"{size['mace-torch']:,}; equal size: ours at {size['ours_eq_channels']} channels "
        f"({size['ours-eq']:,})")
    jobs = plan(a, work, data, size)
    runs = Runs(jobs, a.repeats, a.tries)

    def run(key: str):  # a measurement of key, after waiting for the machine to go quiet
        job = jobs[key] | {"key": key}
        fn = (lambda: run_mace(job, work, peer)) if key == "mace-torch" else (
            lambda: run_ours(job, work))
        return lambda: quiet_then(fn, a.wait_quiet)

    runs.interleaved({key: run(key) for key in jobs}, describe)
    kept = runs.runs
    eff = [b["atoms_per_s"] / (2 * o["atoms_per_s"])
           for o, b in zip(kept["weak-1"], kept["weak-2"])]
    res = head | {"peer": peer,
                  "params": vars(a) | {"cutoff": CUTOFF, "threads": THREADS, "valid": VALID,
                                       "model": MODEL, "mace_model": MACE_MODEL},
                  "dataset": data, "jobs": {k: {x: str(y) for x, y in j.items()} for k, j in jobs.items()},
                  "parameters": size | {"mace-torch_model_file": run_child(
                      PEER_PARAMS, {"path": kept["mace-torch"][0]["model_file"]}, REPO,
                      "mace parameter count", python=peer["python"])["params"]},
                  "rates": runs.summary(lambda r: r["atoms_per_s"]),
                  "compute_rates": runs.summary(lambda r: r["compute_atoms_per_s"]),
                  "wall": runs.summary(lambda r: r["wall_s"]),
                  "weak_efficiency_per_repeat": eff,
                  "weak_imbalance": Plan(work / "shards", SEED, CUTOFF).imbalance(
                      a.max_atoms, a.skip * a.log_every, a.steps, LONG_EPOCH)} | runs.record()
    report(res, a)
    res["total_seconds"] = time.perf_counter() - t_start
    write_result(a.out or work / "results.json", res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
