"""Equivariant building blocks on spherical-harmonic features ``x [n, (lmax+1)^2, channels]``.

Features use e3nn's real spherical-harmonic basis, flattened by degree: component
``(l, m)`` sits at index ``l^2 + l + m``. In that basis a rotation about the y axis by
``a`` turns each pair ``(x_{l,-m}, x_{l,+m})`` by the angle ``m a`` (the same for every
``l``): the fact the SO(2) convolution of the eSEN/eSCN family is built on.
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import nn


def edge_frames(vectors: torch.Tensor) -> torch.Tensor:
    """Rotations ``R [E, 3, 3]`` with ``R @ y = vectors / |vectors|``.

    Built from cross products, not Euler angles: angles have a singular gradient for
    edges along the pole (every cubic crystal has such edges). The roll about the edge is
    arbitrary (a helper axis picks it); consumers must be roll-equivariant (SO(2) convs).
    """
    e = vectors / vectors.norm(dim=-1, keepdim=True)
    x_axis = torch.zeros_like(e)
    x_axis[:, 0] = 1.0
    z_axis = torch.zeros_like(e)
    z_axis[:, 2] = 1.0
    helper = torch.where((e[:, :1].abs() < 0.9), x_axis, z_axis)
    a = helper - (helper * e).sum(-1, keepdim=True) * e
    a = a / a.norm(dim=-1, keepdim=True)
    b = torch.cross(a, e, dim=-1)  # (a, e, b) is right-handed, like (x, y, z)
    return torch.stack((a, e, b), dim=-1)


class WignerD(nn.Module):
    """Block-diagonal Wigner matrices ``D(R) [E, (lmax+1)^2, (lmax+1)^2]`` of rotations R.

    ``D^l(R) = Y^l(R V)^T pinv(Y^l(V)^T)`` for fixed unit vectors ``V``: spherical
    harmonics are polynomials, so D is a polynomial in R's entries, smooth everywhere
    (``e3nn.o3.wigner_D`` goes through Euler angles instead). Checked against e3nn.
    """

    def __init__(self, lmax: int):
        super().__init__()
        self.lmax = lmax
        g = torch.Generator().manual_seed(0)
        points = torch.randn(4 * lmax + 4, 3, generator=g, dtype=torch.float64)
        self.register_buffer("points", points / points.norm(dim=-1, keepdim=True))
        for l in range(lmax + 1):
            y = o3.spherical_harmonics(l, self.points, normalize=False)  # [K, 2l+1]
            self.register_buffer(f"pinv{l}", torch.linalg.pinv(y.T))  # [K, 2l+1]

    def forward(self, R: torch.Tensor) -> torch.Tensor:
        dim = (self.lmax + 1) ** 2
        rotated = torch.einsum("eab,kb->eka", R, self.points.to(R.dtype))  # [E, K, 3]
        D = R.new_zeros(R.shape[0], dim, dim)
        for l in range(self.lmax + 1):
            y = o3.spherical_harmonics(l, rotated, normalize=False)  # [E, K, 2l+1]
            block = torch.einsum("ekm,kn->emn", y, getattr(self, f"pinv{l}").to(R.dtype))
            D[:, l * l:(l + 1) ** 2, l * l:(l + 1) ** 2] = block
        return D


def degrees(lmax: int) -> torch.Tensor:
    """``long [(lmax+1)^2]``: the degree l of each flat component (l^2 + l + m -> l)."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long) for l in range(lmax + 1)])


def m_indices(lmax: int, m: int) -> torch.Tensor:
    """Flat indices of component ``m`` (may be negative) for l = |m|..lmax."""
    return torch.tensor([l * l + l + m for l in range(abs(m), lmax + 1)], dtype=torch.long)


