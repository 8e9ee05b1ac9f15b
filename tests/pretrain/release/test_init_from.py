"""``init_from`` a release: shared heads move by name, a new fidelity gets a new head, and an
element new to a pretrained fidelity gets a reference fitted on the new data."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import write_recipe
from tests.distributed import run_distributed
from tests.pretrain.release.structures import raw_forward, structures
from tests.pretrain.test_train import TINY_MODEL, _train, write_config

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


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
                       init_from=str(release), optim={"lr": 1e-12}, ema_decay=0.0, model=dict(TINY_MODEL, zbl=True))
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    tuned, base = load_model(tmp_path / "fine"), load_model(release)
    assert tuned.table.names == ["EMT", "EMT-asap", "PBE"]
    a, b = tuned.potential.state_dict(), base.potential.state_dict()
    hidden = TINY_MODEL["hidden"]
    torch.testing.assert_close(a["heads.out_w"][:2], b["heads.out_w"], atol=1e-9, rtol=0)
    torch.testing.assert_close(a["heads.hidden.weight"][:2 * hidden], b["heads.hidden.weight"], atol=1e-9, rtol=0)
    cell, _ = structures()
    for fid in ("EMT", "EMT-asap"):  # lr 1e-12: the shared heads predict what they did
        assert float(raw_forward(tuned, cell, fid)["energy"][0]) == pytest.approx(
            float(raw_forward(base, cell, fid)["energy"][0]), rel=1e-6)


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
                       optim={"lr": 1e-12}, ema_decay=0.0, model=dict(TINY_MODEL, zbl=True))
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


def test_a_changed_parameter_free_setting_is_said(release):
    """The prior has no weights, so a run may drop or add it over init_from; it is told."""
    import dataclasses

    from pretrain import init_from
    from pretrain.release.loader import load_model

    init = load_model(release)
    same = init_from.plan(init, init.table, None, init.model_cfg)
    assert same.changed == {} and len(same.lines()) == 1
    other = init_from.plan(init, init.table, None, dataclasses.replace(init.model_cfg, zbl=False))
    assert other.changed == {"zbl": (True, False)}
    assert "had model.zbl=True, this run has False" in other.lines()[-1]


def test_a_new_fidelity_with_replay_measures_forgetting(release, folder, coverage_built, tmp_path):
    """``init_from`` a release with data at a new fidelity (EMT-b) and replay of the release's
    own training shards: the replayed fidelity (EMT-asap, absent from the new data) is drawn,
    every head is evaluated on the replayed data's held-out folder before the first step and
    after the last, and the release card's section shows both."""
    from pretrain.checkpoint import trainer_state
    from pretrain.release.card import forgetting_lines
    from pretrain.weights import checkpoint_record, find_checkpoint

    out = tmp_path / "add"
    cfg = write_config(tmp_path / "add.yaml", coverage_built[1], out, steps=3, init_from=str(release),
                       ema_decay=0.0, model=dict(TINY_MODEL, zbl=True),
                       data={"folder": str(coverage_built[1]), "cutoff": 4.0, "stream": {"workers": 0},
                             "sampler": {"max_atoms": 48, "seed": 5},
                             "replay": {"folder": str(folder), "fraction": 0.5}},
                       eval={"replay_folder": str(folder)}, checkpoint={"every": 0, "keep": 1})
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    step = find_checkpoint(out / "checkpoints")
    record = checkpoint_record(step)
    assert record["replay"]["fraction"] == 0.5 and len(record["replay"]["parts"]) == 2
    assert trainer_state(step)["stream"]["atoms_seen"]["EMT-asap"] > 0  # only the replayed data has it
    before, after = record["forgetting"]["before"], record["forgetting"]["after"]
    for fid in ("EMT", "EMT-asap"):
        assert before[f"replay_before/{fid}/forces_mae"] > 0 and after[f"replay_after/{fid}/forces_mae"] > 0
    assert before["replay_before/EMT/forces_mae"] != after["replay_after/EMT/forces_mae"]  # it trained
    section = "\n".join(forgetting_lines(record))  # the release card's section
    assert "## Forgetting" in section and "50% of each epoch" in section
    row = next(ln for ln in section.splitlines() if ln.startswith("| EMT-asap |"))
    assert f"{1000 * before['replay_before/EMT-asap/forces_mae']:.2f}" in row
    assert f"{1000 * after['replay_after/EMT-asap/forces_mae']:.2f}" in row


def test_forgetting_needs_a_trained_model_to_start_from(tmp_path):
    from common.config import ConfigError
    from pretrain.config import load_train_config

    path = tmp_path / "c.yaml"
    path.write_text("data: {folder: x, cutoff: 5.0}\nmodel: {family: mace, cutoff: 5.0}\n")
    with pytest.raises(ConfigError, match="eval.replay_folder measures"):
        load_train_config(path, ["eval.replay_folder=y"])
