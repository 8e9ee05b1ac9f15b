"""Time to accuracy: held-out errors of ``mlip-pretrain train`` and of mace-torch's own
trainer (``mace_run_train``) after the same wall-clock time of training, on the same CPU,
the same data and the same hyperparameters (issue 28, item 3).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_accuracy [--seconds 300] [--repeats 3] [--clock train]
        [--structures 192] [--test 64] [--batch-size 8] [--lr 0.01] [--energy-weight 1]
        [--forces-weight 100] [--ema 0] [--threads 1] [--mace-amsgrad] [--quick]

``--quick`` (32 training and 16 test structures, batches of 4, 20 s per side, 1 repeat,
no waiting for a quiet machine) is a smoke run of about 1-2 minutes; its JSON goes to
``<work>/accuracy-quick.json``, a full run's to ``benchmarks/results/accuracy.json``.

1. Data (``bench_train.prepare_data``, cached in ``<work>``): ``--structures`` training and
   16 validation structures, strained and rattled fcc alloys labelled by ASE's EMT, plus
   ``--test`` test structures from another seed that neither trainer ever sees. Both read
   the same extended XYZ files; ours trains on the shards ``mlip-pretrain data build``
   made of the training file.
2. Model: ``bench_train``'s comparison, 32 channels, lmax 3, hidden l <= 1, correlation 3,
   2 layers, 8 Bessel functions, cutoff 5 A (mace-torch's model has more parameters at
   these hyperparameters: its weights are per element). Ours gets ``avg_neighbors`` = the
   training set's mean neighbours per atom at the cutoff, which mace-torch computes itself.
3. Training hyperparameters, the same on both sides (mace-torch flag -> our key):

   - optimizer: ``--optimizer adam --beta 0.9`` (beta2 0.999, eps 1e-8: torch's defaults)
     -> AdamW with ``optim.betas [0.9, 0.999]``, ``optim.eps 1e-8``. AMSGrad: mace-torch's
     CLI always turns it on (``--amsgrad`` is a store_true defaulting to True) and ours
     has none, so mace-torch is run through its own ``run(args)`` with ``args.amsgrad``
     False (its ``main`` is parse-then-run): plain Adam on both sides. ``--mace-amsgrad``
     runs the stock ``mace_run_train`` instead (AMSGrad on mace-torch's side only).
   - learning rate ``--lr`` (mace-torch's default 0.01) -> ``optim.lr``; constant on both:
     ``--scheduler ExponentialLR --lr_scheduler_gamma 1`` -> ``optim.warmup_steps 0``,
     ``optim.min_lr_ratio 1``.
   - weight decay: ``--weight_decay 0`` (its default 5e-7 is an L2 term on some weights)
     -> ``optim.weight_decay 0``, so AdamW is Adam.
   - gradient clipping: ``--clip_grad 10`` -> ``engine.clip 10`` (global norm, both).
   - batch: ``--batch_size`` structures -> ``data.sampler.max_atoms`` chosen (as
     ``bench_train`` does, ``train_plan.Plan.match_budget``) so that an epoch has as many
     steps as mace-torch's: the same mean atoms per step.
   - loss: ``--loss weighted --energy_weight --forces_weight`` (MSE of energy per atom and
     of force components, no stress) -> ``loss.kind mse``, ``loss.energy``,
     ``loss.forces``, ``loss.stress 0``. One difference neither side can switch: mace-torch
     averages the per-atom energy errors over structures, ours over atoms.
   - EMA: off on both (``--ema 0``), or ``--ema --ema_decay D`` -> ``ema_decay D``; both
     then evaluate the averaged weights.
   - float32 on both; ``OMP_NUM_THREADS`` = ``MKL_NUM_THREADS`` = ``--threads`` for every
     process (default 1, as ``bench_train``); the evaluations also set torch's threads.
   - element references: ``--E0s average`` (a least-squares fit on the training set) ->
     those of ``mlip-pretrain data build`` (in the manifest). Output scaling is each
     trainer's own (mace-torch: ``rms_forces_scaling``).
   - seeds: repeat ``r`` uses ``20261121 + r`` on both sides (``--seed``; ``seed`` and
     ``data.sampler.seed``).

4. Equal wall-clock. mace-torch has no time limit, and its only checkpoints are the
   per-epoch ones it writes when the validation loss improves (the model it releases is
   the best-validation one). So it runs with a very large epoch count; ``--seconds``
   after its start it is frozen (SIGSTOP; if an epoch line is under 2 s old its
   checkpoint may still be being written, so it goes on for 2 s and is frozen again) and
   killed. What it had at the budget is its checkpoint after the last completed epoch
   (validation included), and its training time T is from its "Initial" validation line
   to that epoch's line. The work of the unfinished epoch is lost and not counted. Then
   mace-torch's own ``--restart_latest`` with ``--max_num_epochs`` = the checkpoint's
   epoch writes its ``.model`` file without training (not timed). Ours then trains for
   the same T: SIGTERM (its preemption handler: finish the step, save a checkpoint, exit
   75) is sent the longest step seen plus one poll interval before T, so its training
   ends a little before T (it finishes the step under way, and at most one more). Both
   times are reported.
   ``--clock train`` (default) counts training only: mace-torch's start-up (reading the
   data, building graphs, E0s, the model, the initial validation) and ours (imports,
   DeepSpeed, the sampler's plan, the FLOPs count) are left out and reported.
   ``--clock process`` counts from each process's launch instead (start-up included).
   mace-torch's validation of 16 structures after every epoch is part of its training
   loop and stays in its T; ours runs no evaluation.
5. Evaluation, each in a fresh process on the ``--test`` structures: mace-torch's
   ``MACECalculator`` on its ``.model`` (peer venv), ours ``MLIPCalculator.predict`` on
   the run's last checkpoint (``pretrain.release.loader.load_model``), both float32.
   Force MAE in meV/A over all components, energy MAE in meV/atom (|dE| / atoms, mean over
   structures), computed here from both sides' predictions the same way.
6. ``--repeats`` seeds, each a fresh pair of processes; median and min-max. Before each
   run the script waits (up to ``--wait-quiet`` s) for other processes to go quiet; the CPU
   they use during each run is read from /proc (``benchmarks.harness``) and a run they
   skewed is retried (``--tries``) or flagged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_train import (
    CUTOFF, MACE_MODEL, MODEL, SEED, VALID, child_env, prepare_data, quiet_then)
from benchmarks.harness import (
    REPO, Runs, code_state, cpu_snapshot, log, machine, other_cpu, peer_env, run_child, summarise)
from benchmarks.train_plan import Plan
from benchmarks.train_runs import write_emt

TEST_SEED = SEED + 2  # train: SEED, validation: SEED + 1 (bench_train.prepare_data)
MACE_SPEC = "mace-torch"  # bench_train's spec, so both share one venv (0.3.16 when written)
POLL_S, SAVE_GUARD_S, STOP_WAIT_S = 0.2, 2.0, 300
MANY_EPOCHS, MANY_STEPS = 100_000, 10_000_000  # stopped by the budget long before
# mace-torch's main() is parse_args() then run(args); this is the same with AMSGrad off
MACE_PLAIN_ADAM = ("import sys; from mace import tools; from mace.cli.run_train import run; "
                   "args = tools.build_default_arg_parser().parse_args(sys.argv[1:]); "
                   "args.amsgrad = False; run(args)")
_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO: (Initial|Epoch (\d+)):")

MACE_EVAL = """
import json, sys
import ase.io, torch
from mace.calculators import MACECalculator
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
calc = MACECalculator(model_paths=a["model"], device="cpu", default_dtype="float32")
energy, forces = [], []
for atoms in ase.io.read(a["test"], index=":"):
    atoms.calc = calc
    energy.append(float(atoms.get_potential_energy()))
    forces.append(atoms.get_forces().ravel().tolist())
