"""Releases for real: a tiny run -> release create -> verify -> ASE calculator, tampering,
fidelities by name (eval folders in another order, init_from with new heads), eval on a
2-process group, ZeRO-3 direct-force releases and the MLflow model registry."""

from __future__ import annotations

import json
import os
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
    from pretrain.release.create import create

    return create(run, tmp_path_factory.mktemp("rel") / "tiny", name="tiny-test", progress=False)


def _raw(trained, atoms, fid: str) -> dict:
    """The trained potential's own forward on ``atoms`` at ``fid`` (no calculator code)."""
    from data_pipeline.batch import atoms_batch, to_torch

    batch = to_torch(atoms_batch([atoms], trained.potential.cutoff, trained.table.index(fid), "float32"))
    with torch.enable_grad():
        out = trained.potential(batch, forces=True, stress=bool(atoms.pbc.all()), create_graph=False,
                                direct=trained.direct)
    return {k: v.detach().double().numpy() for k, v in out.items()}


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
    from pretrain.release.format import FORMAT_VERSION, read_config

    names = sorted(p.name for p in release.iterdir())
    assert names == ["MODEL_CARD.md", "SHA256SUMS", "config.json", "metrics.json", "model.safetensors"]
    config = read_config(release)
    assert config["format_version"] == FORMAT_VERSION and config["weights"]["ema"] is True
    assert config["forces"] == "conservative"
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
    from pretrain.release import MLIPCalculator
    from pretrain.release.loader import load_model

    trained = load_model(run)
    for atoms in _structures():
        for fid in ("EMT", "EMT-asap"):
            ref = _raw(trained, atoms, fid)
            atoms.calc = MLIPCalculator.from_release(release, fidelity=fid)
            assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"][0]), rel=1e-6)
            np.testing.assert_allclose(atoms.get_forces(), ref["forces"], rtol=1e-5, atol=1e-6)
            if atoms.pbc.all():
                np.testing.assert_allclose(atoms.get_stress(), ref["stress"][0], rtol=1e-4, atol=1e-7)


def test_calculator_fidelity_selection_and_inputs(release):
    from common.fidelities import FidelityError
    from pretrain.release import CoverageError, CoverageWarning, MLIPCalculator

    with pytest.raises(FidelityError, match=r"'PBE' is not one this model has; it has \['EMT', 'EMT-asap'\]"):
        MLIPCalculator.from_release(release, fidelity="PBE")
    cell, cluster = _structures()
    a = MLIPCalculator.from_release(release, fidelity="EMT").predict([cell])[0]["energy"]
    b = MLIPCalculator.from_release(release, fidelity="EMT-asap").predict([cell])[0]["energy"]
    assert a != b  # two heads, two answers
    from ase import Atoms

    calc = MLIPCalculator.from_release(release, fidelity="EMT")
    oxide = Atoms("CuO", positions=[[0, 0, 0], [0, 0, 1.9]])
    with pytest.raises(CoverageError, match="O not in the 'EMT' training data .*no elemental reference"):
        calc.predict([oxide])  # refused by default: its total energy would lack O's reference
    with pytest.warns(CoverageWarning, match="O not in the 'EMT' training data"):
        MLIPCalculator.from_release(release, fidelity="EMT", coverage="warn").predict([oxide])
    cluster.info["charge"] = 99
    with pytest.raises(ValueError, match="charge 99 outside"):
        calc.predict([cluster])


def test_predict_matches_single_points(release):
    from pretrain.release import MLIPCalculator

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

    from pretrain.release import MLIPCalculator

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
    from pretrain.release.loader import load_model

    manifest = json.loads((reversed_folder / "manifest.json").read_text())
    assert manifest["fidelities"] == ["EMT", "EMT-asap"][::-1]
    model = load_model(release).potential
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
    from pretrain.release.loader import load_model

    path = write_recipe(tmp_path / "recipe.yaml", raw_root, shards=2)
    recipe = yaml.safe_load(path.read_text())
    recipe["sources"] = [dict(recipe["sources"][1], fidelity="PBE"), recipe["sources"][1]]
    path.write_text(yaml.safe_dump(recipe))
    build(load_recipe(path), tmp_path / "data", workers=2, progress=False)
    cfg = write_config(tmp_path / "fine.yaml", tmp_path / "data", tmp_path / "fine", steps=1,
                       init_from=str(release), optim={"lr": 1e-12}, ema_decay=0.0)
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    tuned, base = load_model(tmp_path / "fine"), load_model(release)
    assert tuned.table.names == ["EMT", "EMT-asap", "PBE"]
    a, b = tuned.potential.state_dict(), base.potential.state_dict()
    hidden = TINY_MODEL["hidden"]
    torch.testing.assert_close(a["heads.out_w"][:2], b["heads.out_w"], atol=1e-9, rtol=0)
    torch.testing.assert_close(a["heads.hidden.weight"][:2 * hidden], b["heads.hidden.weight"], atol=1e-9, rtol=0)
    cell, _ = _structures()
    for fid in ("EMT", "EMT-asap"):  # lr 1e-12: the shared heads predict what they did
        assert float(_raw(tuned, cell, fid)["energy"][0]) == pytest.approx(
            float(_raw(base, cell, fid)["energy"][0]), rel=1e-6)


