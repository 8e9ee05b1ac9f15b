"""Training FLOPs per atom, measured on a sample of the run's own batches in its loss mode.

FLOPs per atom depend on the data (a molecule's atoms have ~10x fewer neighbours within
the cutoff than a dense metal's) and on the loss mode (forces by autograd with
``create_graph`` pay a double backward; direct heads do not; an energy-only loss needs no
force pass). So the figure a run reports (its model card, a scaling study's C = FLOPs per
atom x atoms seen, the compute frontier) is counted by
``torch.utils.flop_counter.FlopCounterMode`` over one training step's forward, derivatives
and backward on the first batches the run's sampler plans (epoch 0, as one rank of one:
the run's atom budget, its data mix). Only the dense operations the counter knows
(matmul, einsum, bmm, convolutions) count; gathers, scatters and elementwise ops do not,
so this is a lower bound on arithmetic. ``mlip-pretrain model info`` reports a config's
cost on a fixed reference cell instead (``models/info.py``), when there is no data.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.flop_counter import FlopCounterMode

from data_pipeline import keys as K
from data_pipeline.batch import to_torch

SAMPLE_BATCHES = 4  # batches counted: enough to mix the data's groups, cheap next to a run


def sample_batches(loader_cfg, fidelities: list[str], count: int = SAMPLE_BATCHES) -> list[dict]:
    """The first ``count`` batches the run's sampler plans for epoch 0 (one rank of one),
    built as training builds them."""
    from data_pipeline.stream.collate import BatchBuilder  # noqa: PLC0415
    from data_pipeline.stream.sampler import AtomBudgetSampler  # noqa: PLC0415

    builder = BatchBuilder(loader_cfg.folder, loader_cfg.cutoff, loader_cfg.float_dtype, fidelities)
    # the atom budget plans the batches; an edge budget would need the whole edge-count pass
    sampler_cfg = dataclasses.replace(loader_cfg.sampler, max_edges=None)
    sampler = AtomBudgetSampler.from_dataset(builder.dataset, sampler_cfg)
    return [to_torch(builder(sampler.batch(k))) for k in range(min(count, sampler.steps_per_epoch))]


def training_flops(potential: torch.nn.Module, batches: list[dict], forces: bool, stress: bool,
                   direct: bool) -> dict:
    """FLOPs per atom of a training step of ``potential`` on ``batches``: forward, forces
    and stress as the loss needs them (``direct``: from the direct heads) and the backward
    of a loss on them. The weights are not changed; their gradients are cleared."""
    device = next(potential.parameters()).device
    was_training = potential.training
    potential.train()
    atoms = edges = 0
    try:
        with FlopCounterMode(display=False) as counter:
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                out = potential(batch, forces=forces, stress=stress, create_graph=not direct,
                                direct=direct)
                loss = sum(v.double().pow(2).sum() for v in out.values())
                loss.backward()
                atoms += int(batch[K.N_ATOMS].sum())
                edges += int(batch[K.EDGE_INDEX].shape[1])
    finally:
        potential.zero_grad(set_to_none=True)
        potential.train(was_training)
    mode = ("direct heads" if direct else "autograd (double backward)") if forces else "energy only"
    return {"per_atom": counter.get_total_flops() / max(atoms, 1), "atoms": atoms,
            "neighbors_per_atom": edges / max(atoms, 1), "batches": len(batches),
            "loss": f"energy{' + forces' if forces else ''}{' + stress' if stress else ''}, forces by {mode}"}


def run_flops(cfg, potential: torch.nn.Module, fidelities: list[str]) -> dict:
    """:func:`training_flops` of a training config's run on its own first batches."""
    batches = sample_batches(cfg.data, fidelities)
    return training_flops(potential, batches, forces=cfg.loss.forces > 0, stress=cfg.loss.stress > 0,
                          direct=cfg.engine.forces == "direct")
