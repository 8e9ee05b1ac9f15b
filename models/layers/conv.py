"""Edge convolution of the MACE-style backbone: radial-weighted Clebsch-Gordan messages.

For each path ``(l1, l2, l3)`` (node feature degree, spherical-harmonic degree, output
degree; ``l1 + l2 + l3`` even keeps natural parity) and channel ``c``, edge ``i <- j``
sends ``w[e, path, c] * sqrt(2 l3 + 1) * C^{l1 l2 l3} h_j[l1, c] Y_l2(r_ij)``; messages
are summed over each receiver's neighbours, then one linear map per output degree mixes
channels and paths. This is the function of e3nn's 'uvu' ``TensorProduct`` (component
normalisation, element path normalisation) followed by an ``o3.Linear``, computed another way.

Why not e3nn's: it slices the per-edge weights once per path and the inputs once per
irrep, and each slice's backward zero-fills a tensor the size of the whole input; a force
loss pays that twice (backward and double backward). Here the work is a few large ops, and
the sum over neighbours happens inside a batched matmul instead of an ``index_add`` over a
``[E, C, paths x (2 l3 + 1)]`` message tensor (on CPU every pass over that tensor is
memory-bound and costs as much as the matmuls):

1. edges are laid out per receiver in ``[N, D]`` slots (:func:`neighbour_slots`, ``D`` the
   largest neighbour count in the batch; empty slots have ``Y = 0``);
2. per input degree ``l1``, ``X[slot, m1, path, c] = h_j[l1 m1, c] * w[slot, path, c]``
   (one broadcast multiply) and the slot's coupling ``A = Y @ CG`` (a constant tensor);
3. ``A^T X`` per receiver (one ``bmm``) contracts slots, ``m1`` and paths at once:
   ``[N, columns, C]``, the neighbour sum included.

On CPU (float32/64, ``kernels: auto``) :meth:`EdgeConv.fused` computes the same sums with
the C++ kernels of :mod:`~models.layers.slot_kernels` instead: per slot and channel they
loop over the nonzero couplings, so neither ``X`` nor ``A`` is written (2.3-2.6x faster
force calls, BENCHMARKS.md "Speed and memory"); the steps above stay the path for GPUs,
bf16 and ``torch.export``.

Cost of the padding: ``N * D`` slots for ``E`` edges (dense metals: ~1% more; a batch that
mixes molecules with bulk pays up to the ratio of its largest to its mean neighbour count).
Node features use e3nn's flat layout of ``natural(C, l)`` irreps on both sides.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from e3nn import o3
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers import slot_kernels
from models.layers.precision import full_precision


class Slots(NamedTuple):
    """Edges laid out per receiver: slot ``n * width + d`` is receiver ``n``'s d-th edge."""

    edge: torch.Tensor
    """``long [N * width]``: the edge in each slot; ``E`` (one past the last) where empty."""
    sender: torch.Tensor
    """``long [N * width]``: the sending atom ``j`` of each slot; 0 where empty."""
    width: int
    """Slots per receiver: the largest neighbour count (at least 1); 0 in the compact layout."""
    plans: list | None = None
    """The fused CPU kernels' blocks (:func:`~models.layers.slot_kernels.layout`), or None
    (the torch ops). With plans the layout is compact: ``edge [E]`` lists the edges sorted by
    receiver, no padding (``width`` 0)."""


def neighbour_slots(i: torch.Tensor, j: torch.Tensor, n_nodes: int) -> Slots:
    """Per-receiver slots of edges ``j -> i`` (any edge order; stable within a receiver)."""
    # not bincount: its length depends on the data (max(i) + 1), which torch.export cannot bound
    counts = torch.zeros(n_nodes, dtype=torch.long, device=i.device).index_add_(0, i, torch.ones_like(i))
    # a host sync on GPU, once per batch; under torch.export an unbacked size (>= 1: an empty
    # edge list still gets one slot per receiver), so one exported graph serves any batch
    width = counts.max().clamp_min(1).item()
    torch._check(width >= 1)
    order = torch.argsort(i, stable=True)
    first = torch.cumsum(counts, 0) - counts  # first sorted position of each receiver
    rank = torch.arange(i.numel(), device=i.device) - first[i[order]]
    slot = i[order] * width + rank
    edge = torch.full((n_nodes * width,), i.numel(), dtype=torch.long, device=i.device)
    edge[slot] = order
    sender = torch.zeros(n_nodes * width, dtype=torch.long, device=i.device)
    sender[slot] = j[order]
    return Slots(edge, sender, width)


