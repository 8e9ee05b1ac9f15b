"""MACE-style backbone: e3nn spherical harmonics, radial-weighted tensor-product messages
and a higher-body-order product basis.

Per layer: node features ``h_j`` times the edge's spherical harmonics ``Y(r_ij)``, with
path weights from an MLP of the radial features (times a smooth cutoff), summed over
neighbours into the atomic basis ``A_i`` (two-body); then channel-wise products
``B_k = B_{k-1} (x) A`` for ``k = 2..correlation`` raise the body order to
``correlation + 1``; a linear map of ``sum_k B_k`` plus a self-connection gives the new
``h_i``. Irreps keep natural parity ``(-1)^l``.

``forward`` returns ``[n_atoms, 1 + 3 * (hidden_lmax >= 1), channels]``: index 0 the
invariant channels, indices 1-3 the l = 1 vectors when present (e3nn order).
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import nn

from models.layers.embedding import AtomEmbedding
from models.layers.radial import RadialEmbedding, mlp


def natural(channels: int, lmax: int) -> o3.Irreps:
    """``channels x (0e + 1o + 2e + ...)`` up to ``lmax``."""
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(lmax + 1)])


def _uvu(irreps_in: o3.Irreps, irreps_sh: o3.Irreps, lmax: int):
    """Output irreps and instructions of a channel-preserving ('uvu') conv tensor product."""
    out, instructions = [], []
    for i1, (mul, ir1) in enumerate(irreps_in):
        for i2, (_, ir2) in enumerate(irreps_sh):
            for ir in ir1 * ir2:
                if ir.l <= lmax and ir.p == (-1) ** ir.l:
                    instructions.append((i1, i2, len(out), "uvu", True))
                    out.append((mul, ir))
    return o3.Irreps(out), instructions


def _uuu(irreps: o3.Irreps, irreps_out: o3.Irreps):
    """Instructions of a channel-wise product ``irreps x irreps -> irreps_out``."""
    return [(i1, i2, o, "uuu", True)
            for i1, (_, ir1) in enumerate(irreps) for i2, (_, ir2) in enumerate(irreps)
            for o, (_, ir) in enumerate(irreps_out) if ir in ir1 * ir2]


class MACELayer(nn.Module):
    """One interaction + product-basis update: ``h [N, irreps_in] -> [N, irreps_out]``."""

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, irreps_sh: o3.Irreps,
                 channels: int, lmax_a: int, correlation: int, num_basis: int,
                 radial_hidden: int, avg_neighbors: float):
        super().__init__()
        self.avg_neighbors = avg_neighbors
        self.up = o3.Linear(irreps_in, irreps_in)
        irreps_mid, instructions = _uvu(irreps_in, irreps_sh, lmax_a)
        self.conv = o3.TensorProduct(irreps_in, irreps_sh, irreps_mid, instructions,
                                     shared_weights=False, internal_weights=False)
        self.radial = mlp([num_basis, radial_hidden, radial_hidden, self.conv.weight_numel])
        irreps_a = natural(channels, lmax_a)
        self.to_a = o3.Linear(irreps_mid, irreps_a)
        # intermediate products keep every degree (the next product needs them); the last
        # one only makes the degrees the layer outputs: the rest would be dropped anyway
        irreps_last = natural(channels, max(ir.l for _, ir in irreps_out))
        self.products = nn.ModuleList(
            o3.TensorProduct(irreps_a, irreps_a, irreps_last if k == correlation - 2 else irreps_a,
                             _uuu(irreps_a, irreps_last if k == correlation - 2 else irreps_a))
            for k in range(correlation - 1))
        self.out = o3.Linear(irreps_a, irreps_out)
        self.out_last = o3.Linear(irreps_last, irreps_out) if correlation > 1 else None
        self.skip = o3.Linear(irreps_in, irreps_out)

    def forward(self, h, i, j, sh, radial, envelope):
        weights = self.radial(radial) * envelope.unsqueeze(-1)  # 0 at the cutoff: smooth
        messages = self.conv(self.up(h)[j], sh, weights)  # [E, irreps_mid]
        a = torch.zeros(h.shape[0], messages.shape[1], dtype=h.dtype, device=h.device)
        a = self.to_a(a.index_add(0, i, messages) / self.avg_neighbors)  # two-body basis
        b, total = a, a
        for product in self.products[:-1]:  # body order +1 per product
            b = product(b, a)
            total = total + b
        out = self.out(total) + self.skip(h)
        if self.out_last is not None:
            out = out + self.out_last(self.products[-1](b, a))
        return out


class MACEBackbone(nn.Module):
    """Atoms + edge vectors -> equivariant node features (see the module docstring)."""

    def __init__(self, num_fidelities: int, cutoff: float = 6.0, channels: int = 64,
                 lmax: int = 3, hidden_lmax: int = 1, correlation: int = 3, layers: int = 2,
                 num_basis: int = 8, radial_hidden: int = 64, avg_neighbors: float = 30.0):
        super().__init__()
        self.channels, self.hidden_lmax = channels, hidden_lmax
        self.embed = AtomEmbedding(channels, num_fidelities)
        self.radial = RadialEmbedding(cutoff, num_basis)
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        self.sh = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
        hidden = natural(channels, hidden_lmax)
        irreps = [o3.Irreps(f"{channels}x0e")] + [hidden] * layers
        self.layers = nn.ModuleList(
            MACELayer(irreps[k], irreps[k + 1], self.irreps_sh, channels, lmax, correlation,
                      num_basis, radial_hidden, avg_neighbors) for k in range(layers))

    def forward(self, numbers, vectors, edge_index, batch, fidelity, charge, spin) -> torch.Tensor:
        i, j = edge_index
        r = vectors.norm(dim=-1)
        radial, envelope = self.radial(r), self.radial.envelope(r)
        sh = self.sh(vectors)  # [E, (lmax+1)^2]
        h = self.embed(numbers, fidelity, charge, spin, batch)  # [N, C] = C x 0e
        for layer in self.layers:
            h = layer(h, i, j, sh, radial, envelope)
        c = self.channels
        scalars = h[:, :c].unsqueeze(1)  # [N, 1, C]
        if self.hidden_lmax == 0:
            return scalars
        vectors_l1 = h[:, c:4 * c].view(-1, c, 3).transpose(1, 2)  # [N, 3, C]
        return torch.cat((scalars, vectors_l1), dim=1)