params = sum(p.numel() for p in calc.models[0].parameters())
print("RESULT " + json.dumps({"energy": energy, "forces": forces, "parameters": params}))
"""
OURS_EVAL = """
import json, sys
import ase.io, torch
from pretrain.release.calculator import MLIPCalculator
from pretrain.release.loader import load_model
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
trained = load_model(a["run"])
out = MLIPCalculator(trained, a["fidelity"], dtype="float32").predict(ase.io.read(a["test"], index=":"))
params = sum(p.numel() for p in trained.potential.parameters())
print("RESULT " + json.dumps({"energy": [r["energy"] for r in out], "parameters": params,
                              "forces": [r["forces"].ravel().tolist() for r in out]}))
"""


def threads_env(threads: int) -> dict:
    """``bench_train.child_env`` with ``threads`` OpenMP/MKL threads (both trainers, both evaluations)."""
    return child_env() | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def prepare(work: Path, n_train: int, n_test: int) -> dict:
    """``bench_train``'s training/validation files and shards, plus a test file (made once)."""
    data = prepare_data(work, n_train)
    stamp, spec = work / "test.json", {"test": n_test, "seed": TEST_SEED}
    if not (stamp.exists() and json.loads(stamp.read_text()) == spec):
        log(f"data: writing {n_test} EMT-labelled test structures")
        write_emt(work / "test.extxyz", n_test, TEST_SEED)
        stamp.write_text(json.dumps(spec))
    seen = {s for a in _frames(work / "train.extxyz") for s in a.get_chemical_symbols()}
    unseen = {s for a in _frames(work / "test.extxyz") for s in a.get_chemical_symbols()} - seen
    if unseen:  # both models refuse elements they were not trained on
        raise SystemExit(f"test structures hold {sorted(unseen)}, absent from the training "
                         f"structures; raise --structures")
    return data | {"test": n_test}


