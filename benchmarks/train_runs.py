"""Pieces of the training benchmark (``bench_train.py``): EMT-labelled data, a process
runner that accounts for the CPU others use meanwhile, and readers of both trainers' logs.

``watch`` runs one training command to its end. Whenever the log it follows gains a
line (a metrics line of ours, an epoch line of mace-torch's), it notes the time and a
/proc snapshot taken while the trainer's processes are alive; the CPU other processes
used over the steady part of the run comes from two of those snapshots. Whole-run load
uses ``os.times()``: the CPU of the exited child tree, which /proc no longer shows.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import cpu_snapshot, other_cpu

# EMT's fcc metals and their lattice constants (A); an alloy takes the mean (Vegard)
METALS = {"Al": 4.05, "Ni": 3.52, "Cu": 3.61, "Pd": 3.89, "Ag": 4.09, "Pt": 3.92, "Au": 4.08}
REPEATS = [(1, 1, 1), (2, 1, 1), (3, 1, 1), (2, 2, 1), (3, 2, 1), (2, 2, 2), (3, 2, 2), (3, 3, 2)]


def emt_structure(rng: np.random.Generator):
    """A strained, rattled fcc alloy of 1-3 EMT metals, 3-72 atoms, with EMT energy,
    forces and stress as ``REF_energy``, ``REF_forces``, ``REF_stress``."""
    from ase.build import bulk  # noqa: PLC0415
    from ase.calculators.emt import EMT  # noqa: PLC0415

    els = list(rng.choice(list(METALS), size=int(rng.integers(1, 4)), replace=False))
    frac = rng.dirichlet(np.ones(len(els)))
    atoms = bulk("Cu", "fcc", a=float(sum(f * METALS[e] for f, e in zip(frac, els))),
                 cubic=True).repeat(REPEATS[rng.integers(len(REPEATS))])
    atoms.symbols = list(rng.choice(els, size=len(atoms), p=frac))
    if rng.random() < 0.3:  # a vacancy
        del atoms[int(rng.integers(len(atoms)))]
    strain = np.eye(3) + rng.normal(0, 0.02, (3, 3))
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.rattle(stdev=float(rng.uniform(0.03, 0.12)), seed=int(rng.integers(1 << 31)))
    atoms.calc = EMT()
    energy, forces, stress = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    atoms.calc = None
    atoms.info["REF_energy"], atoms.info["REF_stress"] = float(energy), stress
    atoms.arrays["REF_forces"] = forces
    return atoms


def write_emt(path: Path, count: int, seed: int) -> list[int]:
    """``count`` EMT-labelled structures as extended XYZ; returns their atom counts."""
    import ase.io  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    frames = [emt_structure(rng) for _ in range(count)]
    ase.io.write(path, frames, format="extxyz")
    return [len(a) for a in frames]


def free_port() -> int:
    """A free local TCP port for torchrun's rendezvous."""
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_quiet(limit_s: float, window: float = 3.0, share: float = 0.1) -> float:
    """Wait (at most ``limit_s``) until other processes use under ``share`` of a core over
    ``window`` seconds; returns the seconds waited. Saves attempts the harness would discard."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        before = cpu_snapshot()
        time.sleep(window)
        other = other_cpu(before, cpu_snapshot())
        if other is None or other < share * window:
            break
    return time.perf_counter() - t0


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _lines(path: Path, pattern: re.Pattern | None) -> int:
    try:
        text = path.read_text()
    except OSError:
        return 0
    return sum(1 for ln in text.splitlines()
               if ln.strip() and (pattern is None or pattern.search(ln)))


def watch(cmds: list[list[str]], env: dict, cwd: Path, log: Path, pattern: str | None,
          stdout: Path, poll: float = 0.25) -> dict:
    """Run ``cmds`` side by side and wait for all; follow the lines of ``log`` that
    match ``pattern`` (None: every line). Exits on a non-zero status, naming ``stdout``.

    Returns ``seconds`` (wall, start to the last exit), ``marks`` (seconds after start
    at which each followed line was seen, polled every ``poll`` s), ``run_other_cpu_s``
    (CPU used by other processes over the whole run) and ``snaps`` (mark index ->
    /proc snapshot, for marks seen while every command was still running).
    """
    rx = re.compile(pattern) if pattern else None
    before, c0 = cpu_snapshot(), _children_cpu()
    t0 = time.perf_counter()
    outs = [open(stdout.with_suffix(f".{k}.txt") if k else stdout, "w") for k in range(len(cmds))]
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=o, stderr=subprocess.STDOUT)
             for c, o in zip(cmds, outs)]
    marks, snaps = [], {}
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(poll)
            n = _lines(log, rx)
            if n > len(marks):
                now, alive = time.perf_counter() - t0, all(p.poll() is None for p in procs)
                snap = cpu_snapshot() if alive else None
                for _ in range(n - len(marks)):
                    if snap is not None:
                        snaps[len(marks)] = snap
                    marks.append(now)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for o in outs:
            o.close()
    seconds = time.perf_counter() - t0
    bad = [(k, p.returncode) for k, p in enumerate(procs) if p.returncode != 0]
    if bad:
        raise SystemExit(f"training command {bad[0][0]} failed (exit {bad[0][1]}); see {stdout} "
                         f"and its siblings:\n{stdout.read_text()[-3000:]}")
    marks += [seconds] * (_lines(log, rx) - len(marks))  # lines written just before exit
    # others = machine busy time - our children (all exited and reaped) - this process
    whole = other_cpu(before, cpu_snapshot())  # already net of this process
    whole = None if whole is None else round(max(0.0, whole - (_children_cpu() - c0)), 2)
    return {"seconds": seconds, "marks": marks, "run_other_cpu_s": whole, "snaps": snaps}


def steady_load(w: dict, first: int, last: int) -> tuple[float, float | None]:
    """(seconds, other CPU s) between marks ``first`` and ``last`` (or the latest mark
    before it seen while the trainer ran); the whole run's if no such pair exists."""
    alive = [k for k in w["snaps"] if first <= k <= last]
    if first in w["snaps"] and len(alive) > 1:
        k = max(alive)
        return w["marks"][k] - w["marks"][first], other_cpu(w["snaps"][first], w["snaps"][k])
    return w["seconds"], w["run_other_cpu_s"]


