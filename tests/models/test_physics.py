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


@pytest.mark.parametrize("check", physics.CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("family", ["esen", "mace"])
def test_physics_with_fidelity_conditioning_and_a_delta_head(family, check):
    """Each layer's invariants scaled and shifted per fidelity, and r2SCAN's head a correction
    to PBE's: every invariance and derivative still holds at the delta fidelity."""
    model = tiny_model(family, fidelity_conditioning="layers", delta={"r2SCAN": "PBE"})
    with torch.no_grad():  # both start as the identity: make them do something
        for film in model.backbone.film:
            film.weight.normal_(0.0, 0.3)
        model.heads.out_w[1].normal_(0.0, 0.3)
    check(model, physics.default_probe(fidelity=1, other=0))


@pytest.mark.parametrize("family", ["esen", "mace"])
def test_adding_a_fidelity_leaves_the_old_heads_unchanged(family):
    """A model extended by a fidelity (a new delta head on PBE) predicts at the old fidelities
    exactly what it did, before any training step; the new head starts at its base's answer
    (its own references aside)."""
    from common.fidelities import FidelityTable
    from models.potential import remap_state

    old = tiny_model(family, fidelity_conditioning="layers")
    with torch.no_grad():
        for film in old.backbone.film:
            film.weight.normal_(0.0, 0.3)
    cfg = ModelConfig(**{**TINY[family], "fidelity_conditioning": "layers", "delta": {"wB97M-V": "PBE"}})
    table = FidelityTable(["PBE", "r2SCAN", "wB97M-V"], {**old.table.references, "wB97M-V": {"Cu": -1.0}})
    torch.manual_seed(1)
    new = build_model(cfg, table).double().eval().to(physics.DEVICE)
    state = remap_state(old.state_dict(), old.table, new.state_dict(), new.table, new.delta)
    new.load_state_dict(state)
    structures = physics.default_probe().structures
    for name in ("PBE", "r2SCAN"):
        a = physics.predict(old, physics.batch_of(old, structures, old.table.index(name)), stress=False)
        b = physics.predict(new, physics.batch_of(new, structures, new.table.index(name)), stress=False)
        torch.testing.assert_close(b["energy"], a["energy"], rtol=0, atol=1e-12)
        torch.testing.assert_close(b["forces"], a["forces"], rtol=0, atol=1e-12)
    pbe = physics.predict(new, physics.batch_of(new, structures, 0), stress=False)
    fresh = physics.predict(new, physics.batch_of(new, structures, 2), stress=False)
    refs = new.reference_energies()
    numbers = physics.batch_of(new, structures, 0)["numbers"]
    shift = torch.zeros_like(pbe["energy"]).index_add(
        0, physics.batch_of(new, structures, 0)["batch"], refs[2, numbers] - refs[0, numbers])
    torch.testing.assert_close(fresh["energy"], pbe["energy"] + shift, rtol=0, atol=1e-9)
    torch.testing.assert_close(fresh["forces"], pbe["forces"], rtol=0, atol=1e-9)
