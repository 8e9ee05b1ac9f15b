"""Radial features of an edge: a Bessel basis times a smooth polynomial cutoff.

The envelope goes to zero with its first two derivatives at the cutoff (it falls as
``(1 - x)^3`` there, whatever ``p``), so energy, forces and their first derivative stay
continuous as an atom crosses it (tested by the physics suite).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class BesselBasis(nn.Module):
    """``sqrt(2/r_c) * sin(n pi r / r_c) / r`` for n = 1..num_basis; ``[E] -> [E, num_basis]``."""

    def __init__(self, cutoff: float, num_basis: int = 8):
        super().__init__()
        self.cutoff = float(cutoff)
        self.register_buffer("freq", torch.arange(1, num_basis + 1) * math.pi / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        r = r.unsqueeze(-1)
        return math.sqrt(2.0 / self.cutoff) * torch.sin(self.freq.to(r.dtype) * r) / r


class PolynomialCutoff(nn.Module):
    """Envelope ``1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)``, ``x = r/r_c``,
    zero beyond the cutoff; ``[E] -> [E]``."""

    def __init__(self, cutoff: float, p: int = 6):
        super().__init__()
        self.cutoff, self.p = float(cutoff), p

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return polynomial_envelope(r / self.cutoff, self.p)


def polynomial_envelope(x: torch.Tensor, p: int = 6) -> torch.Tensor:
    """``1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)`` for ``x < 1``, else 0:
    1 at 0 with its first ``p - 1`` derivatives 0 there, and 0 with its first two
    derivatives at 1 (its slope is ``-p(p+1)(p+2)/2 x^(p-1) (1 - x)^2``)."""
    env = (1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1)
           - p * (p + 1) / 2 * x ** (p + 2))
    return env * (x < 1.0)


class RadialEmbedding(nn.Module):
    """Bessel basis x envelope: ``[E] distances -> [E, num_basis]`` smooth edge features."""

    def __init__(self, cutoff: float, num_basis: int = 8, p: int = 6):
        super().__init__()
        self.basis, self.envelope = BesselBasis(cutoff, num_basis), PolynomialCutoff(cutoff, p)
        self.num_basis = num_basis

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.basis(r) * self.envelope(r).unsqueeze(-1)


def mlp(sizes: list[int], act: type[nn.Module] = nn.SiLU, last_act: bool = False) -> nn.Sequential:
    """Plain MLP ``sizes[0] -> ... -> sizes[-1]`` with ``act`` between layers."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2 or last_act:
            layers.append(act())
    return nn.Sequential(*layers)