def ours_config(path: Path, shards: Path, a, seed: int, max_atoms: int, neighbours: float) -> Path:
    """Our training config with the shared hyperparameters (module docstring, item 3)."""
    cfg = {"out": str(path.parent / "unused"), "steps": MANY_STEPS, "seed": seed,
           "ema_decay": a.ema, "log_every": 1,  # every step's elapsed time: the deadline needs it
           "data": {"folder": str(shards), "cutoff": CUTOFF,
                    "sampler": {"max_atoms": max_atoms, "seed": seed}, "stream": {"workers": 0}},
           "model": MODEL | {"avg_neighbors": round(neighbours, 3)},
           "loss": {"kind": "mse", "energy": a.energy_weight, "forces": a.forces_weight, "stress": 0.0},
           "optim": {"lr": a.lr, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                     "warmup_steps": 0, "min_lr_ratio": 1.0},
           "engine": {"clip": 10.0},
           "checkpoint": {"every": 0, "keep": 1}, "tracking": {"enabled": False}}
    path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
    return path


def mace_command(peer: dict, work: Path, run: Path, a, seed: int, epochs: int) -> list[str]:
    """``mace_run_train`` with the shared hyperparameters (module docstring, item 3)."""
    bindir = Path(peer["python"]).parent
    head = ([str(bindir / "mace_run_train")] if a.mace_amsgrad
            else [peer["python"], "-c", MACE_PLAIN_ADAM])
    ema = ["--ema", "--ema_decay", str(a.ema)] if a.ema > 0 else []
    return [*head, "--name", "bench", "--seed", str(seed), "--work_dir", str(run),
            "--train_file", str(work / "train.extxyz"), "--valid_file", str(work / "valid.extxyz"),
            "--energy_key", "REF_energy", "--forces_key", "REF_forces", *MACE_MODEL,
            "--batch_size", str(a.batch_size), "--valid_batch_size", str(VALID),
            "--max_num_epochs", str(epochs), "--patience", str(MANY_EPOCHS),
            "--device", "cpu", "--default_dtype", "float32", "--E0s", "average",
            "--loss", "weighted", "--energy_weight", str(a.energy_weight),
            "--forces_weight", str(a.forces_weight), "--optimizer", "adam", "--beta", "0.9",
            "--lr", str(a.lr), "--weight_decay", "0", "--scheduler", "ExponentialLR",
            "--lr_scheduler_gamma", "1.0", "--clip_grad", "10", *ema,
            "--eval_interval", "1", "--plot", "False", "--num_workers", "0"]


