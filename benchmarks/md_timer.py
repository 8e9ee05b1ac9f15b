"""Timing inside ``bench_md.py``'s child processes (ours and the peers'): ASE MD and batched
``predict``. A child builds its ASE calculator and a ``predict(list_of_atoms)`` function,
then calls :func:`run`, which prints one ``RESULT {json}`` line for
:func:`benchmarks.harness.run_child`. Needs only ase, numpy and the standard library (the
peers' venvs import it too).

MD: ``ase.md.VelocityVerlet`` (NVE, 1 fs) from Maxwell-Boltzmann velocities at 300 K (seeded),
``a["warmup"]`` steps not timed, then ``a["steps"]`` timed ones; one force call per step.
``predict``: a warm-up call on the first 16 structures, then all of them timed.
"""

from __future__ import annotations

import json
import time

import numpy as np

from benchmarks.harness import cpu_snapshot, other_cpu


def _timed(fn) -> dict:
    """``fn()``'s wall and process CPU seconds, and the CPU other processes used meanwhile."""
    before, c0, t0 = cpu_snapshot(), time.process_time(), time.perf_counter()
    value = fn()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "other_cpu_s": other_cpu(before, cpu_snapshot()),
            "value": value}


def md(calc, path: str, warmup: int, steps: int) -> dict:
    """Steps/s of NVE MD on the structure in ``path``."""
    import ase.io  # noqa: PLC0415
    from ase import units  # noqa: PLC0415
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution  # noqa: PLC0415
    from ase.md.verlet import VelocityVerlet  # noqa: PLC0415

    atoms = ase.io.read(path)
    atoms.calc = calc
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    start = atoms.positions.copy()
    dyn = VelocityVerlet(atoms, timestep=1.0 * units.fs)
    dyn.run(warmup)
    r = _timed(lambda: dyn.run(steps))
    r.pop("value")
    disp = np.linalg.norm(atoms.positions - start, axis=1).max()
    return r | {"atoms": len(atoms), "steps": steps, "steps_per_s": steps / r["seconds"],
                "cpu_s_per_step": r["cpu_s"] / steps, "max_displacement_A": float(disp),
                "energy_eV": float(atoms.get_potential_energy())}


def predict(fn, path: str) -> dict:
    """Structures/s of ``fn(list_of_atoms)`` (one result per structure) on ``path``'s frames."""
    import ase.io  # noqa: PLC0415

    frames = ase.io.read(path, index=":")
    fn(frames[:16])
    r = _timed(lambda: fn(frames))
    n = len(r.pop("value"))
    if n != len(frames):
        raise RuntimeError(f"predict returned {n} results for {len(frames)} structures")
    atoms = sum(len(f) for f in frames)
    return r | {"structures": n, "atoms": atoms, "structures_per_s": n / r["seconds"],
                "atoms_per_s": atoms / r["seconds"]}


def run(a: dict, calc, predict_fn, params: int, path_note: str) -> None:
    """The child's measurements on ``a["md"]`` (paths) and ``a["predict"]``; prints RESULT."""
    out = {"params": params, "predict_path": path_note, "md": {}}
    for name, path in a["md"].items():
        out["md"][name] = md(calc, path, a["warmup"], a["steps"][name])
    if a.get("predict"):
        out["predict"] = predict(predict_fn, a["predict"])
    parts = list(out["md"].values()) + ([out["predict"]] if "predict" in out else [])
    out["seconds"] = sum(p["seconds"] for p in parts)
    others = [p["other_cpu_s"] for p in parts]
    out["other_cpu_s"] = None if None in others else round(sum(others), 2)
    print("RESULT " + json.dumps(out), flush=True)
