"""Training FLOPs are measured on the run's own batches in its loss mode, recorded in every
checkpoint and used by the model card (not a dense fcc cell whatever the data)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed import run_distributed
from tests.pretrain.test_train import TINY_MODEL, _train, write_config


def test_flops_follow_the_loss_mode_and_the_data(built):
    from common.config import from_dict
    from common.fidelities import FidelityTable
    from data_pipeline.stream import LoaderConfig
    from models.build import ModelConfig, build_model
    from models.info import model_info
    from pretrain.flops import sample_batches, training_flops

    folder = built[1]
    table = FidelityTable.from_manifest(json.loads((folder / "manifest.json").read_text()))
    cfg = from_dict(LoaderConfig, {"folder": str(folder), "cutoff": 4.0, "sampler": {"max_atoms": 64}})
    batches = sample_batches(cfg, table.names, count=2)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**dict(TINY_MODEL, direct_forces=True)), table)
    conservative = training_flops(model, batches, forces=True, stress=False, direct=False)
    direct = training_flops(model, batches, forces=True, stress=False, direct=True)
    energy = training_flops(model, batches, forces=False, stress=False, direct=False)
    assert conservative["per_atom"] > direct["per_atom"] > 0 and conservative["per_atom"] > energy["per_atom"]
    assert conservative["atoms"] == sum(int(b["n_atoms"].sum()) for b in batches)
    edges = sum(b["edge_index"].shape[1] for b in batches) / conservative["atoms"]
    assert conservative["neighbors_per_atom"] == pytest.approx(edges)
    # the dense reference cell has another neighbour count, hence another cost per atom
    reference = model_info(ModelConfig(**TINY_MODEL))
    assert reference["neighbors_per_atom"] != pytest.approx(edges, rel=0.05)
    assert all(p.grad is None for p in model.parameters())  # weights and gradients untouched


def test_run_records_its_flops_and_the_card_reports_them(built, tmp_path):
    from pretrain.release.create import create

    cfg = write_config(tmp_path / "run.yaml", built[1], tmp_path / "run", steps=1)
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    step = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    flops = json.loads((step / "model.json").read_text())["flops"]
    assert flops["per_atom"] > 0 and flops["batches"] >= 1 and "forces by autograd" in flops["loss"]
    rel = create(tmp_path / "run", tmp_path / "rel", evaluate_held_out=False, progress=False)
    card = (rel / "MODEL_CARD.md").read_text()
    assert f"{flops['per_atom']:.4g} FLOP per atom" in card and "of the run's own batches" in card