def _train_keep_ema(rank: int, world: int, config: str):
    """Train; then this rank's EMA shadow as the trainer holds it in memory (whole
    parameters under ZeRO 0-2, this rank's flat partition of each under ZeRO-3), the
    parameters' names and shapes, and the last metrics."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from pretrain.config import load_train_config
    from pretrain.trainer import Trainer

    trainer = Trainer(load_train_config(config, []), rank, world, progress=False)
    metrics = trainer.run()
    params = list(trainer.engine.potential.named_parameters())
    shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in params}
    shadow = [s.numpy().copy() for s in trainer.ema.shadow]  # numpy: pickles whole
    return metrics, [n for n, _ in params], shapes, shadow


def _whole(results: list, zero3: bool) -> dict[str, np.ndarray]:
    """The EMA of every parameter from the ranks' in-memory shadows (ZeRO-3: each rank's
    partition in rank order, the padding of the last one dropped)."""
    _, names, shapes, _ = results[0]
    out = {}
    for k, name in enumerate(names):
        parts = [r[3][k].reshape(-1) for r in results] if zero3 else [results[0][3][k].reshape(-1)]
        size = int(np.prod(shapes[name]))
        out[name] = np.concatenate(parts)[:size].reshape(shapes[name])
    return out


@pytest.mark.parametrize("ranks,zero,forces", [(1, 1, "conservative"), (2, 3, "direct")])
def test_release_is_the_trainers_ema_and_evaluates_as_it_validated(folder, tmp_path, ranks, zero, forces):
    """The release holds exactly the trainer's EMA weights; it serves forces as the run
    trained them; ``eval`` of the release and its card give the trainer's last validation."""
    from safetensors.torch import load_file

    from launch.cli import main
    from pretrain.release import MLIPCalculator
    from pretrain.release.create import create
    from pretrain.release.loader import load_model
    from pretrain.release.verify import verify

    model = dict(TINY_MODEL, direct_forces=forces == "direct", direct_stress=forces == "direct",
                 learn_references=True)
    cfg = write_config(tmp_path / "run.yaml", folder, tmp_path / "run", model=model, steps=3,
                       engine={"zero_stage": zero, "forces": forces}, eval={"folder": str(folder)})
    results = run_distributed(_train_keep_ema, ranks, str(cfg), timeout=300)
    metrics, ema = results[0][0], _whole(results, zero == 3)
    rel = create(tmp_path / "run", tmp_path / "rel", progress=False)
    weights = load_file(str(rel / "model.safetensors"))
    assert "reference_shift" in ema  # learned references train a float32 shift
    for name, tensor in ema.items():
        assert torch.equal(weights[name], torch.from_numpy(tensor)), name
    # the learned references keep float64: the manifest's values exactly, plus the shift
    from ase.data import atomic_numbers

    from models.potential import reference_table

    manifest = json.loads((folder / "manifest.json").read_text())
    base = reference_table(["EMT", "EMT-asap"], {f: r["energies"] for f, r in manifest["element_references"].items()})
    assert weights["references"].dtype == torch.float64 and torch.equal(weights["references"], base)
    config = json.loads((rel / "config.json").read_text())
    shift = torch.from_numpy(ema["reference_shift"]).double()
    for f, entry in enumerate(config["fidelities"]):
        for element, value in entry["element_references"].items():
            z = atomic_numbers[element]
            assert value == float(base[f, z] + shift[f, z]), (entry["name"], element)
    card = json.loads((rel / "metrics.json").read_text())["fidelities"]
    assert config["forces"] == forces
    assert main(["eval", str(rel), str(folder), "--out", str(tmp_path / "eval")]) == 0
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())["fidelities"]
    for fid in ("EMT", "EMT-asap"):
        val = metrics[f"val/{fid}/forces_mae"]
        assert card[fid]["forces_mae"] == pytest.approx(val, rel=1e-5), (fid, card[fid], val)
        assert evaluated[fid]["forces_mae"] == pytest.approx(val, rel=1e-5), fid
    report = verify(rel)
    assert any(line.startswith("physics: EMT ") for line in report)
    assert any(line.startswith("direct vs conservative") for line in report) == (forces == "direct")
    cell, _ = _structures()
    cell.calc = MLIPCalculator.from_release(rel, fidelity="EMT")
    ref = _raw(load_model(rel), cell, "EMT")
    np.testing.assert_allclose(cell.get_forces(), ref["forces"], rtol=1e-5, atol=1e-6)
    assert "not the gradient of the energy" in (rel / "MODEL_CARD.md").read_text() or forces != "direct"