def mace_lines(log_file: Path) -> dict[int, float]:
    """Unix times of mace-torch's validation lines: -1 the initial one, then each epoch's."""
    try:
        text = log_file.read_text()
    except OSError:
        return {}
    out = {}
    for ln in text.splitlines():
        m = _LINE.match(ln)
        if m:
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            out[-1 if m.group(3) is None else int(m.group(3))] = t
    return out


def run_until(cmd: list[str], env: dict, cwd: Path, stdout: Path, deadline, stop,
              may_finish: bool = False) -> dict:
    """Run ``cmd`` until the unix time ``deadline(launch)`` (None while not yet known), then
    ``stop(proc)`` and wait for its exit. An exit before that is an error naming ``stdout``
    unless ``may_finish`` and its status is 0. Returns the launch and stop times, the exit
    status and the CPU other processes used from launch to stop."""
    before, launch = cpu_snapshot(), time.time()
    with open(stdout, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                at = deadline(launch)
                if at is not None and time.time() >= at:
                    snap, stopped = cpu_snapshot(), time.time()  # taken while it still runs
                    stop(proc)
                    proc.wait(timeout=STOP_WAIT_S)
                    return {"launch": launch, "stopped": stopped, "rc": proc.returncode,
                            "seconds": stopped - launch, "other_cpu_s": other_cpu(before, snap)}
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if may_finish and proc.returncode == 0:
        return {"launch": launch, "stopped": None, "rc": 0}
    raise SystemExit(f"{cmd[0]} exited ({proc.returncode}) before its time was up; see {stdout}:\n"
                     f"{stdout.read_text()[-3000:]}")


def freeze_between_epochs(log_file: Path):
    """A ``stop`` for mace-torch: freeze it, and kill it unless an epoch line is under
    SAVE_GUARD_S old (its checkpoint is written right after the line, deleting the previous
    one first: a kill then could leave no whole checkpoint); then thaw it for that long."""
    def stop(proc) -> None:
        while True:
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.05)
            lines = mace_lines(log_file)
            if max(lines.values(), default=0.0) < time.time() - SAVE_GUARD_S:
                proc.kill()
                return
            proc.send_signal(signal.SIGCONT)
            time.sleep(SAVE_GUARD_S)
    return stop


