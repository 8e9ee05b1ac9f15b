"""Extra targets end to end on real labels (a few molecules of the shipped QM data, built
by our own builder): a 2-rank run learns charges and dipoles at two fidelities, a config
naming an extra no record has is refused, and the release serves them through ASE's
calculator, ``predict`` and ``eval`` exactly as the trained model computes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.distributed import run_distributed
from tests.pretrain.test_train import TINY_MODEL, _train, write_config

REPO = Path(__file__).resolve().parents[3]
MOLECULES = ("g2-H2O", "g2-NH3", "g2-CH4", "g2-HCN", "g2-CH3OH", "g2-H2CO")
TARGETS = [{"name": "charges", "kind": "charges", "weight": 10.0},
           {"name": "dipole", "kind": "dipole", "weight": 10.0}]


def _recipe(path: Path, split: str) -> Path:
    """GFN2-xTB and PBE/def2-SVP frames of :data:`MOLECULES` with their charges and dipoles
    (the DFT dipole stored in Debye, converted by the build)."""
    sources = []
    for ds, fid, prefix, dipole in (("hcno-xtb", "GFN2-xTB", "gfn2", {}), ("hcno-dft", "PBE/def2-SVP", "dft",
                                                                              {"unit": "debye"})):
        for m in MOLECULES:
            p = REPO / "data" / "qm" / split / ds / f"{m}.extxyz.xz"
            if p.is_file():
                sources.append({"path": str(p), "dataset": ds, "fidelity": fid, "energy_key": f"{prefix}_energy",
                                "forces_key": f"{prefix}_forces",
                                "extras": [{"key": f"{prefix}_charges", "name": "charges"},
                                           {"key": f"{prefix}_dipole", "name": "dipole", **dipole}]})
    path.write_text(yaml.safe_dump({"sources": sources, "shards": 2}))
    return path


@pytest.fixture(scope="module")
def qm_folder(ray_local, tmp_path_factory) -> Path:
    from data_pipeline.build import build
    from data_pipeline.build.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("qm-targets")
    build(load_recipe(_recipe(tmp / "recipe.yaml", "train")), tmp / "out", workers=2, progress=False)
    return tmp / "out"


@pytest.fixture(scope="module")
def target_run(qm_folder, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("targets-run")
    cfg = write_config(tmp / "run.yaml", qm_folder, tmp / "run", steps=4, eval={"folder": str(qm_folder)},
                       model=dict(TINY_MODEL, targets=TARGETS), loss={"stress": 0.0},
                       data={"sampler": {"max_atoms": 40, "seed": 5}})
    run_distributed(_train, 2, str(cfg), [], timeout=300)
    return tmp / "run"


def test_run_learns_the_targets_at_the_fidelities_that_carry_them(target_run, qm_folder):
    rows = [json.loads(line) for line in (target_run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "train/loss" not in r]
    rows = [r for r in rows if "train/loss" in r]
    assert len(rows) == 4 and all(np.isfinite(r["train/loss_charges"]) and r["train/loss_charges"] > 0 for r in rows)
    assert all(np.isfinite(r["train/loss_dipole"]) for r in rows)
    last = evals[-1]
    for fid in ("GFN2-xTB", "PBE/def2-SVP"):
        assert f"val/{fid}/charges_mae" in last and f"val/{fid}/dipole_rmse" in last
    record = json.loads(next((target_run / "checkpoints").glob("step-*/model.json")).read_text())
    assert [t["fidelities"] for t in record["model"]["targets"]] == [["GFN2-xTB", "PBE/def2-SVP"]] * 2


def test_a_target_no_record_carries_is_refused(qm_folder, tmp_path):
    from common.config import ConfigError, load_config
    from pretrain.config import TrainConfig
    from pretrain.targets import resolve_targets
    from data_pipeline.manifest import read_manifest

    cfg = write_config(tmp_path / "run.yaml", qm_folder, tmp_path / "run",
                       model=dict(TINY_MODEL, targets=[{"name": "magmoms", "kind": "atom_scalar"}]))
    model = load_config(TrainConfig, cfg).model
    with pytest.raises(ConfigError, match="no training record .* has the extra 'magmoms'.*charges.*dipole"):
        resolve_targets(model.targets, read_manifest(qm_folder), str(qm_folder))
    from models.properties import TargetConfig

    with pytest.raises(ConfigError, match="per-atom label"):
        resolve_targets([TargetConfig("dipole", "charges")], read_manifest(qm_folder), str(qm_folder))


@pytest.fixture(scope="module")
def target_release(target_run, tmp_path_factory) -> Path:
    from pretrain.release.create import create

    return create(target_run, tmp_path_factory.mktemp("targets-rel") / "rel", name="targets", progress=False,
                  uncertainty="none")


def test_release_serves_charges_and_dipoles(target_release, qm_folder):
    from ase.io import read

    from data_pipeline import keys as K
    from data_pipeline.batch import atoms_batch, to_torch
    from pretrain.evaluate import evaluate
    from pretrain.release.calculator import MLIPCalculator
    from pretrain.release.loader import load_release

    release = target_release
    config = json.loads((release / "config.json").read_text())
    assert [(t["served_as"], t["unit"]) for t in config["targets"]] == [("charges", "e"), ("dipole", "e*A")]
    card = (release / "MODEL_CARD.md").read_text()
    assert "## Extra targets" in card and "`atoms.get_dipole_moment()`" in card
    assert "| charges | PBE/def2-SVP |" in card  # held-out rows
    frames = read(REPO / "data" / "qm" / "test" / "hcno-dft" / "g2-CO2.extxyz.xz", ":2")
    trained = load_release(release)
    for fid in ("GFN2-xTB", "PBE/def2-SVP"):
        calc = MLIPCalculator.from_release(release, fid, dtype="float64")
        atoms = frames[0].copy()
        atoms.info["charge"] = 0
        atoms.calc = calc
        q, mu = atoms.get_charges(), atoms.get_dipole_moment()
        assert q.shape == (3,) and abs(q.sum()) < 1e-12 and mu.shape == (3,)
        batch = to_torch(atoms_batch([atoms], trained.potential.cutoff, trained.table.index(fid), "float64"))
        with torch.enable_grad():
            out = trained.potential.double()(batch)
        assert np.allclose(q, out[K.extra("charges")].detach().numpy(), atol=1e-10)
        assert np.allclose(mu, out[K.extra("dipole")][0].detach().numpy(), atol=1e-10)
        many = calc.predict(frames)
        assert many[0]["charges"].shape == (3,) and many[1]["dipole"].shape == (3,)
        assert np.allclose(many[0]["dipole"], mu, atol=1e-8)
    from pretrain.release.verify import target_lines

    checked = target_lines(load_release(release).potential.double(), trained.table, config)
    assert [line.split(" (")[0] for line in checked] == ["targets: charges", "targets: dipole"]
    metrics = evaluate(load_release(release).potential, qm_folder, progress=False)
    for name in ("charges", "dipole"):
        rows = metrics["targets"][name]["fidelities"]
        assert set(rows) == {"GFN2-xTB", "PBE/def2-SVP"}
        assert all(r["rmse"] >= r["mae"] > 0 and r["ref_std"] > 0 for r in rows.values())


def test_ir_spectrum_of_a_held_out_molecule(target_release, tmp_path):
    """``release ir`` end to end (short MD: the tiny model's peaks are not the point here)."""
    from pretrain.release.spectra import SpectrumError, ir_spectrum

    reference = REPO / "data" / "qm" / "test" / "ir" / "g2-CO2.gfn2.json"
    result = ir_spectrum(target_release, reference, tmp_path, steps=200, equilibrate=20, runs=1, progress=False)
    saved = json.loads((tmp_path / "ir-g2-CO2.gfn2.json").read_text())
    assert saved["fidelity"] == "GFN2-xTB" and (tmp_path / "ir-g2-CO2.gfn2.png").is_file()
    assert [round(w) for w, _ in saved["reference"]["active_modes"]] == [601, 2594]  # bend (x2), asymmetric stretch
    assert len(result["md_vs_reference"]) == 2 and result["md"]["resolution_cm1"] == pytest.approx(333.56, rel=1e-3)
    assert all(w > 100 for w, _ in result["md"]["peaks"])
    from common.fidelities import FidelityError

    bad = tmp_path / "emt.json"
    bad.write_text(json.dumps({**json.loads(reference.read_text()), "fidelity": "EMT"}))
    with pytest.raises(FidelityError, match="fidelity 'EMT' is not one this model has"):
        ir_spectrum(target_release, bad, tmp_path, steps=10, runs=1, progress=False)
    bad.write_text(json.dumps({"fidelity": "GFN2-xTB"}))
    with pytest.raises(SpectrumError, match="emt.json: no 'numbers'"):
        ir_spectrum(target_release, bad, tmp_path, steps=10, runs=1, progress=False)


def test_eval_of_the_targets_on_two_ranks_equals_one(target_release, qm_folder, tmp_path):
    """Each rank scores its records; the sums are all-reduced and the parity points gathered."""
    from tests.pretrain.release.test_eval import _eval_rank

    (one,) = run_distributed(_eval_rank, 1, str(target_release), str(qm_folder), str(tmp_path / "one"))
    two, _ = run_distributed(_eval_rank, 2, str(target_release), str(qm_folder), str(tmp_path / "two"))
    for name, t in one["targets"].items():
        for fid, r in t["fidelities"].items():
            assert two["targets"][name]["fidelities"][fid]["items"] == r["items"]
            for key in ("mae", "rmse", "ref_rms", "ref_std"):
                assert two["targets"][name]["fidelities"][fid][key] == pytest.approx(r[key], rel=1e-6), (name, fid, key)
    assert (tmp_path / "two" / "parity-charges.png").is_file() and (tmp_path / "two" / "parity-dipole.png").is_file()
