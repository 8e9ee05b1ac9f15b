"""Property heads (charges, dipoles, per-atom and per-structure scalars) for every model
family: charges sum to the total charge exactly, the dipole rotates with the molecule and
flips under inversion, invariant targets stay invariant, and a missing label is masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import molecule
from scipy.spatial.transform import Rotation

from common.config import ConfigError
from data_pipeline import keys as K
from data_pipeline.batch import atoms_batch, to_torch
from models.build import ModelConfig, build_model
from models.properties import TargetConfig
from pretrain.loss import Loss, LossConfig

FAMILIES = {
    "mace": dict(family="mace", cutoff=4.0, channels=8, hidden=8, lmax=2, hidden_lmax=1, correlation=2,
                 layers=2, num_basis=4, avg_neighbors=10.0),
    "esen": dict(family="esen", cutoff=4.0, channels=8, hidden=8, lmax=2, mmax=1, layers=2, num_basis=4,
                 avg_neighbors=10.0),
}
TARGETS = [TargetConfig("charges", "charges"), TargetConfig("dipole", "dipole"),
           TargetConfig("magmoms", "atom_scalar"), TargetConfig("gap", "structure_scalar", reduce="mean")]


def _model(family: str, targets=TARGETS):
    torch.manual_seed(0)
    return build_model(ModelConfig(**FAMILIES[family], targets=list(targets)), ["A", "B"]).double().eval()


def _molecules(charges=(0, 1, -2)):
    rng = np.random.default_rng(4)
    out = []
    for name, q in zip(("CH3CH2OH", "H2O", "CO2"), charges):
        m = molecule(name)
        m.positions += rng.normal(0, 0.05, m.positions.shape) + rng.normal(0, 2.0, 3)
        m.info["charge"] = q
        out.append(m)
    return out


def _run(model, structures, fidelity=1):
    batch = to_torch(atoms_batch(structures, model.cutoff, fidelity, "float64"))
    with torch.enable_grad():
        return model(batch, forces=True, create_graph=False), batch


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_charges_sum_to_the_total_charge(family):
    out, batch = _run(_model(family), _molecules())
    q = out[K.extra("charges")]
    assert q.dtype == torch.float64
    sums = torch.zeros(3, dtype=torch.float64).index_add(0, batch[K.BATCH], q)
    assert sums.tolist() == pytest.approx([0.0, 1.0, -2.0], abs=1e-12)
    assert q.abs().max() > 1e-4  # not all zero: the heads really predict something


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dipole_rotates_and_flips_and_scalars_are_invariant(family):
    model = _model(family)
    mols = _molecules(charges=(0, 0, 0))
    ref, _ = _run(model, mols)
    rot = Rotation.random(random_state=5).as_matrix()
    for matrix in (rot, -np.eye(3), -rot):  # a rotation, the inversion, an improper rotation
        moved = [m.copy() for m in mols]
        for m in moved:
            m.positions = m.positions @ matrix.T
        out, _ = _run(model, moved)
        mu, mu_ref = out[K.extra("dipole")], ref[K.extra("dipole")]
        assert torch.allclose(mu, mu_ref @ torch.tensor(matrix.T), atol=1e-9), (family, matrix)
        for name in ("charges", "magmoms", "gap"):
            assert torch.allclose(out[K.extra(name)], ref[K.extra(name)], atol=1e-9)
    assert ref[K.extra("dipole")].abs().max() > 1e-4


def test_neutral_dipole_does_not_depend_on_the_origin():
    model = _model("mace")
    mols = _molecules(charges=(0, 0, 0))
    ref, _ = _run(model, mols)
    shifted = [m.copy() for m in mols]
    for m in shifted:
        m.positions += np.array([3.0, -7.0, 11.0])
    out, _ = _run(model, shifted)
    assert torch.allclose(out[K.extra("dipole")], ref[K.extra("dipole")], atol=1e-9)


def test_a_missing_label_is_masked_and_a_target_trains_only_at_its_fidelities():
    targets = [TargetConfig("charges", "charges", fidelities=["B"]), TargetConfig("dipole", "dipole")]
    model = _model("mace", targets)
    mols = _molecules(charges=(0, 0, 0))
    batch = to_torch(atoms_batch(mols, model.cutoff, [1, 1, 0], "float64"))
    n = batch[K.N_ATOMS].tolist()
    batch[K.extra("charges")] = torch.randn(sum(n), dtype=torch.float64)
    batch[K.extra_mask("charges")] = torch.tensor([True, False, True])  # 3rd: fidelity A, not learned
    batch[K.extra("dipole")] = torch.randn(3, 3, dtype=torch.float64)
    batch[K.extra_mask("dipole")] = torch.tensor([False, True, False])
    loss = Loss(LossConfig(kind="mse", energy=0.0, forces=1.0, stress=0.0), ["A", "B"], targets)
    loss.cfg.energy = 0.0
    counts = loss.counts(batch)
    assert counts[3:].tolist() == [n[0], 1]  # atoms of structure 0 only; one dipole
    with torch.enable_grad():
        out = model(batch, forces=True, create_graph=False)
        _, parts = loss(out, batch, counts)
        # a wild label where the mask is False changes nothing
        batch[K.extra("charges")][n[0]:] = 1e6
        batch[K.extra("dipole")][0] = 1e6
        _, again = loss(out, batch, counts)
    assert again[4:].tolist() == pytest.approx(parts[4:].tolist())
    q = out[K.extra("charges")][:n[0]].double() - batch[K.extra("charges")][:n[0]]
    assert parts[4].item() == pytest.approx(q.square().mean().item())
    table = loss.errors(out, batch)
    assert table[0, 6 + 2].item() == 0 and table[1, 6 + 2].item() == n[0]  # charge components by fidelity


def test_bad_targets_are_config_errors():
    with pytest.raises(ConfigError, match="declared twice"):
        _model("mace", [TargetConfig("q", "charges"), TargetConfig("q", "charges")])
    with pytest.raises(ConfigError, match="energy loss"):
        _model("mace", [TargetConfig("energy", "structure_scalar")])


def test_the_calculator_serves_each_target_under_its_ase_name(tmp_path):
    """charges, dipole and magmoms through ASE's getters, other targets by name, only at
    the fidelities a target was trained at."""
    from ase.calculators.calculator import PropertyNotImplementedError

    from pretrain.release.calculator import MLIPCalculator
    from pretrain.weights import TrainedModel

    targets = [TargetConfig("charges", "charges"), TargetConfig("dipole", "dipole"),
               TargetConfig("magmoms", "atom_scalar", fidelities=["A"]), TargetConfig("gap", "structure_scalar")]
    cfg = ModelConfig(**FAMILIES["mace"], targets=targets)
    torch.manual_seed(0)
    model = build_model(cfg, ["A", "B"]).eval()
    trained = TrainedModel(model, model.table, cfg, "conservative", "release", tmp_path, False)
    mol = _molecules(charges=(1,))[0]
    mol.calc = MLIPCalculator(trained, "A", dtype="float64")
    q, mu, m = mol.get_charges(), mol.get_dipole_moment(), mol.get_magnetic_moments()
    assert q.shape == m.shape == (len(mol),) and mu.shape == (3,) and q.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.isfinite(mol.calc.get_property("gap", mol))
    mol.calc = MLIPCalculator(trained, "B", dtype="float64")
    mol.get_charges()
    with pytest.raises(PropertyNotImplementedError):
        mol.get_magnetic_moments()  # not trained at B
