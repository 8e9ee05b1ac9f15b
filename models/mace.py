"""MACE-style backbone: e3nn spherical harmonics, radial-weighted tensor-product messages
and a higher-body-order product basis.

Per layer: node features ``h_j`` times the edge's spherical harmonics ``Y(r_ij)`` (times a
smooth cutoff), with path weights from an MLP of the radial features, summed over
neighbours into the atomic basis ``A_i`` (two-body, :class:`~models.layers.conv.EdgeConv`);
then channel-wise products ``B_k = B_{k-1} (x) A`` (:class:`ChannelProduct`) for
``k = 2..correlation`` raise the body order to ``correlation + 1``; a linear map of
``sum_k B_k`` plus a self-connection gives the new ``h_i``. Irreps keep natural parity
``(-1)^l``. Both replace e3nn ``TensorProduct``s with the same functions in fewer, larger
ops (a force loss differentiates every op twice; BENCHMARKS.md, "Models").

``forward`` returns ``[n_atoms, 1 + 3 * (hidden_lmax >= 1), channels]``: index 0 the
invariant channels, indices 1-3 the l = 1 vectors when present (e3nn order).
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers import cueq, slot_kernels
from models.layers.conv import (EdgeConv, Slots, conv_paths, from_components, neighbour_slots,
                                to_components, to_slots)
from models.layers.embedding import AtomEmbedding, FidelityFiLM
from models.layers.precision import full_precision
from models.layers.radial import RadialEmbedding, mlp


BLOCK_SLOTS = 2**17


def natural(channels: int, lmax: int) -> o3.Irreps:
    """``channels x (0e + 1o + 2e + ...)`` up to ``lmax``."""
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(lmax + 1)])


class ChannelProduct(nn.Module):
    """Channel-wise tensor product ``x [N, natural(C, l1max)] (x) y [N, natural(C, l2max)] ->
    [N, natural(C, lmax_out)]`` with one learned weight per path and channel.

    The function of e3nn's 'uuu' ``TensorProduct`` over every path (component normalisation:
    ``sqrt((2 l3 + 1) / paths into l3)``), computed as three ops instead of a few per path:
    the per-channel coupling ``W_c = w_c @ CG`` ``[C, K1*K2, K3]``, the outer product
    ``x_c y_c^T`` ``[N, C, K1*K2]`` and one ``bmm`` over channels.
    """

    def __init__(self, channels: int, l1max: int, l2max: int, lmax_out: int):
        super().__init__()
        self.l1max, self.l2max, self.lmax_out = l1max, l2max, lmax_out
        paths = conv_paths(l1max, l2max, lmax_out)  # the same parity-allowed (l1, l2, l3)
        into = [sum(1 for *_, l in paths if l == l3) for l3 in range(lmax_out + 1)]
        cg = torch.zeros(len(paths), (l1max + 1) ** 2, (l2max + 1) ** 2, (lmax_out + 1) ** 2,
                         dtype=torch.float64)
        for q, (l1, l2, l3) in enumerate(paths):
            cg[q, l1 * l1:(l1 + 1) ** 2, l2 * l2:(l2 + 1) ** 2, l3 * l3:(l3 + 1) ** 2] = (
                math.sqrt((2 * l3 + 1) / into[l3]) * o3.wigner_3j(l1, l2, l3, dtype=torch.float64))
        self.register_buffer("cg", cg.flatten(1).float())  # [paths, K1 * K2 * K3]
        # the fused CPU kernel's entries, from the buffer's numbers (not state)
        self.table = slot_kernels.product_table(self.cg.double().view(cg.shape))
        self.fused = True  # on that kernel where it applies (MACELayer: kernels "auto")
        self.paths = paths
        self.weight = nn.Parameter(torch.randn(len(paths), channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], self.weight.shape[1]
        k3 = (self.lmax_out + 1) ** 2
        x, y = to_components(x, c, self.l1max), to_components(y, c, self.l2max)  # [N, C, K]
        if self.fused and slot_kernels.usable(x, y, self.weight):  # no [N, C, K1 * K2] tensor
            ops = {"X": x.transpose(1, 2), "Y": y.transpose(1, 2), "W": self.weight}
            out = slot_kernels.product("O", self.table, ops)  # [N, K3, C]
            return from_components(out.transpose(1, 2), self.lmax_out)
        xy = (x.unsqueeze(3) * y.unsqueeze(2)).view(n, c, -1)  # [N, C, K1 * K2]
        with full_precision(xy):  # learned weights x CG in fp32; the contraction may be bf16
            coupling = (self.weight.T @ self.cg).view(c, xy.shape[2], k3)  # [C, K1 * K2, K3]
        out = torch.bmm(xy.transpose(0, 1), coupling)  # [C, N, K3]
        return from_components(out.transpose(0, 1), self.lmax_out)


def _linear(linear: o3.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` with ``x`` in the weights' dtype: some e3nn paths use ``tensordot``,
    which autocast does not cast (its matmul paths still run in bf16 under autocast)."""
    return linear(x.to(linear.weight.dtype))


