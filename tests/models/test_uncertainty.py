"""The uncertainty heads: rotation-invariant, the ensemble's mean is the plain prediction,
the trained NLL moves the spread, and per-fidelity rows follow a changed fidelity table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from data_pipeline.batch import atoms_batch, to_torch
from models.build import ModelConfig, build_model

TINY = dict(family="mace", cutoff=4.0, channels=8, hidden=8, lmax=1, hidden_lmax=1, correlation=2,
            layers=2, num_basis=4, avg_neighbors=10.0)


def _model(method: str, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**TINY, uncertainty=method, ensemble_size=4), ["A", "B"]).double()
    unc = model.uncertainty
    if method == "llpr":  # a fitted-looking state: random symmetric positive definite precisions
        for buf in (unc.energy_precision, unc.force_precision, unc.force_precision_inv):
            a = torch.randn(*buf.shape, dtype=torch.float64)
            buf.copy_(a @ a.transpose(1, 2) + torch.eye(buf.shape[-1], dtype=torch.float64))
    unc.scale.fill_(2.0)
    return model.eval()


def _structures():
    rng = np.random.default_rng(1)
    water = molecule("CH3CH2OH")
    water.positions += rng.normal(0, 0.05, water.positions.shape)
    cu = bulk("Cu", cubic=True) * (2, 1, 1)
    cu.rattle(0.05, seed=2)
    return [water, cu]


def _run(model, structures, fidelity=1):
    batch = to_torch(atoms_batch(structures, model.cutoff, fidelity, "float64"))
    with torch.enable_grad():
        return model(batch, forces=True, create_graph=False, uncertainty=True)


@pytest.mark.parametrize("method", ["llpr", "ensemble"])
def test_uncertainty_is_rotation_invariant(method):
    from scipy.spatial.transform import Rotation

    model = _model(method)
    structures = _structures()
    ref = _run(model, structures)
    rot = Rotation.random(random_state=3).as_matrix()
    turned = []
    for atoms in structures:
        a = atoms.copy()
        a.positions = a.positions @ rot.T
        if a.pbc.any():
            a.cell = a.cell.array @ rot.T
        turned.append(a)
    out = _run(model, turned)
    for key in ("energy_uncertainty", "forces_uncertainty"):
        assert ref[key].min() > 0
        torch.testing.assert_close(out[key], ref[key], rtol=1e-9, atol=1e-12)
    # forces rotate, their uncertainty per atom does not
    torch.testing.assert_close(out["forces"], ref["forces"] @ torch.as_tensor(rot).T, rtol=1e-8, atol=1e-10)


def test_calibration_weights_the_raw_variances():
    model = _model("llpr")
    model.uncertainty.scale[1] = torch.tensor([2.0, 3.0, 0.5], dtype=torch.float64)
    out = _run(model, _structures())
    torch.testing.assert_close(out["energy_uncertainty"], 2.0 * out["energy_var"].sqrt())
    torch.testing.assert_close(out["forces_uncertainty"],
                               (9.0 * out["forces_var_inv"] + 0.25 * out["forces_var_l1"]).sqrt())


def test_ensemble_mean_is_the_plain_prediction():
    model = _model("ensemble")
    structures = _structures()
    batch = to_torch(atoms_batch(structures, model.cutoff, 1, "float64"))
    plain = model(batch, forces=True, create_graph=False)
    with_unc = _run(model, structures)
    torch.testing.assert_close(with_unc["energy"], plain["energy"], rtol=0, atol=0)
    torch.testing.assert_close(with_unc["forces"], plain["forces"], rtol=0, atol=0)
    # the members disagree: a spread > 0, the variance of the member energies about their mean
    assert (with_unc["energy_var"] > 0).all()
    assert (with_unc["forces_var_inv"] > 0).all() and (with_unc["forces_var_l1"] > 0).all()
    unc = model.uncertainty
    dev = unc.energy_members[1] - unc.energy_members[1].mean(dim=0)  # [K, H] at fidelity 1
    heads_h = {}
    hook = model.heads.register_forward_hook(lambda m, i, o: heads_h.__setitem__("h", o[1]))
    _run(model, structures[:1])
    hook.remove()
    members = heads_h["h"].sum(0) @ dev.T + plain["energy"][0]  # [K] member energies of the molecule
    torch.testing.assert_close(members.mean(), plain["energy"][0])
    torch.testing.assert_close(with_unc["energy_var"][0], members.var(unbiased=False))


def test_intervals_are_normal_until_calibrated():
    model = _model("llpr")
    assert model.uncertainty.interval(1, 0.95)[1] == pytest.approx(1.959964, rel=1e-6)
    model.uncertainty.widths[1, 1] = torch.linspace(0.01, 0.99, 99, dtype=torch.float64) * 2
    assert model.uncertainty.interval(1, 0.5) == (pytest.approx(0.674, rel=1e-3), pytest.approx(1.0))
    with pytest.raises(ValueError, match="level"):
        model.uncertainty.interval(1, 1.5)


def test_no_uncertainty_is_an_error_naming_the_fix():
    model = build_model(ModelConfig(**TINY), ["A"]).double()
    batch = to_torch(atoms_batch(_structures(), model.cutoff, 0, "float64"))
    with pytest.raises(RuntimeError, match="model has none"):
        model(batch, forces=False, uncertainty=True)


def test_ensemble_nll_trains_the_spread_towards_the_residuals():
    """A few optimizer steps on the NLL alone: the predicted variance approaches the squared
    residual of a fixed target (a model whose members start nearly identical)."""
    from data_pipeline import keys as K
    from pretrain.loss import Loss, LossConfig

    model = _model("ensemble").float().train()
    batch = to_torch(atoms_batch(_structures(), model.cutoff, 1, "float32"))
    n = batch[K.N_ATOMS].shape[0]
    batch[K.ENERGY] = torch.tensor([-40.0, -15.0], dtype=torch.float64)
    batch[K.FORCES] = torch.randn(len(batch[K.NUMBERS]), 3) * 0.5
    batch[K.ENERGY_MASK] = torch.ones(n)
    batch[K.FORCES_MASK] = torch.ones(len(batch[K.NUMBERS]), dtype=torch.bool)
    batch[K.STRESS_MASK] = torch.zeros(n)
    # the energy and force terms weigh ~nothing: only the NLL trains (the members and their spread)
    loss = Loss(LossConfig(kind="mse", energy=1e-12, forces=1e-12, stress=0.0, nll=1.0), ["A", "B"])
    opt = torch.optim.Adam(model.uncertainty.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        out = model(batch, forces=True, create_graph=True)
        total, parts = loss(out, batch, loss.counts(batch))
        first = float(parts[3]) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(parts[3]) < first - 1.0  # the NLL fell by more than a nat
