"""LLPR accumulated over a real 2-process gloo group equals one process; calibration on
the builder's shards covers what it promises; the LLPR sample is stated and stable."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed

TINY = dict(family="mace", cutoff=4.0, channels=8, hidden=8, lmax=1, hidden_lmax=1, correlation=2,
            layers=2, num_basis=4, avg_neighbors=10.0)


def _model(folder):
    from data_pipeline.manifest import read_manifest
    from models.build import ModelConfig, build_model, references_from_manifest

    manifest = read_manifest(folder)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY), manifest["fidelities"], references_from_manifest(manifest))
    model.attach_uncertainty("llpr")
    return model.eval()


def _fit(rank: int, world: int, folder: str) -> dict:
    """Covariance and calibration of the same model on ``world`` ranks."""
    from pretrain.uncertainty.fit import accumulate_llpr, calibrate, split_held_out

    model = _model(folder)
    cov = accumulate_llpr(model, folder, progress=False)
    fitted = calibrate(model, folder, split_held_out(folder)[0], covariance=cov, progress=False)
    return {"energy": cov.energy.numpy(), "forces": cov.forces.numpy(), "inv": cov.forces_inv.numpy(),
            "counts": (cov.structures.numpy(), cov.atoms.numpy()), "scale": model.uncertainty.scale.numpy(),
            "fitted": fitted}


@pytest.fixture(scope="module")
def folder(built):
    return str(built[1])


def test_two_ranks_equal_one(folder):
    one = _fit(0, 1, folder)
    two = run_distributed(_fit, 2, folder, timeout=240)
    for rank in two:
        for key in ("energy", "forces", "inv"):  # float64 sums
            np.testing.assert_allclose(rank[key], one[key], rtol=1e-9, atol=1e-9 * np.abs(one[key]).max())
        # the scale comes from float32 predictions, whose rounding depends on the batch
        np.testing.assert_allclose(rank["scale"], one["scale"], rtol=1e-4)
        np.testing.assert_array_equal(rank["counts"][0], one["counts"][0])
        assert rank["fitted"].keys() == one["fitted"].keys()
    assert one["counts"][0].sum() > 0 and np.linalg.eigvalsh(one["inv"][0]).min() >= -1e-9  # a covariance


def test_calibration_covers_its_items_and_is_stored(folder):
    """After calibration, the calibration items themselves are covered at the conformal level."""
    from pretrain.uncertainty.fit import accumulate_llpr, calibrate, held_out_items, split_held_out
    from pretrain.uncertainty.metrics import score

    model = _model(folder)
    cal, report = split_held_out(folder)
    assert len(set(cal) & set(report)) == 0 and len(cal) + len(report) == len(np.unique(np.r_[cal, report]))
    fitted = calibrate(model, folder, cal, covariance=accumulate_llpr(model, folder, progress=False), progress=False)
    items = held_out_items(model, folder, cal, progress=False)
    for f, name in enumerate(model.fidelities):
        if name not in fitted:
            continue
        sigma = model.uncertainty.calibrated(
            {"energy_var": torch.as_tensor(items[f]["e_x"]), "forces_var_inv": torch.as_tensor(items[f]["f_inv"]),
             "forces_var_l1": torch.as_tensor(items[f]["f_x"])},
            torch.full((len(items[f]["f_x"]),), f), torch.full((len(items[f]["e_x"]),), f))
        forces = score(items[f]["f_res"], sigma["forces_uncertainty"].numpy())
        assert forces["coverage_95"] >= 0.95
        assert fitted[name]["regulariser_energy"] in (1e-8, 1e-6, 1e-4, 1e-2, 1.0)
    assert model.uncertainty.calibrated_fidelities


def test_llpr_sample_is_capped_per_fidelity_and_stable(folder):
    from data_pipeline.stream.dataset import ShardedDataset
    from pretrain.uncertainty.fit import llpr_sample

    ds = ShardedDataset(folder)
    small = llpr_sample(folder, max_structures=3)
    for f in np.unique(ds.fidelity_ids):
        assert (ds.fidelity_ids[small] == f).sum() == min(3, (ds.fidelity_ids == f).sum())
    np.testing.assert_array_equal(small, llpr_sample(folder, max_structures=3))
    assert len(llpr_sample(folder)) == len(ds)
