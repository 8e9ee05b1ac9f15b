"""Structures and a raw forward pass the release tests compare releases against."""

from __future__ import annotations

import torch


def raw_forward(trained, atoms, fid: str) -> dict:
    """The trained potential's own forward on ``atoms`` at ``fid`` (no calculator code)."""
    from data_pipeline.batch import atoms_batch, to_torch

    batch = to_torch(atoms_batch([atoms], trained.potential.cutoff, trained.table.index(fid), "float32"))
    with torch.enable_grad():
        out = trained.potential(batch, forces=True, stress=bool(atoms.pbc.all()), create_graph=False,
                                direct=trained.direct)
    return {k: v.detach().double().numpy() for k, v in out.items()}


def structures():
    """A rattled periodic Cu cell and a rattled Ni cluster in vacuum."""
    from ase.build import bulk

    cell = bulk("Cu", "fcc", a=3.62, cubic=True).repeat((2, 1, 1))
    cell.rattle(0.05, seed=1)
    cluster = bulk("Ni", "fcc", a=3.52, cubic=True)
    cluster.set_pbc(False)
    cluster.center(vacuum=3.0)
    cluster.rattle(0.05, seed=2)
    return cell, cluster
