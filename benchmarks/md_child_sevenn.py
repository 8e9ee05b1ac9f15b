"""bench_md.py child, run by the sevenn peer venv's interpreter: SevenNet-0 (the weights in the
sevenn wheel) through its ASE calculator for MD, and for predict its own batched inference
path (as ``sevenn inference``: one graph per structure, a torch_geometric batch of up to
``max_atoms`` atoms, ``set_is_batch_data(True)``), timed by benchmarks.md_timer.
benchmarks.* import from the repository root, the working directory (harness.run_child)."""

import json, sys
a = json.loads(sys.argv[1])
import torch
torch.set_num_threads(a["threads"])
import sevenn._keys as KEY
from sevenn import util
from sevenn.atom_graph_data import AtomGraphData
from sevenn.calculator import SevenNetCalculator
from sevenn.train.dataload import unlabeled_atoms_to_graph
from torch_geometric.data import Batch
from benchmarks.md_timer import run

calc = SevenNetCalculator("7net-0", device="cpu")
model = util.load_checkpoint("7net-0").build_model()  # a second copy, in batch mode
model.set_is_batch_data(True)
model.eval()
params = sum(p.numel() for p in calc.model.parameters())
assert next(calc.model.parameters()).dtype == torch.float32


def predict(frames):
    out, chunk, size = [], [], 0
    for atoms in frames + [None]:
        if chunk and (atoms is None or size + len(atoms) > a["max_atoms"]):
            graphs = [AtomGraphData.from_numpy_dict(unlabeled_atoms_to_graph(x, calc.cutoff))
                      for x in chunk]
            res = model(Batch.from_data_list(graphs))
            energy = res[KEY.PRED_TOTAL_ENERGY].detach().numpy()
            forces = res[KEY.PRED_FORCE].detach().numpy()
            stress = res[KEY.PRED_STRESS].detach().numpy()
            starts = [0]
            for x in chunk:
                starts.append(starts[-1] + len(x))
            out += [{"energy": float(energy[k]), "forces": forces[starts[k]:starts[k + 1]],
                     "stress": stress[k]} for k in range(len(chunk))]
            chunk, size = [], 0
        if atoms is not None:
            chunk.append(atoms)
            size += len(atoms)
    return out


run(a, calc, predict, params, f"sevenn batched model (its inference path), up to "
    f"{a['max_atoms']} atoms per batch")
