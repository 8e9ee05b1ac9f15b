"""Uncertainty in a release: fitted and calibrated by ``release create``, the same numbers
after the round trip through safetensors + JSON, served by the calculator and ``predict``,
an MD guard that stops a run and names the atom, and older releases that say they have none."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from tests.pretrain.release.structures import structures

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def test_release_records_and_scores_its_uncertainty(release, folder):
    from pretrain.release.format import read_config

    config = read_config(release)
    uq = config["uncertainty"]
    assert config["model"]["uncertainty"] == "llpr" and uq["method"] == "llpr"
    assert uq["calibration"]["records"] == "even positions per fidelity"
    assert set(uq["fidelities"]) == {"EMT", "EMT-asap"} and not uq["uncalibrated"]
    assert uq["llpr_sample"]["max_structures_per_fidelity"] > 0
    metrics = json.loads((release / "metrics.json").read_text())["uncertainty"]
    assert metrics["scored"].startswith("odd positions")
    for fid in ("EMT", "EMT-asap"):
        forces = metrics["fidelities"][fid]["forces"]
        assert 0 <= forces["coverage_95"] <= 1 and forces["items"] > 0 and np.isfinite(forces["nll"])
        assert metrics["out_of_distribution"][fid]["compressed"] > 0
    card = (release / "MODEL_CARD.md").read_text()
    assert "## Uncertainty" in card and "last-layer prediction rigidity" in card and "Out of distribution" in card
    assert (release / "reliability.png").stat().st_size > 10_000


def test_round_trip_keeps_the_numbers(release, folder):
    """``eval`` of the loaded release scores its uncertainty exactly as ``create`` did on
    the in-memory model before saving it."""
    from pretrain.evaluate import evaluate
    from pretrain.release.loader import load_release

    trained = load_release(release)
    saved = json.loads((release / "metrics.json").read_text())["uncertainty"]
    again = evaluate(trained.potential, folder, progress=False,
                     calibration=trained.release_config["uncertainty"]["calibration"])["uncertainty"]
    for fid, row in saved["fidelities"].items():
        for what in ("energy", "forces"):
            for key, value in row[what].items():
                assert again["fidelities"][fid][what][key] == pytest.approx(value, rel=1e-6, nan_ok=True), (fid, key)


def test_calculator_and_predict_serve_it(release):
    from pretrain.release import MLIPCalculator

    calc = MLIPCalculator.from_release(release, fidelity="EMT")
    assert calc.has_uncertainty
    widths = calc.interval(0.95)
    assert widths["forces"] == pytest.approx(1.96, rel=0.1) and widths["energy"] > 0
    assert calc.interval(0.5)["forces"] < widths["forces"]
    many = structures()
    for atoms, r in zip(many, calc.predict(many)):
        atoms.calc = calc
        atoms.get_forces()
        assert calc.results["energy_uncertainty"] == pytest.approx(r["energy_uncertainty"], rel=1e-6)
        np.testing.assert_allclose(calc.results["forces_uncertainty"], r["forces_uncertainty"], rtol=1e-5)
        assert calc.results["forces_uncertainty"].shape == (len(atoms),)
        assert (calc.results["forces_uncertainty"] > 0).all()
        assert calc.get_property("energy_uncertainty", atoms) > 0


def test_uncertainty_adds_no_backward_pass(release, monkeypatch):
    """The uncertainty reuses the forward pass's features: a force call with it runs the
    same single autograd pass as one without (its cost is measured in BENCHMARKS.md)."""
    from ase.build import bulk

    from pretrain.release import Predictor
    from pretrain.release.loader import load_release

    calls = []
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or grad(*a, **k))
    trained = load_release(release)
    cell = bulk("Cu", cubic=True) * (2, 2, 2)
    cell.rattle(0.05, seed=0)
    with_unc, without = Predictor(trained, "EMT"), Predictor(trained, "EMT")
    without.uncertainty = False
    out = with_unc.run([cell], stress=False)
    assert "forces_uncertainty" in out and len(calls) == 1
    without.run([cell], stress=False)
    assert len(calls) == 2


def test_guard_stops_md_and_names_the_atom(release):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from pretrain.release import MLIPCalculator, UncertaintyExceeded, UncertaintyGuard

    cell = structures()[0]
    cell.calc = MLIPCalculator.from_release(release, fidelity="EMT")
    sigma = cell.calc.get_property("forces_uncertainty", cell)
    dyn = VelocityVerlet(cell, 1 * units.fs)
    quiet = UncertaintyGuard(cell, threshold=1e3 * sigma.max(), dyn=dyn)
    dyn.attach(quiet, interval=1)
    dyn.run(3)
    assert quiet.calls == 4 and not quiet.events  # dyn.run calls observers at step 0, too
    # push one atom onto its neighbour: its uncertainty rises (a little for this 6-step model,
    # 5x for the demo's); a threshold between the two stops the run there, naming the atom
    cell.positions[0] = cell.positions[1] + np.array([1.0, 0.0, 0.0])
    squeezed = cell.calc.get_property("forces_uncertainty", cell)
    assert squeezed.max() > sigma.max()
    threshold = 0.5 * (squeezed.max() + sigma.max())
    cell.set_momenta(np.zeros((len(cell), 3)))
    dyn = VelocityVerlet(cell, 0.01 * units.fs)
    guard = UncertaintyGuard(cell, threshold=threshold, dyn=dyn)
    dyn.attach(guard, interval=1)
    with pytest.raises(UncertaintyExceeded, match=r"step 0: atom (0|1) \(Cu\) has force uncertainty"):
        dyn.run(5)
    flagged = UncertaintyGuard(cell, threshold=threshold, action="flag")
    flagged()
    assert flagged.events and flagged.events[0]["atom"] == int(np.argmax(squeezed))


def test_release_without_uncertainty_says_so(release, tmp_path):
    """A version-2 release (before uncertainty) loads, predicts, and refuses uncertainty
    with the reason; so does a release made with --uncertainty none."""
    from pretrain.release import MLIPCalculator, NoUncertaintyError

    old = _strip_uncertainty(release, tmp_path / "v2")
    calc = MLIPCalculator.from_release(old, fidelity="EMT")
    atoms = structures()[0]
    atoms.calc = calc
    assert np.isfinite(atoms.get_potential_energy()) and not calc.has_uncertainty
    assert "forces_uncertainty" not in calc.results
    with pytest.raises(NoUncertaintyError, match="carries no uncertainty .*release create"):
        calc.get_property("forces_uncertainty", atoms)
    assert "energy_uncertainty" not in calc.predict([atoms])[0]


def _strip_uncertainty(release, old):
    """A copy of ``release`` as format 2 wrote it: no uncertainty record or tensors."""
    from safetensors.torch import load_file, save_file

    from pretrain.release.format import write_sums

    shutil.copytree(release, old)
    config = json.loads((old / "config.json").read_text())
    config.pop("uncertainty")
    config["model"].pop("uncertainty")
    config["model"].pop("ensemble_size")
    config["format_version"] = 2
    (old / "config.json").write_text(json.dumps(config))
    state = {k: v for k, v in load_file(str(old / "model.safetensors")).items() if not k.startswith("uncertainty.")}
    save_file(state, str(old / "model.safetensors"))
    (old / "reliability.png").unlink()
    (old / "SHA256SUMS").unlink()
    write_sums(old)
    return old


def test_release_uncertainty_adds_it_to_an_old_release(release, folder, reversed_folder, tmp_path, capsys):
    """``release uncertainty`` on a format-2 release: its training data checked by content
    hash, LLPR fitted and calibrated, a verifiable format-3 release with the card sections."""
    from launch.cli import main
    from pretrain.release import MLIPCalculator
    from pretrain.release.format import FORMAT_VERSION, check_sums, read_config

    old = _strip_uncertainty(release, tmp_path / "v2")
    assert main(["release", "uncertainty", str(old), "--out", str(tmp_path / "bad"), "--data", str(reversed_folder),
                 "--held-out", str(folder)]) == 2
    assert "is not the release's training data" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    new = tmp_path / "v3"
    assert main(["release", "uncertainty", str(old), "--out", str(new), "--data", str(folder),
                 "--held-out", str(folder)]) == 0
    check_sums(new)
    config = read_config(new)
    assert config["format_version"] == FORMAT_VERSION and config["uncertainty"]["method"] == "llpr"
    assert (new / "robustness.json").read_bytes() == (old / "robustness.json").read_bytes()  # copied as it was
    card = (new / "MODEL_CARD.md").read_text()
    assert card.count("## Uncertainty") == 1 and card.count("## Held-out metrics") == 1
    assert card.index("## Uncertainty") < card.index("## Known limits")
    calc = MLIPCalculator.from_release(new, fidelity="EMT")
    assert calc.has_uncertainty
    assert main(["release", "verify", str(new), "--data", str(folder), "--allow-fragile"]) == 0


def test_uncertainty_none_and_bad_choices(run, tmp_path):
    from pretrain.release.create import create
    from pretrain.release.format import read_config
    from pretrain.uncertainty.fit import CalibrationError

    bare = create(run, tmp_path / "bare", progress=False, register=False, uncertainty="none", evaluate_held_out=False)
    assert read_config(bare)["uncertainty"] is None and "no per-prediction uncertainty" in (bare / "MODEL_CARD.md").read_text()
    with pytest.raises(CalibrationError, match="trained no ensemble"):
        create(run, tmp_path / "ens", progress=False, register=False, uncertainty="ensemble")
    assert not (tmp_path / "ens").exists()
    with pytest.raises(CalibrationError, match="calibration folder .* is not there"):
        create(run, tmp_path / "cal", progress=False, register=False, calibration=tmp_path / "missing")


def _scores(rank: int, world: int, release: str, folder: str) -> dict:
    from pretrain.evaluate import evaluate
    from pretrain.release.loader import load_release

    trained = load_release(release)
    out = evaluate(trained.potential, folder, progress=False,
                   calibration=trained.release_config["uncertainty"]["calibration"])
    return out["uncertainty"]


def test_eval_scores_on_two_ranks_equal_one(release, folder):
    from tests.distributed import run_distributed

    one = _scores(0, 1, str(release), str(folder))
    for got in run_distributed(_scores, 2, str(release), str(folder), timeout=240):
        for fid, row in one["fidelities"].items():
            for what in ("energy", "forces"):
                assert got["fidelities"][fid][what]["items"] == row[what]["items"]
                for key in ("coverage_95", "spearman", "nll"):
                    assert got["fidelities"][fid][what][key] == pytest.approx(row[what][key], rel=1e-4, abs=1e-6)


def test_ensemble_run_trains_its_members_and_ships_them(folder, tmp_path):
    """A tiny run with model.uncertainty=ensemble logs its NLL, moves its members, and
    ``release create`` (auto) calibrates and ships the ensemble, not LLPR."""
    from pretrain.release import MLIPCalculator
    from pretrain.release.create import create
    from pretrain.release.format import read_config
    from pretrain.release.loader import load_model
    from tests.distributed import run_distributed
    from tests.pretrain.test_train import TINY_MODEL, _train, write_config

    cfg = write_config(tmp_path / "run.yaml", folder, tmp_path / "run", steps=4, eval={"folder": str(folder)},
                       model=dict(TINY_MODEL, uncertainty="ensemble", ensemble_size=3))
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    nll = [r["train/loss_nll"] for r in rows if "train/loss_nll" in r]
    assert nll and all(np.isfinite(nll)) and any(v != 0 for v in nll)
    steps = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    early, late = (load_model(s, ema=False).potential.uncertainty for s in (steps[0], steps[-1]))
    for name in ("energy_members", "force_members", "force_members_inv"):  # the optimizer moves them
        assert not torch.equal(getattr(early, name), getattr(late, name)), name
    release = create(tmp_path / "run", tmp_path / "rel", progress=False, register=False)
    uq = read_config(release)["uncertainty"]
    assert uq["method"] == "ensemble" and uq["members"] == 3
    calc = MLIPCalculator.from_release(release, fidelity="EMT")
    atoms = structures()[0]
    atoms.calc = calc
    atoms.get_forces()
    assert calc.has_uncertainty and (calc.results["forces_uncertainty"] > 0).all()
