"""Measured size and cost of a model config: parameters and training FLOPs per atom.

This is the figure of a config without data (``mlip-pretrain model info``); a run counts
its own on its first batches in its loss mode (``pretrain/flops.py``), and that is what
its model card and a scaling study report. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one training step
with a force loss (forward, forces by autograd with ``create_graph``, backward of
energy + force loss: the double backward a conservative model pays), on a reference
structure: fcc Cu, a = 3.61 A, its 4-atom cubic cell under periodic boundaries, so every
atom has the neighbour count of a dense metal at the config's cutoff. Only the dense
operations the counter knows (matmul, einsum, bmm, convolutions) count; gathers,
scatters and elementwise ops do not, so this is a lower bound on arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.config import load_config
from models.build import ModelConfig, build_model

REFERENCE = "fcc Cu (a = 3.61 A, 4-atom cubic cell, periodic)"


def reference_batch(cutoff: float) -> dict[str, torch.Tensor]:
    """The reference structure as a float32 batch at ``cutoff``."""
    from ase.build import bulk  # noqa: PLC0415

    from data_pipeline.batch import atoms_batch, to_torch  # noqa: PLC0415 - the batch contract

    return to_torch(atoms_batch([bulk("Cu", "fcc", a=3.61, cubic=True)], cutoff, 0, "float32"))


def model_info(cfg: ModelConfig) -> dict:
    """Parameters, FLOPs per atom of one training step, and what they were measured on."""
    torch.manual_seed(0)
    model = build_model(cfg, ["reference"]).train()
    batch = reference_batch(cfg.cutoff)
    n_atoms, n_edges = len(batch["numbers"]), batch["edge_index"].shape[1]
    with FlopCounterMode(display=False) as counter:
        out = model(batch, forces=True, stress=False, create_graph=True)
        loss = out["energy"].pow(2).sum() + out["forces"].pow(2).sum()
        loss.backward()
    return {
        "family": cfg.family,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "train_flops_per_atom": counter.get_total_flops() / n_atoms,
        "neighbors_per_atom": n_edges / n_atoms,
        "reference": REFERENCE,
    }


def describe(path: str | Path, overrides: list[str] = ()) -> str:
    """A few lines of text for ``mlip-pretrain model info``."""
    cfg = load_config(ModelConfig, path, overrides)
    info = model_info(cfg)
    return (f"{Path(path).name}: {info['family']}, {info['parameters']:,} parameters "
            f"({info['parameters'] / 1e6:.2f} M; {info['trainable']:,} trainable)\n"
            f"training step (forward + forces + backward, force loss): "
            f"{info['train_flops_per_atom'] / 1e9:.3f} GFLOP per atom\n"
            f"measured on {info['reference']}, cutoff {cfg.cutoff:g} A: "
            f"{info['neighbors_per_atom']:.0f} neighbours per atom")
