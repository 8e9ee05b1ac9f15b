"""Training memory when graph sizes vary (issue 28, item 2): per-step peak memory of training
steps on batches that mix molecules with bulk, packed by the sampler's atom and edge budget.

Data (seeded, in memory): ``--structures`` structures, half free molecules of 2-30 atoms (ASE's
g2 set, rattled), half periodic fcc alloy cells of 4-216 atoms (``tests/synthetic``), random
labels (memory does not depend on them). The project's ``AtomBudgetSampler`` packs one
epoch with ``max_atoms`` and ``max_edges`` (edges counted at the model's cutoff). Each batch
runs one training step of the ``benchmarks/md_model.yaml`` model: forward, forces with
``create_graph``, energy + force loss, backward, AdamW (float32, CPU, 2 threads).

Per step: atoms, edges, the padded slots the torch path would allocate (atoms x the batch's
largest neighbour count), and the process's peak resident memory during the step
(``VmHWM``, reset to the current RSS before the step through ``/proc/self/clear_refs``;
Linux): model, optimizer state, batch and the step's tensors, what an out-of-memory
error would see. The first step (allocations kept for good) is left out of the statistics. Each ``--kernels`` setting runs in a fresh
process: ``auto`` (the fused CPU kernels, compact edge layout) and ``torch`` (padded slots).
The table gives percentiles over steps; "flat" means the 99.9th percentile of step memory
is close to the median.

    .venv/bin/python -m benchmarks.bench_train_memory [--structures 400] [--max-atoms 256]
        [--max-edges 12000] [--kernels auto,torch]
"""

from __future__ import annotations

from benchmarks.harness import REPO, RESULTS, header, log, markdown, parser, run_child, write_result

CHILD = r"""
import json, sys
import numpy as np
import torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
from ase.build import molecule
from ase.collections import g2
from ase.calculators.singlepoint import SinglePointCalculator
from common.config import load_config
from data_pipeline import keys as K
from data_pipeline.batch import atoms_batch, to_torch
from data_pipeline.graph import neighbor_list
from data_pipeline.stream.sampler import AtomBudgetSampler, SamplerConfig
from models.build import ModelConfig, build_model
from tests.synthetic import random_crystal

cfg = load_config(ModelConfig, a["model"], [f"kernels={a['kernels']}"])
rng = np.random.default_rng(0)
names = sorted(n for n in g2.names if 2 <= len(molecule(n)) <= 30)
frames = []
for k in range(a["structures"]):
    if k % 2:
        atoms = molecule(str(rng.choice(names)))
        atoms.rattle(0.05, seed=k)
    else:
        atoms = random_crystal(rng, max_atoms=216)
    atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()), forces=rng.normal(0, 0.1, (len(atoms), 3)))
    frames.append(atoms)
n_atoms = np.array([len(f) for f in frames])
n_edges = np.array([len(neighbor_list(f.positions, f.cell.array, f.pbc, cfg.cutoff)[0]) for f in frames])
elements = sorted({z for f in frames for z in f.numbers})
sampler = AtomBudgetSampler(n_atoms, np.zeros(len(frames), np.int64), [("mix", "bench")],
                            SamplerConfig(max_atoms=a["max_atoms"], max_edges=a["max_edges"], seed=0),
                            n_edges=n_edges)
model = build_model(cfg, ["bench"]).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

rows = []
for step, idx in enumerate(sampler):
    if step >= a["steps"]:
        break
    batch = to_torch(atoms_batch([frames[i] for i in idx], cfg.cutoff, 0, "float32"))
    i = batch[K.EDGE_INDEX][0]
    width = int(torch.bincount(i, minlength=len(batch[K.NUMBERS])).max()) if len(i) else 1
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS to the current RSS
    before = hwm()
    out = model(batch, forces=True, create_graph=True)
    loss = ((out["energy"] - batch[K.ENERGY]) ** 2).mean().float() + ((out["forces"] - batch[K.FORCES]) ** 2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    rows.append({"atoms": int(len(batch[K.NUMBERS])), "edges": int(len(i)), "slots": int(len(batch[K.NUMBERS]) * width),
                 "peak_bytes": hwm(), "step_bytes": hwm() - before})
print("RESULT " + json.dumps({"rows": rows, "records": len(frames), "seconds": 0.0, "other_cpu_s": None,
                              "record_atoms_max": int(n_atoms.max()), "record_edges_max": int(n_edges.max())}))
"""


def percentiles(values, qs=(50, 99, 99.9, 100)) -> dict:
    import numpy as np  # noqa: PLC0415

    return {f"p{q:g}": float(np.percentile(values, q)) for q in qs}


def main(argv=None) -> int:
    p = parser(__doc__, out=RESULTS / "train_memory.json")
    p.add_argument("--structures", type=int, default=400)
    p.add_argument("--steps", type=int, default=400, help="at most this many steps (one epoch)")
    p.add_argument("--max-atoms", type=int, default=256)
    p.add_argument("--max-edges", type=int, default=12000)
    p.add_argument("--kernels", default="auto,torch")
    p.add_argument("--model", default=str(REPO / "benchmarks" / "md_model.yaml"))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    res = header() | {"budget": {"max_atoms": a.max_atoms, "max_edges": a.max_edges}, "runs": {}}
    table = []
    for kernels in a.kernels.split(","):
        log(f"kernels {kernels}: one epoch of training steps")
        r = run_child(CHILD, {"kernels": kernels, "model": a.model, "structures": a.structures,
                              "steps": a.steps, "max_atoms": a.max_atoms, "max_edges": a.max_edges,
                              "threads": a.threads}, REPO, f"training steps, kernels {kernels}", timeout=3600)
        rows = r["rows"]
        stats = {k: percentiles([x[k] for x in rows[1:]])  # the first step allocates for good
                 for k in ("atoms", "edges", "slots", "peak_bytes", "step_bytes")}
        res["runs"][kernels] = r | {"stats": stats}
        mib = {k: v / 2**20 for k, v in stats["peak_bytes"].items()}
        table.append([kernels, len(rows), f"{stats['atoms']['p100']:.0f} / {a.max_atoms}",
                      f"{stats['edges']['p99.9']:.0f} / {stats['edges']['p100']:.0f} / {a.max_edges}",
                      f"{stats['slots']['p50']:.0f} / {stats['slots']['p100']:.0f}",
                      f"{mib['p50']:.0f} / {mib['p99']:.0f} / {mib['p99.9']:.0f} / {mib['p100']:.0f}",
                      f"{mib['p99.9'] / mib['p50']:.2f}"])
        log(f"  {table[-1]}")
    head = ["kernels", "steps", "atoms max / budget", "edges p99.9 / max / budget",
            "padded slots p50 / max", "peak memory in a step, MiB p50 / p99 / p99.9 / max", "p99.9 / p50"]
    write_result(a.out, res, markdown(head, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