def train_mace(peer: dict, work: Path, a, seed: int, steps_per_epoch: int) -> dict:
    """mace-torch for ``a.seconds`` (``a.clock``), its model at the last completed epoch
    exported by its own restart; training time, start-up and steps."""
    run = work / "runs" / f"mace-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    log_file = run / "logs" / f"bench_run-{seed}.log"

    def deadline(launch: float) -> float | None:
        if a.clock == "process":
            return launch + a.seconds
        start = mace_lines(log_file).get(-1)
        return None if start is None else start + a.seconds

    env, cmd = threads_env(a.threads), mace_command(peer, work, run, a, seed, MANY_EPOCHS)
    r = run_until(cmd, env, run, run / "stdout.txt", deadline, freeze_between_epochs(log_file))
    lines = mace_lines(log_file)
    epochs = sorted(e for e in lines if e >= 0)
    if not epochs:
        raise SystemExit(f"mace-torch finished no epoch in {a.seconds} s ({a.clock} clock); raise "
                         f"--seconds or lower --structures ({log_file})")
    saved = sorted(int(p.stem.rsplit("-", 1)[1]) for p in (run / "checkpoints").glob("*_epoch-*.pt"))
    if not saved:
        raise SystemExit(f"mace-torch left no checkpoint in {run / 'checkpoints'}")
    export = run / "export"
    cmd = mace_command(peer, work, run, a, seed, saved[-1]) + [
        "--restart_latest", "--log_dir", str(export), "--results_dir", str(export),
        "--model_dir", str(export)]
    model = export / "bench.model"
    # the model file is whole once "Compiling model" is logged; its error tables are not needed
    run_until(cmd, env, run, export.with_suffix(".txt"),
              lambda _: time.time() if "Compiling model" in _read(export / f"bench_run-{seed}.log")
              else None, lambda p: p.kill(), may_finish=True)
    if not model.is_file():
        raise SystemExit(f"mace-torch's restart wrote no {model}; see {export}.txt")
    start = lines[-1]
    return r | {"startup_s": start - r["launch"], "train_s": lines[epochs[-1]] - start,
                "epochs": epochs[-1] + 1, "steps": (epochs[-1] + 1) * steps_per_epoch,
                "checkpoint_epoch": saved[-1], "model": str(model), "run": str(run)}


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class _Steps:
    """Our ``metrics.jsonl`` (a line per step) read as it grows, new bytes only: the unix
    time the training loop started and the longest step so far."""

    def __init__(self, path: Path):
        self.path, self.offset, self.start, self.last, self.longest = path, 0, None, 0.0, 0.0

    def update(self) -> "_Steps":
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return self
        whole = chunk[:chunk.rfind(b"\n") + 1]  # a line being written waits for the next call
        self.offset += len(whole)
        for ln in whole.decode().splitlines():
            row = json.loads(ln)
            if self.start is None:
                self.start = row["time"] - row["elapsed_s"]
            self.longest = max(self.longest, row["elapsed_s"] - self.last)
            self.last = row["elapsed_s"]
        return self


def train_ours(work: Path, a, seed: int, max_atoms: int, neighbours: float, target: float) -> dict:
    """Ours until ``target`` seconds (``a.clock``), stopped by SIGTERM (a checkpoint of the
    step, exit 75); training time (``elapsed_s`` of its last metrics line), start-up, steps.

    The trainer reads the signal near the end of a step, so the step under way when it
    arrives may be followed by one more: it is sent the longest step so far plus one poll
    interval before ``target``, and our training ends before mace-torch's did."""
    run = work / "runs" / f"ours-{seed}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    config = ours_config(work / f"ours-{seed}.yaml", work / "shards", a, seed, max_atoms, neighbours)
    metrics, steps = run / "metrics.jsonl", _Steps(run / "metrics.jsonl")

    def deadline(launch: float) -> float | None:
        if steps.update().start is None:
            return None
        origin = steps.start if a.clock == "train" else launch
        return origin + target - steps.longest - POLL_S

    cmd = [sys.executable, "-m", "launch.cli", "train", str(config), f"out={run}"]
    r = run_until(cmd, threads_env(a.threads), REPO, run / "stdout.txt", deadline,
                  lambda p: p.send_signal(signal.SIGTERM))
    if r["rc"] != 75 or not (run / "PREEMPTED").is_file():
        raise SystemExit(f"ours did not stop with a checkpoint (exit {r['rc']}); see {run}/stdout.txt")
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    t0 = rows[0]["time"] - rows[0]["elapsed_s"]
    return r | {"startup_s": t0 - r["launch"], "train_s": rows[-1]["elapsed_s"],
                "steps": rows[-1]["step"], "max_atoms": max_atoms, "run": str(run)}


def test_errors(pred: dict, frames: list) -> dict:
    """Force MAE (meV/A, all components) and energy MAE (meV/atom) of ``pred`` on ``frames``."""
    e = [abs(p - f.info["REF_energy"]) / len(f) for p, f in zip(pred["energy"], frames)]
    df = np.concatenate([np.abs(np.asarray(p) - f.arrays["REF_forces"].ravel())
                         for p, f in zip(pred["forces"], frames)])
    return {"forces_mae_mev_a": 1e3 * float(df.mean()), "energy_mae_mev_atom": 1e3 * float(np.mean(e)),
            "parameters": pred["parameters"]}


