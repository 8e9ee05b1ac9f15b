"""Per-structure conditioning and per-atom species embeddings.

A foundation model sees many levels of theory: a learned fidelity embedding conditions
every atom's scalar features, so one backbone can represent the systematic differences
between, e.g., PBE and r2SCAN while the heads stay per fidelity. Total charge and spin
multiplicity (molecular data) are embedded the same way; 0 means "unknown". Values
outside the embedded range are an :class:`InputRangeError` naming them, never clamped to
the nearest embedded value (that would silently predict another charge state).
"""

from __future__ import annotations

import torch
from torch import nn

MAX_Z = 118


class InputRangeError(ValueError):
    """A structure's charge, spin or element lies outside what the model embeds."""


class AtomEmbedding(nn.Module):
    """``numbers [N], fidelity [G], charge [G], spin [G], batch [N] -> [N, channels]``."""

    def __init__(self, channels: int, num_fidelities: int, max_charge: int = 10,
                 max_spin: int = 10):
        super().__init__()
        self.species = nn.Embedding(MAX_Z + 1, channels)
        self.fidelity = nn.Embedding(max(1, num_fidelities), channels)
        self.charge = nn.Embedding(2 * max_charge + 1, channels)
        self.spin = nn.Embedding(max_spin + 1, channels)
        self.max_charge, self.max_spin = max_charge, max_spin
        for emb in (self.fidelity, self.charge, self.spin):
            nn.init.normal_(emb.weight, std=0.1)

    def forward(self, numbers: torch.Tensor, fidelity: torch.Tensor, charge: torch.Tensor,
                spin: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        self._check(numbers, charge, spin)
        per_graph = self.fidelity(fidelity) + self.charge(charge + self.max_charge) + self.spin(spin)  # [G, C]
        return self.species(numbers) + per_graph[batch]  # [N, C]

    def _check(self, numbers, charge, spin) -> None:
        """One host sync per batch (the neighbour slots already sync once)."""
        ranges = (("charge", charge, -self.max_charge, self.max_charge, "structures"),
                  ("spin multiplicity", spin, 0, self.max_spin, "structures"),
                  ("atomic number", numbers, 1, MAX_Z, "atoms"))
        if torch.compiler.is_exporting():  # a traced program cannot branch on values: the
            return  # exported model's caller validates (pretrain/release/export.py documents it)
        outside = [(values < low) | (values > high) for _, values, low, high, _ in ranges]
        if not torch.stack([o.any() for o in outside]).any():
            return
        for (name, values, low, high, what), out in zip(ranges, outside):
            if out.any():
                where = torch.nonzero(out).flatten()[:5].tolist()
                raise InputRangeError(
                    f"{name} {sorted(set(values[out].tolist()))[:5]} is outside the model's range "
                    f"{low}..{high} ({what} {where} of the batch); fix or drop those structures "
                    "(0 means unknown charge or spin)")


class FidelityFiLM(nn.Module):
    """Fidelity conditioning inside the backbone: each layer's invariant channels scaled and
    shifted per fidelity, ``s -> s * (1 + gamma_f) + beta_f`` (``scalars [N, C]``,
    ``fidelity [N]`` per atom). Only invariants change, so equivariance holds; it starts as
    the identity (gamma = beta = 0), and a new fidelity's row starts there too.

    With ``model.fidelity_conditioning: layers`` every interaction layer has one, so levels
    of theory can differ in how atoms see their neighbours, not only in their readouts."""

    def __init__(self, num_fidelities: int, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max(1, num_fidelities), 2 * channels))  # [F, gamma | beta]

    def forward(self, scalars: torch.Tensor, fidelity: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.weight[fidelity].to(scalars.dtype).chunk(2, dim=-1)
        return scalars * (1 + gamma) + beta