def to_slots(x: torch.Tensor, slots: Slots) -> torch.Tensor:
    """Per-edge ``[E, ...]`` -> per-slot ``[N * width, ...]``, zeros in empty slots."""
    return torch.cat([x, x.new_zeros(1, *x.shape[1:])]).index_select(0, slots.edge)


def to_components(x: torch.Tensor, channels: int, lmax: int) -> torch.Tensor:
    """e3nn flat ``[N, natural(C, lmax)]`` (per degree ``[c, m]``) -> ``[N, C, (lmax+1)^2]``."""
    n, c = x.shape[0], channels
    return torch.cat([x[:, c * l * l:c * (l + 1) ** 2].view(n, c, 2 * l + 1)
                      for l in range(lmax + 1)], dim=2)


def from_components(x: torch.Tensor, lmax: int) -> torch.Tensor:
    """``[N, C, (lmax+1)^2]`` -> e3nn flat ``[N, natural(C, lmax)]``."""
    n = x.shape[0]
    return torch.cat([x[:, :, l * l:(l + 1) ** 2].reshape(n, -1) for l in range(lmax + 1)], dim=1)


def conv_paths(lmax_in: int, lmax_sh: int, lmax_out: int) -> list[tuple[int, int, int]]:
    """Paths ``(l1, l2, l3)``, ordered by ``l1``, then ``l3``, then ``l2``."""
    return [(l1, l2, l3) for l1 in range(lmax_in + 1) for l3 in range(lmax_out + 1)
            for l2 in range(lmax_sh + 1) if abs(l1 - l2) <= l3 <= l1 + l2 and (l1 + l2 + l3) % 2 == 0]


