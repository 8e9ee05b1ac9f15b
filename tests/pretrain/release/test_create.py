"""``release create`` and ``verify`` for real: the files and card of a tiny run's release, tampering
caught, the release equal to the trainer's EMA and evaluating as it validated (ZeRO-1
conservative, ZeRO-3 direct), the card by content hash, a moved run folder, the MLflow
model registry."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.pretrain.release.structures import raw_forward, structures
from tests.pretrain.test_train import TINY_MODEL, _train, write_config

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def test_release_files_and_card(release, run, folder):
    from pretrain.release.format import FORMAT_VERSION, read_config

    names = sorted(p.name for p in release.iterdir())
    assert names == ["MODEL_CARD.md", "SHA256SUMS", "config.json", "metrics.json", "model.safetensors",
                     "reliability.png", "robustness.json", "robustness.png"]
    config = read_config(release)
    assert config["format_version"] == FORMAT_VERSION and config["weights"]["ema"] is True
    assert config["forces"] == "conservative"
    assert [f["name"] for f in config["fidelities"]] == ["EMT", "EMT-asap"]
    assert set(config["fidelities"][0]["elements"]) >= {"Cu"}
    card = (release / "MODEL_CARD.md").read_text()
    assert "Held-out metrics" in card and "Training FLOPs" in card and "Apache-2.0" in card
    assert "this is the training data" in card  # eval.folder is the training folder here
    assert not any(p.suffix == ".pt" for p in release.iterdir())  # no pickles
    _assert_card_names_coverage(card, folder)


def _assert_card_names_coverage(card: str, folder) -> None:
    """The known limits name each fidelity's rare elements and nearest-distance range, as
    the training manifest's coverage says (the card gets it from the checkpoint's record)."""
    from data_pipeline.coverage_report import counts_text, known_limits
    from data_pipeline.manifest import read_manifest

    for fid, lim in known_limits(read_manifest(folder)["coverage"]).items():
        line = next(ln for ln in card.splitlines() if ln.startswith(f"  - {fid}:"))
        assert f"rare elements {counts_text(lim['rare_elements'], 20)};" in line
        lo, hi = lim["nearest_distance"]
        assert f"nearest-neighbour distance {lo:.4g} to {hi:.4g} A" in line


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
                 learn_references=True, zbl=True)
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
    cell, _ = structures()
    cell.calc = MLIPCalculator.from_release(rel, fidelity="EMT")
    ref = raw_forward(load_model(rel), cell, "EMT")
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


def test_card_states_the_overlap_of_held_out_and_training_data(release):
    """The fixture's run evaluates on its own training folder: the card must say so."""
    metrics = json.loads((release / "metrics.json").read_text())
    leak = metrics["leakage"]
    assert leak["leaked_same_fidelity"] == metrics["data"]["records"]
    card = (release / "MODEL_CARD.md").read_text()
    assert "### Overlap with the training data" in card
    assert f"**{leak['leaked_same_fidelity']} held-out structures are in the training data" in card