def test_release_registered_in_mlflow(release, run):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (version,) = client.search_model_versions("name='tiny-test'")
    state = json.loads(sorted((run / "checkpoints").glob("step-*"))[-1].joinpath("trainer-rank00000.json").read_text())
    assert version.run_id == state["run_id"]
    assert any(k.startswith("heldout.EMT.forces_mae") for k in version.tags)
    files = {a.path for a in client.list_artifacts(version.run_id, "release")}
    assert "release/model.safetensors" in files


def test_init_from_fits_references_of_elements_new_to_a_fidelity(release, folder, tmp_path):
    """A release whose EMT head never saw Au and Pt, fine-tuned on data with them: their
    references are fitted on the new data with the pretrained ones fixed (not left at 0),
    and the pretrained ones are kept."""
    from ase.data import atomic_numbers
    from safetensors.torch import load_file, save_file

    from pretrain.release.format import write_sums
    from pretrain.release.loader import load_model

    partial = tmp_path / "partial"
    shutil.copytree(release, partial)
    config = json.loads((partial / "config.json").read_text())
    dropped = ("Au", "Pt")
    for entry in config["fidelities"]:
        entry["elements"] = [e for e in entry["elements"] if e not in dropped]
        entry["element_references"] = {e: v for e, v in entry["element_references"].items() if e not in dropped}
    (partial / "config.json").write_text(json.dumps(config, indent=1))
    weights = load_file(str(partial / "model.safetensors"))
    for e in dropped:
        weights["references"][:, atomic_numbers[e]] = 0.0
    save_file(weights, str(partial / "model.safetensors"))
    (partial / "SHA256SUMS").unlink()
    write_sums(partial)
    cfg = write_config(tmp_path / "fine.yaml", folder, tmp_path / "fine", steps=1, init_from=str(partial),
                       optim={"lr": 1e-12}, ema_decay=0.0)
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    tuned, base = load_model(tmp_path / "fine"), load_model(partial)
    manifest = json.loads((folder / "manifest.json").read_text())
    f = tuned.table.index("EMT")
    for e in dropped:
        z = atomic_numbers[e]
        fitted, own = float(tuned.potential.reference_energies()[f, z]), manifest["element_references"]["EMT"]["energies"][e]
        assert fitted != 0.0 and abs(fitted - own) < 1e-3, (e, fitted, own)  # this data's own fit
        assert tuned.table.references["EMT"][e] == pytest.approx(fitted)
    for e in ("Cu", "Ni"):
        z = atomic_numbers[e]
        assert float(tuned.potential.reference_energies()[f, z]) == float(base.potential.reference_energies()[f, z])


def test_card_compares_content_not_paths_and_names_no_local_path(folder, tmp_path):
    """eval.folder is a copy of the training shards under another name: the card must
    still call it the training data; neither the card nor config.json names a local path."""
    from pretrain.release.create import create

    copy = tmp_path / "looks-held-out"
    shutil.copytree(folder, copy)
    cfg = write_config(tmp_path / "run.yaml", folder, tmp_path / "run", steps=2, eval={"folder": str(copy)})
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    rel = create(tmp_path / "run", tmp_path / "rel", progress=False)
    card = (rel / "MODEL_CARD.md").read_text()
    assert "this is the training data (same content hash)" in card
    for name in ("MODEL_CARD.md", "config.json", "metrics.json"):
        text = (rel / name).read_text()
        assert str(tmp_path) not in text and "/tmp/" not in text, name


def test_moved_run_folder_releases_or_says_how_in_one_line(run, tmp_path, capsys):
    """The run folder moved after training: its MLflow store is found beside it; where the
    store's artifact location is gone, create fails in one line and leaves no release;
    --no-register releases it."""
    from launch.cli import main

    moved = tmp_path / "moved-run"
    run.rename(moved)  # a real move: nothing is left at the path recorded at training time
    try:
        assert main(["release", "create", str(moved), "--out", str(tmp_path / "rel")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "was the run folder moved?" in err[0] and "--no-register" in err[0], err
        assert not (tmp_path / "rel").exists() and not list(tmp_path.glob(".rel*"))
        (moved / "mlflow.db").rename(moved / "elsewhere.db")
        assert main(["release", "create", str(moved), "--out", str(tmp_path / "rel")]) == 2
        assert "mlflow.db is not there" in capsys.readouterr().err
        (moved / "elsewhere.db").rename(moved / "mlflow.db")
        assert main(["release", "create", str(moved), "--out", str(tmp_path / "rel"), "--no-register"]) == 0
        assert (tmp_path / "rel" / "model.safetensors").is_file()
    finally:
        moved.rename(run)