def read_ours(metrics: Path, skip: int) -> dict:
    """Steady rate from our ``metrics.jsonl``: windows after the first ``skip`` lines.

    A line's atoms are the growth of ``data/atoms_seen/*`` (all ranks) and its seconds
    ``atoms / train/atoms_per_s`` (the mean per-rank step time of the window)."""
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    seen = [sum(v for k, v in r.items() if k.startswith("data/atoms_seen/")) for r in rows]
    atoms = np.diff([0.0] + seen)
    secs = atoms / np.array([r["train/atoms_per_s"] for r in rows])
    wait = np.array([r["train/data_wait_fraction"] for r in rows])
    if len(rows) <= skip:
        raise SystemExit(f"{metrics}: {len(rows)} log lines, need more than {skip} (warm-up)")
    a, s, w = atoms[skip:], secs[skip:], wait[skip:]
    return {"atoms_per_s": a.sum() / s.sum(), "compute_atoms_per_s": a.sum() / (s * (1 - w)).sum(),
            "steady_atoms": float(a.sum()), "steady_s": float(s.sum()),
            "data_wait_fraction": float((s * w).sum() / s.sum()), "lines": len(rows),
            "window_atoms_per_s": [r["train/atoms_per_s"] for r in rows],
            "last_loss": rows[-1]["train/loss"], "steps": rows[-1]["step"]}


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) INFO: (Initial|Epoch (\d+)):")


def read_mace(run: Path, atoms_per_epoch: int, steps_per_epoch: int, skip: int) -> dict:
    """Steady rate from mace-torch's log and results: epoch ``e`` takes from its previous
    validation line to its own, minus its validation time (``mode: eval`` records)."""
    stamps = {}
    for ln in next((run / "logs").glob("*_run-*[0-9].log")).read_text().splitlines():
        m = _STAMP.match(ln)
        if m:
            t = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
            stamps[-1 if m.group(3) is None else int(m.group(3))] = t
    results = next((run / "results").glob("*_train.txt"))
    recs = [json.loads(ln) for ln in results.read_text().splitlines()]
    evals = {r["epoch"]: r["time"] for r in recs if r["mode"] == "eval" and r["epoch"] is not None}
    steps = {}
    for r in recs:
        if r["mode"] == "opt":
            steps.setdefault(r["epoch"], []).append(r["time"])
    epochs = sorted(e for e in stamps if e >= 0)
    train_s = [stamps[e] - stamps[e - 1] - evals[e] for e in epochs]
    wrong = {e: len(v) for e, v in steps.items() if len(v) != steps_per_epoch}
    if wrong:
        raise SystemExit(f"{run}: expected {steps_per_epoch} steps per epoch, got {wrong}")
    if len(epochs) <= skip:
        raise SystemExit(f"{run}: {len(epochs)} epochs logged, need more than {skip}")
    steady = train_s[skip:]
    return {"atoms_per_s": atoms_per_epoch * len(steady) / sum(steady),
            "compute_atoms_per_s": atoms_per_epoch * len(steady) / sum(
                sum(steps[e]) for e in epochs[skip:]),
            "epoch_train_s": train_s, "eval_s": [evals[e] for e in epochs],
            "steady_s": sum(steady), "last_loss": recs[-1]["loss"]}