def evaluate(key: str, r: dict, work: Path, peer: dict, threads: int, frames: list) -> dict:
    """Test-set errors of run ``r`` (a fresh process: the peer's venv for mace-torch)."""
    args = {"test": str(work / "test.extxyz"), "threads": threads}
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if key == "mace-torch":
        pred = run_child(MACE_EVAL, args | {"model": r["model"]}, REPO, "mace-torch evaluation",
                         python=peer["python"], env=env)
    else:
        pred = run_child(OURS_EVAL, args | {"run": r["run"], "fidelity": "EMT"}, REPO,
                         "our evaluation", env=env)
    return test_errors(pred, frames)


def describe(key: str):
    """The progress line of a run of ``key``."""
    def text(r: dict) -> str:
        return (f"{key:10s} {r['train_s']:6.1f} s training, {r['steps']} steps, start-up "
                f"{r['startup_s']:.1f} s")
    return text


def report(res: dict, a) -> None:
    """The table and the ratios on stdout (markdown)."""
    s, d = res["summary"], res["dataset"]
    f = lambda x: f"{x['median']:.1f} ({x['min']:.1f} - {x['max']:.1f})"  # noqa: E731
    print(f"\nData: {d['structures']} training, {VALID} validation, {d['test']} test EMT fcc alloy "
          f"structures; budget {a.seconds:g} s ({a.clock} clock); {a.threads} thread(s), float32; "
          f"median (min - max) of {a.repeats}; code {res['code']['commit']}"
          f"{' + uncommitted changes' if res['code']['uncommitted'] else ''}.\n")
    print("| trainer | parameters | training s | whole process s | steps | force MAE meV/A | "
          "energy MAE meV/atom |\n|---|---:|---:|---:|---:|---:|---:|")
    for key in ("ours", "mace-torch"):
        x = s[key]
        name = "ours" if key == "ours" else f"mace-torch {res['peer']['versions']['mace-torch']}"
        print(f"| {name} | {x['parameters']:,} | {f(x['train_s'])} | {f(x['whole_s'])} | "
              f"{x['steps']['median']:.0f} | {f(x['forces_mae_mev_a'])} | {f(x['energy_mae_mev_atom'])} |")
    rf, re_ = res["ratio_forces"], res["ratio_energy"]
    print(f"\nours / mace-torch, force MAE: {rf['median']:.2f}x (per seed: "
          f"{', '.join(f'{v:.2f}' for v in rf['runs'])}); target <= 0.5x: "
          f"{'met' if rf['median'] <= 0.5 else 'NOT met'}")
    print(f"ours / mace-torch, energy MAE: {re_['median']:.2f}x (per seed: "
          f"{', '.join(f'{v:.2f}' for v in re_['runs'])})")
    print(f"runs kept although other processes used > 10% of a core: "
          f"{', '.join(res['skewed_runs']) or 'none'}; skewed attempts discarded: "
          f"{len(res['discarded_skewed_attempts'])}")


def measure(a, work: Path, peer: dict, data: dict) -> Runs:
    """Every repeat: mace-torch for the budget, then ours for mace-torch's time; both evaluated."""
    spe = a.structures // a.batch_size
    frames = _frames(work / "test.extxyz")
    runs = Runs(("mace-torch", "ours"), a.repeats, a.tries)
    for rep in range(a.repeats):
        seed = SEED + rep
        max_atoms = Plan(work / "shards", seed, CUTOFF).match_budget(spe)
        m = runs.measure("mace-torch", rep, describe("mace-torch"), lambda s=seed: quiet_then(
            lambda: train_mace(peer, work, a, s, spe), a.wait_quiet))
        target = m["train_s"] + (m["startup_s"] if a.clock == "process" else 0.0)
        o = runs.measure("ours", rep, describe("ours"), lambda s=seed: quiet_then(
            lambda: train_ours(work, a, s, max_atoms, data["neighbours_per_atom"], target), a.wait_quiet))
        for key, r in (("mace-torch", m), ("ours", o)):
            r.update(evaluate(key, r, work, peer, a.threads, frames), whole_s=r["startup_s"] + r["train_s"])
            log(f"  {key}: force MAE {r['forces_mae_mev_a']:.1f} meV/A, energy MAE "
                f"{r['energy_mae_mev_atom']:.2f} meV/atom")
    return runs


