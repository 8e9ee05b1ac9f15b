"""mace-torch's ScaleShiftMACE built as its ``mace_run_train`` builds it, for the benchmark
children that run in the mace-torch peer's venv (bench_models.py, bench_md.py).

``build(a, zs, channels, hidden_lmax, layers)`` takes our MACE's hyperparameters from ``a``
(``cutoff``, ``num_basis``, ``lmax``, ``correlation``, ``avg_neighbors``):
``RealAgnosticResidualInteractionBlock`` (first layer ``RealAgnosticInteractionBlock``),
silu gate, polynomial cutoff p = 6, hidden irreps ``C x 0e + C x 1o (+ C x 2e)``, MLP_irreps
16x0e, radial_MLP [64, 64, 64]. ``equal_size(a, zs)`` finds the channels whose parameter
count is nearest ``a["target"]``. ``a["cueq"]`` (gpu_check.py) switches on mace-torch's
cuEquivariance backend, configured as ``mace_run_train --only_cueq`` does. Imports mace before e3nn (lets e3nn 0.4.4 load its
constants under torch >= 2.6).
"""

import importlib

importlib.import_module("mace")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from e3nn import o3  # noqa: E402
from mace import modules  # noqa: E402


def cueq_config(a: dict):
    """mace-torch's cuEquivariance config when ``a["cueq"]``, else None."""
    if not a.get("cueq"):
        return None
    from mace.modules.wrapper_ops import CuEquivarianceConfig
    return CuEquivarianceConfig(enabled=True, layout="ir_mul", group="O3_e3nn", optimize_all=True,
                                conv_fusion=a.get("device", "cpu").startswith("cuda"))


def build(a: dict, zs: list[int], c: int, hidden_lmax: int, layers: int):
    """A ScaleShiftMACE with ``c`` channels over the elements ``zs``."""
    irreps = " + ".join(f"{c}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(hidden_lmax + 1))
    return modules.ScaleShiftMACE(
        r_max=a["cutoff"], num_bessel=a["num_basis"], num_polynomial_cutoff=6, max_ell=a["lmax"],
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
        num_interactions=layers, num_elements=len(zs), hidden_irreps=o3.Irreps(irreps),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(zs)),
        avg_num_neighbors=a["avg_neighbors"], atomic_numbers=zs, correlation=a["correlation"],
        gate=torch.nn.functional.silu, radial_MLP=[64, 64, 64], use_reduced_cg=False,
        atomic_inter_scale=1.0, atomic_inter_shift=0.0, cueq_config=cueq_config(a))


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def equal_size(a: dict, zs: list[int]) -> dict:
    """Parameters at ``a["channels"]``, and the channels (multiple of 8) nearest
    ``a["target"]`` parameters when that is more than ``a["tolerance"]`` off."""
    c0 = a["channels"]
    p0 = count(build(a, zs, c0, a["hidden_lmax"], a["layers"]))
    tried, c = {c0: p0}, c0
    if abs(p0 / a["target"] - 1) > a["tolerance"]:
        for _ in range(3):  # parameters ~ channels^2: a few secant-like guesses
            c = max(8, 8 * round(c * (a["target"] / tried[c]) ** 0.5 / 8))
            if c in tried:
                break
            tried[c] = count(build(a, zs, c, a["hidden_lmax"], a["layers"]))
        c = min(tried, key=lambda k: abs(tried[k] / a["target"] - 1))
    return {"params": p0, "equal_size_channels": c, "tried": tried}
