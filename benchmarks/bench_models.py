"""Model benchmark: training steps (forward + force loss + backward) vs mace-torch's MACE.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_models [--repeats 3] [--steps 3] [--structures 2]
        [--work benchmarks/_work/models] [--profile]

All in the same run, on the same structures, float32, 2 torch threads, CPU:

1. Peer environment (once, kept in ``<work>/mace-venv``): a separate virtual environment
   (mace-torch pins e3nn 0.4.4, ours uses 0.6) with ``pip install mace-torch`` and torch
   held to the CPU build by ``PIP_CONSTRAINT=constraints/cpu.txt``. Install time and the
   versions of mace-torch, e3nn and torch are recorded.
2. Data: ``--structures`` rattled (0.05 A) fcc Cu/Ni/Pd alloy supercells of 32 and 48
   atoms (dense metal: ~78 neighbours per atom at 6 A), random energy and force labels,
   written to ``<work>/structures.extxyz``; both sides read that file. The default 2 (80
   atoms) keeps a 3-repeat run near 25 minutes: a mace-s step takes ~0.25 s and ~0.1 GB
   per atom here (8 GB at 80 atoms), so 8 structures would need ~40 GB and over an hour.
3. Ours: ``esen-xs``, ``esen-s``, ``mace-xs``, ``mace-s`` (``configs/model``), one batch
   of all structures (``atoms_batch`` + ``to_torch``), ``model.train()``, AdamW. A step:
   ``model(batch, forces=True, create_graph=True)``, loss = MSE(energy per atom) +
   MSE(forces), ``backward``, ``opt.step``, ``zero_grad``. 2 warm-up steps, then
   ``--steps`` timed ones. atoms/s = atoms per step * steps / seconds.
4. Peer: mace-torch's ``ScaleShiftMACE`` built as its ``mace_run_train`` builds it
   (``RealAgnosticResidualInteractionBlock``, first layer ``RealAgnosticInteractionBlock``,
   silu gate) with our MACE's hyperparameters: r_max 6, 8 Bessel functions, polynomial
   cutoff p = 6, max_ell = lmax, correlation, num_interactions = layers, hidden irreps
   ``C x 0e + C x 1o (+ C x 2e)``, MLP_irreps 16x0e, radial_MLP [64, 64, 64]. Its batch
   comes from mace's own data path (``config_from_atoms``, ``AtomicData.from_config``,
   its torch_geometric ``DataLoader``), built before timing. Same step with
   ``model(batch, training=True, compute_force=True)``. Where its parameter count is more
   than 15% off ours, a mace-torch model with fewer/more channels and a count close to
   ours ("equal size") is timed as well.
5. Every model runs in a fresh subprocess; ``--repeats`` interleaved repetitions, median
   and min-max. CPU used meanwhile by other processes is read from /proc
   (``benchmarks.harness``); a skewed run is retried (``--tries``) and flagged if kept.
   Table on stdout, raw timings, machine and versions in ``<work>/results.json``.

``--profile`` adds, for our mace-xs and mace-torch at matching hyperparameters, a split of
one step into phases and torch.profiler's top operators and module forwards.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from benchmarks.harness import (
    REPO, WORK, Runs, child_script, header, load_note, log, markdown, parser, peer_env, run_child,
    write_result)

SEED, CUTOFF, THREADS = 20261123, 6.0, 2
OURS = ("esen-xs", "esen-s", "mace-xs", "mace-s")
SIZE_TOLERANCE = 0.15  # parameter counts further apart than this also get an equal-size peer

# The children: our model, and mace-torch's in the peer's venv (scripts run with -c)
CHILD_OURS = child_script("models_child_ours")
CHILD_MACE = child_script("models_child_mace")


def launch(job: tuple, key: str, peer: dict, **extra) -> dict:
    """Run one job ``(who, code, args)``: ours with this interpreter, the peer with its venv's."""
    who, code, args = job
    if who == "ours":
        return run_child(code, args | extra, REPO, key)
    return run_child(code, args | extra, REPO, key, python=peer["python"])


def write_structures(path: Path, count: int) -> dict:
    """``count`` rattled fcc Cu/Ni/Pd supercells (32, 48 atoms) with random labels, as extxyz."""
    import ase.io  # noqa: PLC0415
    from ase.build import bulk  # noqa: PLC0415

    rng = np.random.default_rng(SEED)
    frames = []
    for k in range(count):
        a = float(rng.uniform(3.55, 3.70))
        atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 2, 2 + k % 2))
        atoms.symbols = rng.choice(["Cu", "Ni", "Pd"], size=len(atoms), p=[0.5, 0.35, 0.15])
        atoms.rattle(stdev=0.05, seed=int(rng.integers(1 << 31)))
        atoms.info["REF_energy"] = float(-4.0 * len(atoms) + rng.normal(0, 0.5))
        atoms.arrays["REF_forces"] = rng.normal(0, 0.3, (len(atoms), 3))
        frames.append(atoms)
    ase.io.write(path, frames, format="extxyz")
    n = [len(a) for a in frames]
    return {"path": str(path), "structures": len(frames), "atoms": sum(n),
            "atoms_min_max": [min(n), max(n)], "elements": ["Cu", "Ni", "Pd"]}


