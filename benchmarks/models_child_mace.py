"""bench_models.py child, run by the peer venv's interpreter: mace-torch's ScaleShiftMACE built as
``mace_run_train`` builds it, timed by benchmarks.step_timer (argv[1]: JSON args).

Optional args (gpu_check.py): ``device`` (default cpu), ``precision`` fp32 or bf16 (the
model and the batch's floats cast to bfloat16: mace-torch has no mixed mode), ``cueq``
(its cuEquivariance backend, configured as ``mace_run_train --only_cueq`` does)."""

import importlib, json, sys
a = json.loads(sys.argv[1])
sys.path.append(a["repo"])  # for benchmarks.step_timer only, after mace's own packages
import torch
importlib.import_module("mace")  # before e3nn: lets e3nn 0.4.4 load its constants under torch >= 2.6
import ase.io
import numpy as np
from e3nn import o3
from mace import data, modules, tools
from mace.tools import torch_geometric
from benchmarks.step_timer import run
torch.set_default_dtype(torch.float32)
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
frames = ase.io.read(a["structures"], index=":")
zs = sorted({int(z) for at in frames for z in at.numbers})

def cueq_config():
    if not a.get("cueq"):
        return None
    from mace.modules.wrapper_ops import CuEquivarianceConfig
    return CuEquivarianceConfig(enabled=True, layout="ir_mul", group="O3_e3nn", optimize_all=True,
                                conv_fusion=a.get("device", "cpu").startswith("cuda"))

def build(c, hidden_lmax, layers):
    irreps = " + ".join(f"{c}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(hidden_lmax + 1))
    return modules.ScaleShiftMACE(
        r_max=a["cutoff"], num_bessel=a["num_basis"], num_polynomial_cutoff=6, max_ell=a["lmax"],
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=layers, num_elements=len(zs), hidden_irreps=o3.Irreps(irreps),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(zs)),
        avg_num_neighbors=a["avg_neighbors"], atomic_numbers=zs, correlation=a["correlation"],
        gate=torch.nn.functional.silu, radial_MLP=[64, 64, 64], use_reduced_cg=False,
        atomic_inter_scale=1.0, atomic_inter_shift=0.0, cueq_config=cueq_config())

count = lambda m: sum(p.numel() for p in m.parameters())
if a["mode"] == "size":  # parameter count at matching channels, and channels for equal size
    c0 = a["channels"]
    p0 = count(build(c0, a["hidden_lmax"], a["layers"]))
    tried = {c0: p0}
    c = c0
    if abs(p0 / a["target"] - 1) > a["tolerance"]:
        for _ in range(3):  # parameters ~ channels^2: a few secant-like guesses
            c = max(8, 8 * round(c * (a["target"] / tried[c]) ** 0.5 / 8))
            if c in tried:
                break
            tried[c] = count(build(c, a["hidden_lmax"], a["layers"]))
        c = min(tried, key=lambda k: abs(tried[k] / a["target"] - 1))
    print("RESULT " + json.dumps({"params": p0, "equal_size_channels": c, "tried": tried}))
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