class MACELayer(nn.Module):
    """One interaction + product-basis update: ``h [N, irreps_in] -> [N, irreps_out]``."""

    def __init__(self, irreps_in: o3.Irreps, irreps_out: o3.Irreps, irreps_sh: o3.Irreps,
                 channels: int, lmax_a: int, correlation: int, num_basis: int,
                 radial_hidden: int, avg_neighbors: float, kernels: str = "auto"):
        super().__init__()
        self.up = o3.Linear(irreps_in, irreps_in)
        self.conv = EdgeConv(channels, irreps_in.lmax, irreps_sh.lmax, lmax_a, avg_neighbors)
        # the same function on cuEquivariance kernels, sharing self.conv's parameters (no
        # state_dict entries of its own); "auto": only where the GPU kernels are installed,
        # and only for CUDA inputs (on CPU its fallback is slower than EdgeConv)
        self.kernels = kernels
        self.cueq = (cueq.CueqEdgeConv.from_edge_conv(self.conv)
                     if kernels == "cueq" or (kernels == "auto" and cueq.available("cuda")) else None)
        self.radial = mlp([num_basis, radial_hidden, radial_hidden, self.conv.weight_numel])
        irreps_a = natural(channels, lmax_a)
        # intermediate products keep every degree (the next product needs them); the last
        # one only makes the degrees the layer outputs: the rest would be dropped anyway
        irreps_last = natural(channels, irreps_out.lmax)
        self.products = nn.ModuleList(
            ChannelProduct(channels, lmax_a, lmax_a, irreps_out.lmax if k == correlation - 2 else lmax_a)
            for k in range(correlation - 1))
        for product in self.products:
            product.fused = kernels == "auto"
        self.out = o3.Linear(irreps_a, irreps_out)
        self.out_last = o3.Linear(irreps_last, irreps_out) if correlation > 1 else None
        self.skip = o3.Linear(irreps_in, irreps_out)

    def forward(self, h, slots, sh, radial):
        """``sh`` (spherical harmonics times the cutoff envelope: 0 at the cutoff, smooth) and
        ``radial`` per slot of ``slots`` (:func:`~models.layers.conv.neighbour_slots`)."""
        fast = self.cueq is not None and (self.kernels == "cueq" or h.is_cuda)
        conv = self.cueq if fast else self.conv
        hu = _linear(self.up, h)
        if slots.plans is not None:
            # fused CPU kernels; the radial MLP runs per block (recomputed in the backward of
            # a graph of several blocks: models/layers/slot_kernels.py)
            a = self.conv(hu, sh, radial, slots, self.radial)
        else:
            a = conv(hu, sh, self.radial(radial), slots)  # [N, irreps_a] two-body basis
        # a graph of several blocks keeps only the products' inputs (their [N, C, K1 * K2]
        # outer products are 8x larger) and recomputes the rest in the backward
        lean = slots.plans is not None and len(slots.plans) > 1 and torch.is_grad_enabled()

        def product(k, x, y):
            return checkpoint(self.products[k], x, y, use_reentrant=False) if lean else self.products[k](x, y)

        b, total = a, a
        for k in range(len(self.products) - 1):  # body order +1 per product
            b = product(k, b, a)
            total = total + b
        out = _linear(self.out, total) + _linear(self.skip, h)
        if self.out_last is not None:
            out = out + _linear(self.out_last, product(-1, b, a))
        return out