def _frames(path: Path) -> list:
    import ase.io  # noqa: PLC0415

    return ase.io.read(path, index=":")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=300, help="wall-clock budget per trainer")
    p.add_argument("--clock", choices=("train", "process"), default="train",
                   help="budget of training time only, or from each process's launch")
    p.add_argument("--repeats", type=int, default=3, help="seeds (fresh processes each)")
    p.add_argument("--structures", type=int, default=192, help="training structures")
    p.add_argument("--test", type=int, default=64, help="held-out test structures")
    p.add_argument("--batch-size", type=int, default=8, help="structures per mace-torch step")
    p.add_argument("--lr", type=float, default=0.01, help="constant learning rate, both sides")
    p.add_argument("--energy-weight", type=float, default=1.0, help="MSE weight of energy per atom")
    p.add_argument("--forces-weight", type=float, default=100.0, help="MSE weight of forces")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay on both sides (0: off)")
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of every process")
    p.add_argument("--mace-amsgrad", action="store_true",
                   help="run the stock mace_run_train (AMSGrad on its side only)")
    p.add_argument("--tries", type=int, default=2, help="attempts per run under other load")
    p.add_argument("--wait-quiet", type=float, default=300, help="before each run, wait up to "
                   "this many seconds for other processes to go quiet (0: never wait)")
    p.add_argument("--work", default=None, help="default benchmarks/_work/accuracy[-quick]")
    p.add_argument("--mace-venv", default=str(REPO / "benchmarks/_work/models/mace-venv"))
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, 20 s per side")
    a = p.parse_args(argv)
    if a.quick:
        a.seconds, a.repeats, a.structures, a.test, a.batch_size = 20, 1, 32, 16, 4
        a.tries, a.wait_quiet = 1, 0
    if a.structures % a.batch_size:
        raise SystemExit(f"--structures {a.structures} must be a multiple of --batch-size "
                         f"{a.batch_size} (mace-torch drops a last partial batch)")
    work = Path(a.work or REPO / "benchmarks" / "_work" / ("accuracy-quick" if a.quick else "accuracy"))
    work = work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start, code = time.perf_counter(), code_state(REPO)
    peer = peer_env(Path(a.mace_venv).resolve(), MACE_SPEC, ("mace-torch", "e3nn", "torch"), REPO)
    data = prepare(work, a.structures, a.test)
    runs = measure(a, work, peer, data)
    kept = runs.runs
    summary = {k: {f: summarise([r[f] for r in v]) for f in
                   ("train_s", "startup_s", "whole_s", "steps", "forces_mae_mev_a", "energy_mae_mev_atom")}
               | {"parameters": v[0]["parameters"]} for k, v in kept.items()}
    ratio = lambda f: summarise([o[f] / m[f] for o, m in zip(kept["ours"], kept["mace-torch"])])  # noqa: E731
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "machine": machine(("torch", "deepspeed", "e3nn", "ase")), "code": code, "peer": peer,
           "params": vars(a) | {"cutoff": CUTOFF, "valid": VALID, "model": MODEL,
                                "mace_model": MACE_MODEL, "test_seed": TEST_SEED},
           "dataset": data, "summary": summary, "ratio_forces": ratio("forces_mae_mev_a"),
           "ratio_energy": ratio("energy_mae_mev_atom"), "skewed_runs": runs.skewed(),
           "discarded_skewed_attempts": runs.discarded, "runs": kept}
    report(res, a)
    if code_state(REPO) != code:
        print("WARNING: the checkout changed during the run: runs may have measured different code")
    res["total_seconds"] = time.perf_counter() - t_start
    out = work / "accuracy-quick.json" if a.quick else REPO / "benchmarks" / "results" / "accuracy.json"
    out.write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(f"\nresults: {out}  (total {res['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
