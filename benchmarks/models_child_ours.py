"""bench_models.py child: one of our named models, timed by benchmarks.step_timer (argv[1]: JSON args).

Optional args (gpu_check.py): ``device`` (default cpu), ``precision`` fp32 or bf16 (the
engine's bf16: backbone and heads in bfloat16, geometry and the float64 energy sum and
references as in fp32; AdamW on the bf16 weights, without the engine's fp32 master copy),
``kernels`` (overrides the config's ``model.kernels``)."""

import json, sys
import torch
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
import ase.io
from ase.calculators.singlepoint import SinglePointCalculator
from benchmarks.step_timer import run
from data_pipeline import keys as K
from data_pipeline.batch import atoms_batch, to_torch
from common.config import load_config
from models.build import ModelConfig, build_model
cfg = load_config(ModelConfig, a["config"], [f"kernels={a['kernels']}"] if a.get("kernels") else [])
device = a.get("device", "cpu")
frames = ase.io.read(a["structures"], index=":")
for at in frames:
    at.calc = SinglePointCalculator(at, energy=at.info["REF_energy"],
                                    forces=at.arrays["REF_forces"])
batch = {k: v.to(device) for k, v in to_torch(atoms_batch(frames, cfg.cutoff, 0, "float32")).items()}
model = build_model(cfg, ["bench"]).to(device).train()
if a.get("precision", "fp32") == "bf16":
    for part in model.children():  # not the Potential's own float64 references buffer
        part.to(torch.bfloat16)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
n = batch[K.N_ATOMS].double()

def call(loss=False):
    out = model(batch, forces=True, create_graph=True)
    if not loss:
        return out
    e = ((out["energy"] - batch[K.ENERGY]) / n).pow(2).mean().float()
    return e + (out["forces"] - batch[K.FORCES]).pow(2).mean()

run(a, model, call, opt, len(batch[K.NUMBERS]), batch[K.EDGE_INDEX].shape[1],
    lambda: model(batch, forces=False))
