"""Every model family runs the physics suite (float64, and bf16 autocast at the suite's
stated bf16 tolerances), at a tiny size and its named sizes (on ``MLIP_TEST_DEVICE``,
default cpu: see ``pretrain/release/physics.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.config import load_config
from models.build import ModelConfig, build_model
from pretrain.release import physics

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"

TINY = {
    # 3 layers: with 2, the m > 0 paths of an SO(2) conv never reach the energy (block 1
    # sees only l = 0 inputs, the last block's l > 0 outputs are not read), so a broken
    # m > 0 path would pass every check
    "esen": {"family": "esen", "cutoff": 4.0, "channels": 8, "hidden": 8, "lmax": 2, "mmax": 2,
             "layers": 3, "avg_neighbors": 10.0},
    "mace": {"family": "mace", "cutoff": 4.0, "channels": 8, "hidden": 8, "lmax": 2,
             "hidden_lmax": 1, "correlation": 3, "layers": 2, "avg_neighbors": 10.0},
}


def tiny_model(family: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY[family], **extra})
    refs = {"PBE": {"Cu": -3.5, "Ni": -4.1, "C": -7.0}, "r2SCAN": {"Cu": -3.9}}
    return build_model(cfg, ["PBE", "r2SCAN"], refs).double().eval().to(physics.DEVICE)


@pytest.mark.parametrize("check", physics.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", ["esen", "mace"])
def test_physics(family, check):
    model = tiny_model(family)
    check(model, physics.default_probe())


@pytest.mark.parametrize("check", physics.BF16_CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", ["esen", "mace"])
def test_physics_bf16(family, check):
    """fp32 weights, bf16 contractions (``precision = "bf16"``): invariances at bf16's
    ~1e-2, and the cutoff as smooth as in fp32 (geometry never rounds to bf16)."""
    model = tiny_model(family, direct_forces=True, direct_stress=True).float()
    model.precision = "bf16"
    check(model, physics.default_probe(), physics.BF16)


@pytest.mark.parametrize("family", ["esen", "mace"])
def test_direct_heads(family):
    model = tiny_model(family, direct_forces=True, direct_stress=True)
    physics.check_direct_heads(model, physics.default_probe())
    batch = physics.batch_of(model, physics.default_probe().structures)
    out = model(batch, forces=True, stress=True, direct=True)
    assert out["forces"].shape == batch["positions"].shape and out["stress"].shape == (3, 6)
    assert not out["forces"].requires_grad or out["forces"].grad_fn is not None


def test_fidelity_by_name_and_references():
    from ase.build import bulk

    from common.fidelities import FidelityError

    model = tiny_model("mace")
    cu = bulk("Cu", "fcc", a=3.6)
    pbe, r2 = (physics.predict(model, physics.batch_of(model, [cu], model.table.index(name)), stress=False)
               for name in ("PBE", "r2SCAN"))
    assert pbe["energy"].shape == (1,) and pbe["forces"].shape == (1, 3)
    assert pbe["energy"][0] != r2["energy"][0]  # own head and own references per fidelity
    assert float(model.references[0, 29]) == -3.5 and float(model.references[1, 29]) == -3.9
    with pytest.raises(FidelityError, match="'wB97M-V' is not one this model has; it has \\['PBE', 'r2SCAN'\\]"):
        model.table.index("wB97M-V")


@pytest.mark.parametrize("name", [
    "esen-xs", "esen-s", "mace-xs", "mace-s",
    *[pytest.param(n, marks=pytest.mark.slow) for n in ("esen-m", "esen-l", "mace-m", "mace-l")],
])
def test_named_size_runs_the_physics_suite(name):
    cfg = load_config(ModelConfig, CONFIGS / f"{name}.yaml")
    torch.manual_seed(0)
    model = build_model(cfg, ["PBE", "r2SCAN"], {"PBE": {"Cu": -3.5}}).double().eval().to(physics.DEVICE)
    for check in physics.CHECKS:
        check(model, physics.default_probe())


def test_charge_and_spin_outside_the_embedding_are_errors():
    """Not clamped to the nearest embedded value (another charge state, silently)."""
    from models.layers.embedding import InputRangeError

    model = tiny_model("mace")
    batch = physics.batch_of(model, physics.default_probe().structures[:2])
    model(batch, forces=False)  # 0 (unknown) is fine
    for key, value, message in (("charge", [0, 11], r"charge \[11\] is outside the model's range -10\.\.10 \(structures \[1\]"),
                                ("spin", [-1, 0], r"spin multiplicity \[-1\] is outside the model's range 0\.\.10")):
        bad = dict(batch, **{key: torch.tensor(value)})
        with pytest.raises(InputRangeError, match=message):
            model(bad, forces=False)