class EdgeConv(nn.Module):
    """``h [N, natural(C, lmax_in)]``, slot harmonics ``Y [N*D, (lmax_sh+1)^2]``, slot weights
    ``[N*D, n_paths * C]`` -> ``[N, natural(C, lmax_out)]``.

    Weights are path-major (``view(-1, n_paths, C)``), paths in :func:`conv_paths` order.
    The neighbour sum is divided by ``avg_neighbors`` (folded into the constant: free).
    """

    def __init__(self, channels: int, lmax_in: int, lmax_sh: int, lmax_out: int,
                 avg_neighbors: float):
        super().__init__()
        self.channels, self.lmax_in, self.lmax_out = channels, lmax_in, lmax_out
        self.paths = conv_paths(lmax_in, lmax_sh, lmax_out)
        self.n_paths = len(self.paths)
        self.weight_numel = self.n_paths * channels
        # per l1: its paths' count, and the coupling constant [M, (2 l1 + 1) * paths * columns]
        self.groups, rows = [], []
        for l1 in range(lmax_in + 1):
            group = [p for p in self.paths if p[0] == l1]
            cg = torch.zeros((lmax_sh + 1) ** 2, 2 * l1 + 1, len(group),
                             sum(2 * l3 + 1 for *_, l3 in group), dtype=torch.float64)
            col = 0
            for a, (_, l2, l3) in enumerate(group):
                block = math.sqrt(2 * l3 + 1) * o3.wigner_3j(l1, l2, l3, dtype=torch.float64)
                cg[l2 * l2:(l2 + 1) ** 2, :, a, col:col + 2 * l3 + 1] = block.transpose(0, 1)
                rows += [(l3, len(rows) + m) for m in range(2 * l3 + 1)]
                col += 2 * l3 + 1
            self.register_buffer(f"cg{l1}", (cg / avg_neighbors).flatten(1).float())
            self.groups.append((len(group), col))
        m = (lmax_sh + 1) ** 2  # the fused kernels' entries, from the same buffers (not state)
        self.table = slot_kernels.table(self.paths, lmax_in, lmax_sh, [
            getattr(self, f"cg{l1}").double().view(m, 2 * l1 + 1, g, cols)
            for l1, (g, cols) in enumerate(self.groups)])
        # output rows regrouped by l3 (paths with the same l3 adjacent) for the mixing
        self.register_buffer("by_l3", torch.tensor([r for _, r in sorted(rows)]))
        self.n_out = [sum(1 for *_, l3 in self.paths if l3 == l) for l in range(lmax_out + 1)]
        if 0 in self.n_out:
            raise ValueError(f"no path reaches every degree up to lmax_out = {lmax_out}")
        self.mix = nn.ParameterList(nn.Parameter(torch.randn(n * channels, channels))
                                    for n in self.n_out)

    def forward(self, h: torch.Tensor, sh: torch.Tensor, weights: torch.Tensor,
                slots: Slots, radial: nn.Module | None = None) -> torch.Tensor:
        """With ``radial``, ``weights`` are per-slot radial features and ``radial`` maps them
        to the weights (on the fused kernels per block: recomputed in a multi-block
        backward). Called as a module (not :meth:`fused` directly) so that hooks on it, as
        ZeRO-3's parameter gathering, run."""
        if slots.plans is not None:  # compact layout: the fused CPU kernels
            return self.fused(h, sh, weights, slots.plans, radial)
        if radial is not None:
            weights = radial(weights)
        n, c = h.shape[0], self.channels
        h = to_components(h, c, self.lmax_in).transpose(1, 2)  # [N, K, C]
        h_j = h.index_select(0, slots.sender)  # [N*D, K, C]
        w = weights.view(-1, self.n_paths, c)  # [N*D, paths, C]
        parts = zip(h_j.split([2 * l + 1 for l in range(self.lmax_in + 1)], dim=1),
                    w.split([g for g, _ in self.groups], dim=1), self.groups)
        summed = []
        for l1, (h_l, w_l, (_, cols)) in enumerate(parts):
            x = (h_l.unsqueeze(2) * w_l.unsqueeze(1)).view(n, -1, c)  # [N, D*(2l1+1)*paths, C]
            with full_precision(sh):  # Y x CG: the coupling, in fp32 (models/layers/precision.py)
                a = (sh @ getattr(self, f"cg{l1}")).view(n, -1, cols)  # [N, D*(2l1+1)*paths, cols]
            summed.append(torch.bmm(a.transpose(1, 2), x))  # [N, cols, C]: sum over slots
        summed = torch.cat(summed, dim=1).index_select(1, self.by_l3)  # [N, P, C] by l3
        return self.mix_degrees(summed)

    def fused(self, h: torch.Tensor, sh: torch.Tensor, per_slot: torch.Tensor, plans: list,
              weights=None) -> torch.Tensor:
        """The same function on the fused CPU kernels (:mod:`~models.layers.slot_kernels`),
        block by block; ``sh`` and ``per_slot`` in the compact layout. ``weights`` maps
        ``per_slot`` rows to the slot weights (default: they are the weights). With several blocks and gradients on, each block's weights
        are recomputed in the backward instead of kept: ``per_slot`` (the radial features,
        8 numbers per slot) is all a layer keeps per slot."""
        c = self.channels
        h = to_components(h, c, self.lmax_in).transpose(1, 2).contiguous()  # [N, K, C]

        def block(h, y, x, plan):  # [N_block, cols, C] neighbour sums, rows in path order
            w = (x if weights is None else weights(x)).view(-1, self.n_paths, c)
            return slot_kernels.contract("O", plan, self.table, {"H": h, "Y": y, "W": w})

        lean = len(plans) > 1 and torch.is_grad_enabled()
        sums = []
        for plan in plans:
            rows = slice(plan.lo, plan.hi)
            args = (h, sh[rows], per_slot[rows], plan)
            sums.append(checkpoint(block, *args, use_reentrant=False) if lean else block(*args))
        summed = torch.cat(sums) if len(sums) > 1 else sums[0]
        return self.mix_degrees(summed.index_select(1, self.by_l3))

    def mix_degrees(self, summed: torch.Tensor) -> torch.Tensor:
        """Neighbour sums ``[N, P, C]`` (rows by l3) -> ``[N, natural(C, lmax_out)]``: per
        output degree, one linear map over its paths and channels."""
        n, c = summed.shape[0], self.channels
        out, row = [], 0
        for l, (count, mix) in enumerate(zip(self.n_out, self.mix)):
            d = 2 * l + 1  # [N, paths, d, C] -> [N, d, paths * C] @ [paths * C, C]
            x = summed[:, row:row + count * d].view(n, count, d, c).transpose(1, 2)
            y = torch.matmul(x.reshape(n, d, count * c), mix) / math.sqrt(count * c)
            out.append(y.transpose(1, 2).reshape(n, c * d))  # e3nn flat: [c, m]
            row += count * d
        return torch.cat(out, dim=1)