def _size(key: str) -> str:
    """``xs`` of ``mace-xs``, ``esen-xs``, ``mace-torch-xs`` and ``mace-torch-xs-eq``."""
    return key.split("-")[2 if key.startswith("mace-torch") else 1]


def table(rates: dict, params: dict, names: dict) -> str:
    order = lambda k: (_size(k) != "xs", k.startswith("mace-torch"), k)  # noqa: E731
    f = lambda v: f"{v:,.1f}" if v < 100 else f"{v:,.0f}"  # noqa: E731
    rows = []
    for key in sorted((k for k in names if k in rates), key=order):
        name, s, size = names[key], rates[key], _size(key)
        ref, eq = rates.get(f"mace-torch-{size}"), rates.get(f"mace-torch-{size}-eq")
        x = "1.00x (reference)" if key == f"mace-torch-{size}" else (
            f"{s['median'] / ref['median']:.2f}x" if ref else "-")
        y = "-" if key.startswith("mace-torch") or not eq else f"{s['median'] / eq['median']:.2f}x"
        rows.append([name, f"{params[key]:,}", f(s["median"]), f"{f(s['min'])} - {f(s['max'])}", x, y])
    return markdown(["model", "parameters", "atoms/s (median)", "min - max",
                     "vs mace-torch, matching hyperparameters", "vs mace-torch, equal size"], rows)


def print_profile(name: str, p: dict) -> None:
    print(f"\n## profile: {name}: step {p['step_s'] * 1e3:.0f} ms = forward with forces "
          f"{p['forward_with_forces_s'] * 1e3:.0f} ms (energy-only forward "
          f"{p['energy_forward_s'] * 1e3:.0f} ms) + loss backward {p['loss_backward_s'] * 1e3:.0f}"
          f" ms + optimizer/rest {p['optimizer_etc_s'] * 1e3:.0f} ms\n")
    print("| operator (self CPU, per step) | calls | ms | share |\n|---|---:|---:|---:|")
    for k, c, s, f in p["top_ops"]:
        print(f"| `{k}` | {c} | {s * 1e3:.1f} | {f:.1%} |")
    print("\n| backward node (total CPU incl. the ops it runs, per step; nested) | calls | ms |"
          "\n|---|---:|---:|")
    for k, c, t in p["backward_nodes"]:
        print(f"| `{k}` | {c} | {t * 1e3:.1f} |")
    print("\n| module forward (total CPU, per step, incl. children) | ms |\n|---|---:|")
    for k, s in p["module_forward"]:
        print(f"| `{k}` | {s * 1e3:.1f} |")


def peer_args(cfg: dict, base: dict) -> dict:
    """The peer child's args for our MACE config ``cfg`` (its fields as a dict): the same
    hyperparameters, in training mode."""
    keys = ("cutoff", "num_basis", "lmax", "correlation", "layers", "channels", "hidden_lmax",
            "avg_neighbors")
    return base | {k: cfg[k] for k in keys} | {"mode": "train"}


def size_peer(hp: dict, ours: int, python: str, what: str, **kw) -> dict:
    """mace-torch's parameter count at ``hp`` and the channels closest to ``ours`` parameters
    (``equal_size_channels``; ``kw`` for :func:`run_child`: timeout, env)."""
    return run_child(CHILD_MACE, hp | {"mode": "size", "target": ours, "tolerance": SIZE_TOLERANCE},
                     REPO, what, python=python, **kw)


def plan(a, peer: dict, data: dict) -> tuple[dict, dict]:
    """Jobs ``{key: (who, code, args)}``: ours, mace-torch at our MACE's hyperparameters and,
    where its parameter count is > SIZE_TOLERANCE off ours, at an equal size; and the sizing."""
    from common.config import load_config  # noqa: PLC0415
    from models.build import ModelConfig, build_model  # noqa: PLC0415

    base = {"structures": data["path"], "threads": THREADS, "steps": a.steps}
    jobs, sizing = {}, {}
    for name in a.models.split(","):
        path = REPO / "configs" / "model" / f"{name}.yaml"
        jobs[name] = ("ours", CHILD_OURS, base | {"config": str(path)})
        if not name.startswith("mace"):
            continue
        cfg, size = load_config(ModelConfig, path), name.split("-")[1]
        ours = sum(x.numel() for x in build_model(cfg, ["bench"]).parameters())
        hp = peer_args(dataclasses.asdict(cfg), base)
        s = size_peer(hp, ours, peer["python"], f"sizing {size}")
        sizing[size] = {"ours": ours, "channels": cfg.channels} | s
        log(f"mace-torch-{size}: {s['params']:,} parameters at {cfg.channels} channels vs ours "
            f"{ours:,}; tried (channels: parameters) {s['tried']}")
        jobs[f"mace-torch-{size}"] = ("peer", CHILD_MACE, hp)
        if s["equal_size_channels"] != cfg.channels:
            jobs[f"mace-torch-{size}-eq"] = ("peer", CHILD_MACE, hp | {
                "channels": s["equal_size_channels"]})
    return jobs, sizing