class SO2Conv(nn.Module):
    """Linear map on edge-frame features that commutes with rotations about the edge.

    For each order ``m <= mmax`` it mixes all degrees ``l >= m`` and channels: ``m = 0``
    with one matrix, and each pair ``(x_{-m}, x_{+m})`` as ``(A x_- + B x_+, A x_+ - B x_-)``,
    the most general linear map commuting with a 2-D rotation. Components with
    ``|m| > mmax`` are dropped (eSCN's truncation: the cost grows with mmax, not lmax).
    ``[E, (lmax+1)^2, c_in] -> [E, (lmax+1)^2, c_out]``; an optional per-edge scalar
    weight ``[E, c_in]`` (radial features) scales the input.
    """

    def __init__(self, lmax: int, mmax: int, c_in: int, c_out: int):
        super().__init__()
        self.lmax, self.mmax, self.c_in, self.c_out = lmax, mmax, c_in, c_out
        self.m0 = nn.Linear((lmax + 1) * c_in, (lmax + 1) * c_out)
        self.mixers = nn.ModuleList()
        for m in range(1, mmax + 1):
            n = lmax + 1 - m
            self.mixers.append(nn.Linear(n * c_in, 2 * n * c_out, bias=False))
            self.register_buffer(f"plus{m}", m_indices(lmax, m), persistent=False)
            self.register_buffer(f"minus{m}", m_indices(lmax, -m), persistent=False)
        self.register_buffer("zero", m_indices(lmax, 0), persistent=False)

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is not None:
            x = x * weight.unsqueeze(1)
        E = x.shape[0]
        n0 = self.lmax + 1  # explicit sizes: a batch may have no edges at all
        y0 = self.m0(x[:, self.zero].reshape(E, n0 * self.c_in)).view(E, n0, self.c_out)
        out = y0.new_zeros(E, (self.lmax + 1) ** 2, self.c_out)  # the mixers' dtype (bf16 under autocast)
        out[:, self.zero] = y0
        for m, mixer in enumerate(self.mixers, start=1):
            plus, minus = getattr(self, f"plus{m}"), getattr(self, f"minus{m}")
            n = len(plus)
            ap, bp = mixer(x[:, plus].reshape(E, n * self.c_in)).view(E, 2, n, self.c_out).unbind(1)
            am, bm = mixer(x[:, minus].reshape(E, n * self.c_in)).view(E, 2, n, self.c_out).unbind(1)
            out[:, minus] = am + bp  # A x_- + B x_+
            out[:, plus] = ap - bm  # A x_+ - B x_-
        return out


class SO3Linear(nn.Module):
    """Channel mixing per degree (equivariant): ``[n, (lmax+1)^2, c_in] -> [n, ..., c_out]``,
    bias on l = 0 only."""

    def __init__(self, lmax: int, c_in: int, c_out: int):
        super().__init__()
        self.lmax = lmax
        self.weight = nn.Parameter(torch.randn(lmax + 1, c_in, c_out) / c_in**0.5)
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.register_buffer("degree", degrees(lmax), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("nkc,kcd->nkd", x, self.weight[self.degree])
        out[:, 0] = out[:, 0] + self.bias
        return out


class GatedActivation(nn.Module):
    """SiLU on the l = 0 channels; l > 0 channels scaled by sigmoids of the l = 0 ones."""

    def __init__(self, lmax: int, channels: int):
        super().__init__()
        self.lmax = lmax
        self.gate = nn.Linear(channels, lmax * channels) if lmax > 0 else None
        # gate k scales degree k + 1: index the gates of components 1.. by degree - 1
        self.register_buffer("degree", degrees(lmax)[1:] - 1, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scalars = x[:, 0]
        if self.gate is None:
            return torch.nn.functional.silu(scalars).unsqueeze(1)
        gates = torch.sigmoid(self.gate(scalars)).view(x.shape[0], self.lmax, x.shape[2])  # [n, lmax, C]
        return torch.cat([torch.nn.functional.silu(scalars).unsqueeze(1),
                          x[:, 1:] * gates[:, self.degree]], dim=1)


class SO3Norm(nn.Module):
    """Equivariant RMS norm: each degree divided by its RMS over components and channels."""

    def __init__(self, lmax: int, channels: int, eps: float = 1e-6):
        super().__init__()
        self.lmax, self.eps = lmax, eps
        self.scale = nn.Parameter(torch.ones(lmax + 1, channels))
        self.register_buffer("degree", degrees(lmax), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.scale.dtype)  # norms in the weights' precision (fp32 under bf16 autocast)
        parts = []
        for l in range(self.lmax + 1):
            block = x[:, l * l:(l + 1) ** 2]
            if l == 0:
                block = block - block.mean(dim=-1, keepdim=True)
            rms = block.pow(2).mean(dim=(1, 2), keepdim=True).add(self.eps).sqrt()
            parts.append(block / rms)
        return torch.cat(parts, dim=1) * self.scale[self.degree]