class MACEBackbone(nn.Module):
    """Atoms + edge vectors -> equivariant node features (see the module docstring)."""

    def __init__(self, num_fidelities: int, cutoff: float = 6.0, channels: int = 64,
                 lmax: int = 3, hidden_lmax: int = 1, correlation: int = 3, layers: int = 2,
                 num_basis: int = 8, radial_hidden: int = 64, avg_neighbors: float = 30.0,
                 kernels: str = "auto", conditioning: str = "input"):
        super().__init__()
        self.channels, self.hidden_lmax, self.kernels = channels, hidden_lmax, kernels
        # edges per block of the fused CPU kernels: a graph of more (a few thousand atoms
        # and up) recomputes each block's radial weights and products in the backward
        self.block_slots = BLOCK_SLOTS
        self.embed = AtomEmbedding(channels, num_fidelities)
        self.radial = RadialEmbedding(cutoff, num_basis)
        self.irreps_sh = o3.Irreps.spherical_harmonics(lmax)
        self.sh = o3.SphericalHarmonics(self.irreps_sh, normalize=True, normalization="component")
        hidden = natural(channels, hidden_lmax)
        irreps = [o3.Irreps(f"{channels}x0e")] + [hidden] * layers
        self.layers = nn.ModuleList(
            MACELayer(irreps[k], irreps[k + 1], self.irreps_sh, channels, lmax, correlation,
                      num_basis, radial_hidden, avg_neighbors, kernels) for k in range(layers))
        # "layers": every layer's invariants conditioned on the fidelity (models/layers/embedding.py)
        self.film = (nn.ModuleList(FidelityFiLM(num_fidelities, channels) for _ in range(layers))
                     if conditioning == "layers" else None)

    def forward(self, numbers, vectors, edge_index, batch, fidelity, charge, spin) -> torch.Tensor:
        i, j = edge_index[0], edge_index[1]
        if self.kernels == "auto" and slot_kernels.usable(vectors):  # fused CPU kernels
            order, _, plans = slot_kernels.layout(i, j, numbers.shape[0], self.block_slots)
            slots = Slots(order, j[order], 0, plans=plans)  # compact: no padded slots
        else:
            slots = neighbour_slots(i, j, numbers.shape[0])
        with full_precision(vectors):  # geometry never in bf16 (models/layers/precision.py)
            r = vectors.norm(dim=-1)
            radial = to_slots(self.radial(r), slots)  # [N*D, num_basis]
            # the envelope on Y, not on each layer's [E, paths * C] weights: messages are
            # linear in both, and Y is 16 numbers per edge
            sh = to_slots(self.sh(vectors) * self.radial.envelope(r).unsqueeze(-1), slots)  # [N*D, M]
        h = self.embed(numbers, fidelity, charge, spin, batch)  # [N, C] = C x 0e
        c = self.channels
        for k, layer in enumerate(self.layers):
            h = layer(h, slots, sh, radial)
            if self.film is not None:  # the first C entries are the 0e channels
                h = torch.cat((self.film[k](h[:, :c], fidelity[batch]), h[:, c:]), dim=1)
        scalars = h[:, :c].unsqueeze(1)  # [N, 1, C]
        if self.hidden_lmax == 0:
            return scalars
        vectors_l1 = h[:, c:4 * c].view(-1, c, 3).transpose(1, 2)  # [N, 3, C]
        return torch.cat((scalars, vectors_l1), dim=1)
