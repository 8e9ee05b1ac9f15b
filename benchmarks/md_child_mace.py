"""bench_md.py child, run by the mace-torch peer venv's interpreter: a ScaleShiftMACE
(benchmarks.mace_build, our model's hyperparameters) through mace's MACECalculator for MD,
and for predict mace's own batched path (as ``mace_eval_configs``: ``AtomicData`` per
structure, its torch_geometric batch of up to ``max_atoms`` atoms, forces and stress),
timed by benchmarks.md_timer. Random weights: speed does not depend on them.
benchmarks.* import from the repository root, the working directory (harness.run_child)."""

import json, sys
a = json.loads(sys.argv[1])
import torch
from benchmarks.mace_build import build, count, equal_size  # imports mace first
from mace import data, tools
from mace.calculators import MACECalculator
from mace.tools import torch_geometric
from benchmarks.md_timer import run
torch.set_default_dtype(torch.float32)
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
zs = a["elements"]
if a.get("mode") == "size":
    print("RESULT " + json.dumps(equal_size(a, zs)))
    raise SystemExit
model = build(a, zs, a["channels"], a["hidden_lmax"], a["layers"]).float().eval()
for p in model.parameters():
    p.requires_grad_(False)
calc = MACECalculator(models=[model], device="cpu", default_dtype="float32")
table = tools.AtomicNumberTable(zs)


def predict(frames):
    out, chunk, size = [], [], 0
    for atoms in frames + [None]:
        if chunk and (atoms is None or size + len(atoms) > a["max_atoms"]):
            graphs = [data.AtomicData.from_config(data.config_from_atoms(x), z_table=table,
                                                  cutoff=a["cutoff"]) for x in chunk]
            batch = torch_geometric.batch.Batch.from_data_list(graphs).to_dict()
            res = model(batch, compute_force=True, compute_stress=True, training=False)
            energy, forces = res["energy"].detach().numpy(), res["forces"].detach().numpy()
            stress, ptr = res["stress"].detach().numpy(), batch["ptr"].numpy()
            out += [{"energy": float(energy[k]), "forces": forces[ptr[k]:ptr[k + 1]],
                     "stress": stress[k]} for k in range(len(chunk))]
            chunk, size = [], 0
        if atoms is not None:
            chunk.append(atoms)
            size += len(atoms)
    return out


run(a, calc, predict, count(model), f"mace batched model call (its eval_configs path), up to "
    f"{a['max_atoms']} atoms per batch")
