"""``eval``'s errors by stratum (``pretrain/strata.py``), with the committed v1 release on
the session's shards: the element breakdown equals a direct recomputation from the model's
predictions, the force and pressure bins partition the labelled atoms and structures, and
every breakdown adds back up to the fidelity's totals. (2 ranks equal 1:
``tests/pretrain/release/test_eval.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "release-v1"  # tiny mace, EMT and EMT-asap heads

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def evaluated(built):
    """(metrics, reference) of the release on the session's shards; ``reference``: every
    record in one batch, as numpy arrays per atom and per structure."""
    import torch

    from data_pipeline import keys as K
    from data_pipeline.batch import to_torch
    from data_pipeline.stream.collate import BatchBuilder
    from pretrain.evaluate import evaluate
    from pretrain.release.loader import load_model

    model = load_model(FIXTURE).potential
    folder = built[1]
    metrics = evaluate(model, folder, max_atoms=256, progress=False)
    builder = BatchBuilder(folder, model.cutoff, "float32", model.fidelities)
    ds = builder.dataset
    batch = to_torch(builder(np.arange(len(ds))))
    with torch.enable_grad():
        out = model(batch, forces=True, stress=True, create_graph=False)
    index = batch[K.INDEX].numpy()
    ref = {"fidelity": ds.fidelity_ids[index], "b": batch[K.BATCH].numpy(), "z": batch[K.NUMBERS].numpy(),
           "n": batch[K.N_ATOMS].numpy(), "f_pred": out["forces"].detach().double().numpy(),
           "f_ref": batch[K.FORCES].double().numpy(), "fmask": batch[K.FORCES_MASK].numpy(),
           "e_err": ((out["energy"].detach() - batch[K.ENERGY]) / batch[K.N_ATOMS]).double().numpy(),
           "emask": batch[K.ENERGY_MASK].numpy(), "stress": batch[K.STRESS].double().numpy(),
           "smask": batch[K.STRESS_MASK].numpy(), "names": ds.manifest["fidelities"]}
    return metrics, ref


def test_elements_equal_a_direct_recomputation(evaluated):
    """Per element: force MAE and RMSE over its atoms' components, energy MAE per atom over
    the structures that contain it, from the model's predictions on all records at once."""
    from ase.data import chemical_symbols

    metrics, r = evaluated
    checked = 0
    for f, name in enumerate(r["names"]):
        for z in np.unique(r["z"][r["fidelity"][r["b"]] == f]):
            atoms = (r["fidelity"][r["b"]] == f) & (r["z"] == z)
            row = metrics["strata"][name]["elements"][chemical_symbols[z]]
            err = (r["f_pred"] - r["f_ref"])[atoms & r["fmask"]]
            assert row["atoms"] == atoms.sum()
            assert row["forces_mae"] == pytest.approx(np.abs(err).mean(), rel=1e-5)
            assert row["forces_rmse"] == pytest.approx(np.sqrt((err ** 2).mean()), rel=1e-5)
            holding = np.unique(r["b"][atoms])
            holding = holding[r["emask"][holding]]
            assert row["energy_mae_per_atom"] == pytest.approx(np.abs(r["e_err"][holding]).mean(), rel=1e-4)
            checked += 1
    assert checked >= 6  # several elements in each of the two fidelities


def test_breakdowns_add_up_to_the_fidelity_totals(evaluated):
    """Atom-weighted element and bin MAEs give back the fidelity's force MAE; the bins hold
    every labelled atom (and stress-labelled structure) exactly once."""
    metrics, r = evaluated
    for f, name in enumerate(r["names"]):
        total, strata = metrics["fidelities"][name], metrics["strata"][name]
        atoms = r["fidelity"][r["b"]] == f
        labelled = atoms & r["fmask"]
        for rows in (list(strata["elements"].values()), strata["force_bins"]):
            n = np.array([row["atoms"] for row in rows])
            mae = np.array([row.get("forces_mae", 0.0) for row in rows])
            assert (n * mae).sum() / n.sum() == pytest.approx(total["forces_mae"], rel=1e-12)
        assert sum(row["atoms"] for row in strata["elements"].values()) == total["atoms"] == atoms.sum()
        norms = np.linalg.norm(r["f_ref"][labelled], axis=1)
        counts = np.histogram(norms, bins=[0, 0.1, 0.3, 1, 3, 10, np.inf])[0]
        assert [row["atoms"] for row in strata["force_bins"]] == counts.tolist()
        assert sum(counts) == labelled.sum()
        for row in strata["force_bins"]:
            if row["atoms"]:
                assert row["forces_mae_relative"] == pytest.approx(row["forces_mae"] / row["mean_ref_force"])
        stressed = (r["fidelity"] == f) & r["smask"]
        pressure = -r["stress"][stressed, :3].sum(1) / 3 * 160.21766208  # GPa, ASE sign: tension > 0
        counts = np.histogram(pressure, bins=[-np.inf, -10, -1, 1, 10, 100, np.inf])[0]
        assert [row["structures"] for row in strata["pressure_bins"]] == counts.tolist()
        if stressed.any():
            n = np.array([row["structures"] for row in strata["pressure_bins"]])
            mae = np.array([row.get("stress_mae", 0.0) for row in strata["pressure_bins"]])
            assert (n * mae).sum() / n.sum() == pytest.approx(total["stress_mae"], rel=1e-12)
    assert any(row["structures"] for s in metrics["strata"].values() for row in s["pressure_bins"])


def test_strata_are_strict_json(evaluated):
    """Unbounded bin edges are null, not Infinity: metrics.json stays readable by any parser."""
    strata = evaluated[0]["strata"]
    back = json.loads(json.dumps(strata, allow_nan=False))
    bins = next(iter(back.values()))
    assert bins["force_bins"][-1]["hi"] is None and bins["pressure_bins"][0]["lo"] is None
    assert [b["lo"] for b in bins["force_bins"]] == [0, 0.1, 0.3, 1, 3, 10]
