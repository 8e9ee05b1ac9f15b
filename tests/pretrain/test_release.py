"""Releases for real: a tiny run -> release create -> verify -> ASE calculator, tampering,
fidelities by name (eval folders in another order, init_from with new heads), eval on a
2-process group, ZeRO-3 direct-force releases and the MLflow model registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import write_recipe
from tests.distributed import run_distributed
from tests.pretrain.test_train import TINY_MODEL, _train, write_config

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


@pytest.fixture(scope="module")
def folder(built) -> Path:
    return built[1]


@pytest.fixture(scope="module")
def reversed_folder(ray_local, raw_root, tmp_path_factory) -> Path:
    """The session's raw data built with its sources (so its fidelities) in reverse order."""
    import yaml

    from data_pipeline.build import build
    from data_pipeline.build.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("reversed")
    path = write_recipe(tmp / "recipe.yaml", raw_root, shards=3)
    recipe = yaml.safe_load(path.read_text())
    first, second, third = recipe["sources"]  # EMT, EMT-asap, EMT
    recipe["sources"] = [second, first, third]
    path.write_text(yaml.safe_dump(recipe))
    build(load_recipe(path), tmp / "out", workers=2, progress=False)
    return tmp / "out"


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory) -> Path:
    """A tiny ZeRO-1 run with EMA, MLflow on (SQLite) and held-out eval data."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = write_config(tmp / "run.yaml", folder, tmp / "run", steps=6, eval={"folder": str(folder)},
                       tracking={"enabled": True, "experiment": "release-test"})
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    return tmp / "run"


@pytest.fixture(scope="module")
def release(run, tmp_path_factory) -> Path:
    from pretrain.release import create

    return create(run, tmp_path_factory.mktemp("rel") / "tiny", name="tiny-test", progress=False)


def _structures():
    from ase.build import bulk

    cell = bulk("Cu", "fcc", a=3.62, cubic=True).repeat((2, 1, 1))
    cell.rattle(0.05, seed=1)
    cluster = bulk("Ni", "fcc", a=3.52, cubic=True)
    cluster.set_pbc(False)
    cluster.center(vacuum=3.0)
    cluster.rattle(0.05, seed=2)
    return cell, cluster


def test_release_files_and_card(release, run):
    from models.release_format import FORMAT_VERSION, read_config

    names = sorted(p.name for p in release.iterdir())
    assert names == ["MODEL_CARD.md", "SHA256SUMS", "config.json", "metrics.json", "model.safetensors"]
    config = read_config(release)
    assert config["format_version"] == FORMAT_VERSION and config["weights"]["ema"] is True
    assert [f["name"] for f in config["fidelities"]] == ["EMT", "EMT-asap"]
    assert set(config["fidelities"][0]["elements"]) >= {"Cu"}
    card = (release / "MODEL_CARD.md").read_text()
    assert "Held-out metrics" in card and "Training FLOPs" in card and "Apache-2.0" in card
    assert "this is the training data" in card  # eval.folder is the training folder here
    assert not any(p.suffix == ".pt" for p in release.iterdir())  # no pickles


def test_verify_passes_and_matches_card(release, folder, capsys):
    from launch.cli import main

    assert main(["release", "verify", str(release), "--data", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "every check passed" in out and "physics: EMT" in out and "metrics: EMT forces_mae" in out


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "MODEL_CARD.md",
                                    "metrics.json", "SHA256SUMS"])
@pytest.mark.parametrize("damage", ["tamper", "delete"])
def test_tampered_release_is_caught(release, tmp_path, victim, damage, capsys):
    from launch.cli import main

    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    path = copy / victim
    if damage == "delete":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    assert main(["release", "verify", str(copy)]) != 0
    err = capsys.readouterr().err
    assert "FAILED" in err and (victim in err or "SHA256SUMS" in err)


def test_calculator_equals_trained_model(release, run):
    from models.calculator import MLIPCalculator
    from pretrain.trained import load_trained

    trained = load_trained(run)
    for atoms in _structures():
        for fid in ("EMT", "EMT-asap"):
            ref = trained.potential.evaluate([atoms], fid, stress=bool(atoms.pbc.all()))
            atoms.calc = MLIPCalculator.from_release(release, fidelity=fid)
            assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"][0]), rel=1e-6)
            np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=1e-5, atol=1e-6)
            if atoms.pbc.all():
                np.testing.assert_allclose(atoms.get_stress(), ref["stress"][0], rtol=1e-4, atol=1e-7)


def test_calculator_fidelity_selection_and_inputs(release):
    from data_pipeline.manifest import FidelityError
    from models.calculator import CoverageWarning, MLIPCalculator

    with pytest.raises(FidelityError, match=r"'PBE' is not in this release; available: \['EMT', 'EMT-asap'\]"):
        MLIPCalculator.from_release(release, fidelity="PBE")
    cell, cluster = _structures()
    a = MLIPCalculator.from_release(release, fidelity="EMT").predict([cell])[0]["energy"]
    b = MLIPCalculator.from_release(release, fidelity="EMT-asap").predict([cell])[0]["energy"]
    assert a != b  # two heads, two answers
    calc = MLIPCalculator.from_release(release, fidelity="EMT")
    with pytest.warns(CoverageWarning, match="O not in the 'EMT' training data"):
        from ase import Atoms
        calc.predict([Atoms("CuO", positions=[[0, 0, 0], [0, 0, 1.9]])])
    cluster.info["charge"] = 99
    with pytest.raises(ValueError, match="charge 99 outside"):
        calc.predict([cluster])


def test_predict_matches_single_points(release):
    from models.calculator import MLIPCalculator

    calc = MLIPCalculator.from_release(release, fidelity="EMT", dtype="float64")
    structures = list(_structures()) * 3
    batched = calc.predict(structures, max_atoms=40)
    for atoms, r in zip(structures, batched):
        atoms.calc = calc
        assert r["energy"] == pytest.approx(atoms.get_potential_energy(), rel=1e-10)
        np.testing.assert_allclose(r["forces"], atoms.get_forces(), atol=1e-9)


def test_bfgs_relaxation_and_nve_md(release):
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import BFGS

    from models.calculator import MLIPCalculator

    _, cluster = _structures()
    cluster.calc = MLIPCalculator.from_release(release, fidelity="EMT", dtype="float64")
    assert BFGS(cluster, logfile=None).run(fmax=0.01, steps=300)
    assert np.abs(cluster.get_forces()).max() < 0.01
    MaxwellBoltzmannDistribution(cluster, temperature_K=300, rng=np.random.default_rng(0))
    e0 = cluster.get_total_energy()
    energies = []
    dyn = VelocityVerlet(cluster, 0.5 * units.fs)
    dyn.attach(lambda: energies.append(cluster.get_total_energy()), interval=50)
    dyn.run(1000)
    drift = max(abs(e - e0) for e in energies) / len(cluster)
    assert drift < 1e-3, f"NVE energy drift {drift:.2e} eV/atom over 1000 steps"


def test_eval_folder_in_reverse_order_gives_same_metrics(release, folder, reversed_folder):
    from pretrain.evaluate import evaluate
    from pretrain.trained import load_trained

    manifest = json.loads((reversed_folder / "manifest.json").read_text())
    assert manifest["fidelities"] == ["EMT", "EMT-asap"][::-1]
    model = load_trained(release).potential
    a, b = evaluate(model, folder, progress=False), evaluate(model, reversed_folder, progress=False)
    assert a["fidelities"].keys() == b["fidelities"].keys()
    for fid, m in a["fidelities"].items():
        for key, value in m.items():
            assert b["fidelities"][fid][key] == pytest.approx(value, rel=1e-6), (fid, key)


def test_unknown_fidelity_in_data_is_an_error(release, tmp_path, ray_local, raw_root, capsys):
    import yaml

    from data_pipeline.build import build
    from data_pipeline.build.recipe import load_recipe
    from launch.cli import main

    path = write_recipe(tmp_path / "recipe.yaml", raw_root, shards=1)
    recipe = yaml.safe_load(path.read_text())
    recipe["sources"] = [dict(recipe["sources"][1], fidelity="r2SCAN")]
    path.write_text(yaml.safe_dump(recipe))
    build(load_recipe(path), tmp_path / "out", workers=1, progress=False)
    assert main(["eval", str(release), str(tmp_path / "out"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "'r2SCAN' not in the model, which has ['EMT', 'EMT-asap']" in err


def _eval_rank(rank, world, model, data, out):
    from launch.cli import main

    assert main(["eval", model, data, "--out", out]) == 0
    return json.loads(Path(out, "metrics.json").read_text()) if rank == 0 else None


def test_eval_cli_on_two_ranks_equals_one(release, folder, tmp_path):
    (one,) = run_distributed(_eval_rank, 1, str(release), str(folder), str(tmp_path / "one"))
    two, _ = run_distributed(_eval_rank, 2, str(release), str(folder), str(tmp_path / "two"))
    for fid, m in one["fidelities"].items():
        for key, value in m.items():
            assert two["fidelities"][fid][key] == pytest.approx(value, rel=1e-9), (fid, key)
    assert (tmp_path / "one" / "parity-EMT.png").stat().st_size > 1000


def test_init_from_release_adds_a_head_by_name(release, reversed_folder, tmp_path, ray_local, raw_root):
    """Fine-tune a release on data with a new fidelity: shared heads move by name, the new
    one starts fresh, and the run's table is the release's plus the new name."""
    import yaml

    from data_pipeline.build import build
    from data_pipeline.build.recipe import load_recipe
    from pretrain.trained import load_trained

    path = write_recipe(tmp_path / "recipe.yaml", raw_root, shards=2)
    recipe = yaml.safe_load(path.read_text())
    recipe["sources"] = [dict(recipe["sources"][1], fidelity="PBE"), recipe["sources"][1]]
    path.write_text(yaml.safe_dump(recipe))
    build(load_recipe(path), tmp_path / "data", workers=2, progress=False)
    cfg = write_config(tmp_path / "fine.yaml", tmp_path / "data", tmp_path / "fine", steps=1,
                       init_from=str(release), optim={"lr": 1e-12}, ema_decay=0.0)
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    tuned, base = load_trained(tmp_path / "fine"), load_trained(release)
    assert tuned.table.names == ["EMT", "EMT-asap", "PBE"]
    a, b = tuned.potential.state_dict(), base.potential.state_dict()
    hidden = TINY_MODEL["hidden"]
    torch.testing.assert_close(a["heads.out_w"][:2], b["heads.out_w"], atol=1e-9, rtol=0)
    torch.testing.assert_close(a["heads.hidden.weight"][:2 * hidden], b["heads.hidden.weight"], atol=1e-9, rtol=0)
    cell, _ = _structures()
    for fid in ("EMT", "EMT-asap"):  # lr 1e-12: the shared heads predict what they did
        assert float(tuned.potential.evaluate([cell], fid)["energy"][0]) == pytest.approx(
            float(base.potential.evaluate([cell], fid)["energy"][0]), rel=1e-6)


def test_zero3_direct_force_run_releases(folder, tmp_path):
    from models.calculator import MLIPCalculator
    from pretrain.release import create, verify
    from pretrain.trained import load_trained

    model = dict(TINY_MODEL, direct_forces=True, direct_stress=True)
    cfg = write_config(tmp_path / "z3.yaml", folder, tmp_path / "z3", model=model, steps=2,
                       engine={"zero_stage": 3, "forces": "direct"})
    run_distributed(_train, 2, str(cfg), [], timeout=300)
    rel = create(tmp_path / "z3", tmp_path / "rel", evaluate_held_out=False, progress=False)
    assert any("physics" in line for line in verify(rel))
    cell, _ = _structures()
    cell.calc = MLIPCalculator.from_release(rel, fidelity="EMT")
    trained = load_trained(tmp_path / "z3")
    assert trained.ema
    ref = trained.potential.evaluate([cell], "EMT")
    assert cell.get_potential_energy() == pytest.approx(float(ref["energy"][0]), rel=1e-6)


def test_release_registered_in_mlflow(release, run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (version,) = client.search_model_versions("name='tiny-test'")
    state = json.loads(sorted((run / "checkpoints").glob("step-*"))[-1].joinpath("trainer-rank00000.json").read_text())
    assert version.run_id == state["run_id"]
    assert any(k.startswith("heldout.EMT.forces_mae") for k in version.tags)
    files = {a.path for a in client.list_artifacts(version.run_id, "release")}
    assert "release/model.safetensors" in files
