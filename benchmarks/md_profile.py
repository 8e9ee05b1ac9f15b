"""Where our calculator's time goes (bench_md.py ``--profile``): one force call on each MD
cell and one ``predict`` batch, split by cProfile into neighbor list, the rest of the
collate (arrays, ``to_torch``), the model's forward (backbone and heads), the autograd
backward for forces and stress, and the rest (ASE, numpy conversions); plus
torch.profiler's top operators (self CPU) on the largest cell."""

from __future__ import annotations

import cProfile
import pstats
import time

# (phase, (file suffix, function name)) whose cumulative time is that phase
PHASES = {"neighbor_list": ("data_pipeline/graph.py", "neighbor_list"),
          "collate": ("pretrain/release/predict.py", "batch"),
          "model_call": ("models/potential.py", "forward"),
          "autograd_backward": ("torch/autograd/__init__.py", "grad")}


def split(fn) -> dict:
    """Wall seconds of ``fn()`` in total and per phase (collate excludes the neighbor list,
    forward excludes the backward)."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(fn)
    total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    cum = {k: sum(v[3] for (f, _, n), v in stats.items() if f.endswith(s) and n == name)
           for k, (s, name) in PHASES.items()}
    out = {"total_s": total, "neighbor_list_s": cum["neighbor_list"],
           "collate_s": cum["collate"] - cum["neighbor_list"],
           "forward_s": cum["model_call"] - cum["autograd_backward"],
           "autograd_backward_s": cum["autograd_backward"]}
    out["rest_s"] = total - cum["collate"] - cum["model_call"]
    return out


def profile(a: dict, calc) -> dict:
    """Phase splits (median of 3 calls each) and the top operators."""
    import ase.io  # noqa: PLC0415
    import torch  # noqa: PLC0415

    res = {}
    for name, path in a["md"].items():
        atoms = ase.io.read(path)
        atoms.calc = calc
        atoms.get_forces()  # warm-up
        runs = []
        for k in range(3):
            atoms.positions[0, 0] += 1e-3  # a new geometry: a real call each time
            runs.append(split(atoms.get_forces))
        res[name] = sorted(runs, key=lambda r: r["total_s"])[1]
    frames = ase.io.read(a["predict"], index=":")
    batch, size = [], 0
    for f in frames:  # one predict batch of max_atoms
        if size + len(f) > a["max_atoms"]:
            break
        batch.append(f)
        size += len(f)
    calc.predict(batch[:8])
    res["predict_batch"] = split(lambda: calc.predict(batch, max_atoms=a["max_atoms"]))
    res["predict_batch"] |= {"structures": len(batch), "atoms": size}
    big = ase.io.read(list(a["md"].values())[-1])
    big.calc = calc
    big.get_forces()
    big.positions[0, 0] += 1e-3
    with torch.profiler.profile() as prof:
        big.get_forces()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    res["top_ops"] = [(e.key, e.count, e.self_cpu_time_total / 1e6, e.self_cpu_time_total / total)
                      for e in ops[:12]]
    return {"profile": res}
