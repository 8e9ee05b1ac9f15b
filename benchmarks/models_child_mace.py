"""bench_models.py child, run by the peer venv's interpreter: mace-torch's ScaleShiftMACE built as
``mace_run_train`` builds it, timed by benchmarks.step_timer (argv[1]: JSON args).

Optional args (gpu_check.py): ``device`` (default cpu), ``precision`` fp32 or bf16 (the
model and the batch's floats cast to bfloat16: mace-torch has no mixed mode), ``cueq``
(its cuEquivariance backend, configured as ``mace_run_train --only_cueq`` does).
benchmarks.* import from the repository root, the working directory (harness.run_child)."""

import json, sys
a = json.loads(sys.argv[1])
import torch
import ase.io
from benchmarks.mace_build import build as build_mace, equal_size  # imports mace first
from mace import data, tools
from mace.tools import torch_geometric
from benchmarks.step_timer import run
torch.set_default_dtype(torch.float32)
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
frames = ase.io.read(a["structures"], index=":")
zs = sorted({int(z) for at in frames for z in at.numbers})
build = lambda c, hidden_lmax, layers: build_mace(a, zs, c, hidden_lmax, layers)  # noqa: E731

if a["mode"] == "size":  # parameter count at matching channels, and channels for equal size
    print("RESULT " + json.dumps(equal_size(a, zs)))
    raise SystemExit

keyspec = data.KeySpecification(info_keys={"energy": "REF_energy"},
                                arrays_keys={"forces": "REF_forces"})
dataset = [data.AtomicData.from_config(data.config_from_atoms(at, key_specification=keyspec),
                                       z_table=tools.AtomicNumberTable(zs), cutoff=a["cutoff"])
           for at in frames]
loader = torch_geometric.dataloader.DataLoader(dataset, batch_size=len(dataset), shuffle=False)
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.get("precision", "fp32")]
batch = {k: v.to(a.get("device", "cpu"), dtype if v.is_floating_point() else None)
         for k, v in next(iter(loader)).to_dict().items()}
model = build(a["channels"], a["hidden_lmax"], a["layers"]).to(a.get("device", "cpu"), dtype).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
n = (batch["ptr"][1:] - batch["ptr"][:-1]).to(dtype)

def call(loss=False):
    out = model(batch, training=True, compute_force=True)
    if not loss:
        return out
    e = ((out["energy"] - batch["energy"]) / n).pow(2).mean()
    return e + (out["forces"] - batch["forces"]).pow(2).mean()

run(a, model, call, opt, len(batch["positions"]), batch["edge_index"].shape[1],
    lambda: model(batch, training=True, compute_force=False))
