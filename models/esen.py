"""eSEN/eSCN-style backbone: messages computed in each edge's own frame with SO(2) convs.

Per edge, the features of both atoms are rotated so the edge points along y (Wigner
matrices of a frame built from the edge vector), mixed by SO(2) convolutions whose input
is scaled by radial features, gated, and rotated back. In the edge frame a full SO(3)
tensor product reduces to independent linear maps per order m, so the cost grows as
``lmax * mmax`` instead of ``lmax^6``: the reason this family scales in lmax and channels.

``forward`` returns node features ``[n_atoms, (lmax+1)^2, channels]``: index 0 holds
invariant scalars (the energy head's input) and indices 1-3 the l = 1 vectors (a direct
force head's input).
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.embedding import AtomEmbedding, FidelityFiLM
from models.layers.precision import full_precision
from models.layers.radial import RadialEmbedding, mlp
from models.layers.so3 import GatedActivation, SO2Conv, SO3Linear, SO3Norm, WignerD, edge_frames


class ESENBlock(nn.Module):
    """Edge-frame message passing, then a gated feed-forward, each with a residual."""

    def __init__(self, lmax: int, mmax: int, channels: int, hidden: int, num_basis: int,
                 avg_neighbors: float):
        super().__init__()
        self.avg_neighbors = avg_neighbors
        self.norm1, self.norm2 = SO3Norm(lmax, channels), SO3Norm(lmax, channels)
        self.radial = mlp([num_basis, hidden, 2 * channels])
        self.conv1 = SO2Conv(lmax, mmax, 2 * channels, hidden)
        self.act1 = GatedActivation(lmax, hidden)
        self.conv2 = SO2Conv(lmax, mmax, hidden, channels)
        self.ffn_in = SO3Linear(lmax, channels, hidden)
        self.act2 = GatedActivation(lmax, hidden)
        self.ffn_out = SO3Linear(lmax, hidden, channels)

    def forward(self, x, i, j, D, radial, envelope):
        h = self.norm1(x)
        pair = torch.cat((h[i], h[j]), dim=-1)  # [E, K, 2C]
        with full_precision(D):  # rotations are geometry: fp32 (models/layers/precision.py)
            pair = torch.einsum("eba,ebc->eac", D, pair.to(D.dtype))  # into the edge frame: D^T x
        m = self.conv2(self.act1(self.conv1(pair, self.radial(radial))))
        with full_precision(D):
            m = torch.einsum("eab,ebc->eac", D, m.to(D.dtype)) * envelope[:, None, None]  # back; 0 at cutoff
        x = x + torch.zeros_like(x).index_add_(0, i, m) / self.avg_neighbors
        return x + self.ffn_out(self.act2(self.ffn_in(self.norm2(x))))


class ESENBackbone(nn.Module):
    """Atoms + edge vectors -> equivariant node features (see the module docstring)."""

    def __init__(self, num_fidelities: int, cutoff: float = 6.0, channels: int = 64,
                 hidden: int = 64, lmax: int = 2, mmax: int = 1, layers: int = 2,
                 num_basis: int = 8, avg_neighbors: float = 30.0, conditioning: str = "input"):
        super().__init__()
        if not 0 <= mmax <= lmax:
            raise ValueError(f"mmax must be within 0..lmax={lmax}, got {mmax}")
        self.lmax, self.channels = lmax, channels
        self.embed = AtomEmbedding(channels, num_fidelities)
        self.radial = RadialEmbedding(cutoff, num_basis)
        self.wigner = WignerD(lmax)
        self.blocks = nn.ModuleList(
            ESENBlock(lmax, mmax, channels, hidden, num_basis, avg_neighbors) for _ in range(layers))
        self.out_norm = SO3Norm(lmax, channels)
        # "layers": every block's invariants conditioned on the fidelity (models/layers/embedding.py)
        self.film = (nn.ModuleList(FidelityFiLM(num_fidelities, channels) for _ in range(layers))
                     if conditioning == "layers" else None)

    def forward(self, numbers, vectors, edge_index, batch, fidelity, charge, spin) -> torch.Tensor:
        i, j = edge_index
        with full_precision(vectors):  # geometry never in bf16 (models/layers/precision.py)
            r = vectors.norm(dim=-1)
            radial = self.radial(r)  # [E, num_basis]
            envelope = self.radial.envelope(r)  # [E]
            D = self.wigner(edge_frames(vectors))  # [E, K, K]
        x = vectors.new_zeros(numbers.shape[0], (self.lmax + 1) ** 2, self.channels)
        x[:, 0] = self.embed(numbers, fidelity, charge, spin, batch)
        for k, block in enumerate(self.blocks):
            x = block(x, i, j, D, radial, envelope)
            if self.film is not None:
                x = torch.cat((self.film[k](x[:, 0], fidelity[batch]).unsqueeze(1), x[:, 1:]), dim=1)
        return self.out_norm(x)