def report(res: dict, a, names: dict) -> None:
    d, v, rates = res["dataset"], res["peer"]["versions"], res["rates"]
    print(f"\nData: {d['structures']} fcc Cu/Ni/Pd supercells, {d['atoms']} atoms "
          f"({d['atoms_min_max'][0]}-{d['atoms_min_max'][1]} each), {d['edges_per_atom']:.1f} "
          f"edges per atom at {CUTOFF:g} A (edges: ours {d['edges']}, mace-torch's "
          f"{d['peer_edges']}); one batch, float32, {THREADS} threads, {a.steps} steps after 2 "
          f"warm-up, median of {a.repeats}. mace-torch {v['mace-torch']} (e3nn {v['e3nn']}, "
          f"torch {v['torch']}); ours: e3nn {res['machine']['e3nn']}, torch "
          f"{res['machine']['torch']}, code {res['code']['commit']}"
          f"{' + uncommitted changes' if res['code']['uncommitted'] else ''}.\n")
    print(table(rates, res["parameters"], names))
    for size in res["mace_torch_sizing"]:
        x = rates[f"mace-{size}"]["median"] / rates[f"mace-torch-{size}"]["median"]
        eq = rates.get(f"mace-torch-{size}-eq", rates[f"mace-torch-{size}"])["median"]
        print(f"target: our mace-{size} >= 1.5x mace-torch: {x:.2f}x at matching "
              f"hyperparameters ({'met' if x >= 1.5 else 'NOT met'}), "
              f"{rates[f'mace-{size}']['median'] / eq:.2f}x at equal size")
    print(load_note(res))


def main(argv=None) -> int:
    p = parser(__doc__, repeats=3, tries=3, work=WORK / "models",
               out_help="default <work>/results.json")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per run")
    p.add_argument("--structures", type=int, default=2, help="crystals in the one batch")
    p.add_argument("--mace-spec", default="mace-torch", help="pip requirement for the peer")
    p.add_argument("--profile", action="store_true", help="profile mace-xs and its peer")
    p.add_argument("--models", default=",".join(OURS), help="our named sizes (mace-xs first)")
    a = p.parse_args(argv)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start, head = time.perf_counter(), header(("torch", "e3nn", "ase"))
    peer = peer_env(work / "mace-venv", a.mace_spec, ("mace-torch", "e3nn", "torch"))
    data = write_structures(work / "structures.extxyz", a.structures)
    log(f"data: {data['atoms']} atoms in {data['structures']} structures; sizing mace-torch")
    jobs, sizing = plan(a, peer, data)

    runs = Runs(jobs, a.repeats, a.tries)
    runs.interleaved({key: lambda key=key: launch(jobs[key], key, peer) for key in jobs},
                     lambda key: lambda r: (
                         f"{key:17s} {r['atoms_per_s']:7.1f} atoms/s ({r['steps']} steps, "
                         f"{r['seconds']:.1f} s, loss {r['last_loss']:.3g})"))

    first = runs.runs["mace-xs"][0]
    data |= {"edges": first["edges"], "edges_per_atom": first["edges"] / first["atoms"],
             "peer_edges": runs.runs["mace-torch-xs"][0]["edges"]}
    names = {k: k for k in jobs}
    for size, s in sizing.items():
        names[f"mace-torch-{size}"] = f"mace-torch MACE, {s['channels']} ch (matching {size})"
        names[f"mace-torch-{size}-eq"] = (f"mace-torch MACE, {s['equal_size_channels']} ch "
                                         f"(equal size {size})")
    res = head | {"peer": peer,
                  "params": vars(a) | {"cutoff": CUTOFF, "threads": THREADS, "warmup_steps": 2},
                  "dataset": data, "mace_torch_sizing": sizing,
                  "rates": runs.summary(lambda r: r["atoms_per_s"]),
                  "parameters": {k: v[0]["params"] for k, v in runs.runs.items()}} | runs.record()
    report(res, a, names)
    if a.profile:  # after all timings, so that it cannot disturb them
        for key in ("mace-xs", "mace-torch-xs"):
            res.setdefault("profiles", {})[key] = launch(jobs[key], key, peer, profile=True,
                                                         steps=1)["profile"]
            print_profile(names[key], res["profiles"][key])
    res["total_seconds"] = time.perf_counter() - t_start
    write_result(a.out or work / "results.json", res)
    if not peer["reused"]:
        print(f"(of which {peer['install_s']:.0f} s installing the peer)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
