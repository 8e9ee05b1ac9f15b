"""The MACE-style edge convolution and channel-wise product on their own (float64): each is
the function of the e3nn modules it replaces, and equivariant."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from models.layers.conv import EdgeConv, neighbour_slots, to_slots
from models.mace import ChannelProduct, natural

C, LMAX_SH, AVG = 4, 3, 3.0


def graph(n_nodes=6, n_edges=23, seed=0):
    """Random edges in shuffled order; the last atom has no neighbours."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, n_nodes - 1, (n_edges,), generator=g)
    j = torch.randint(0, n_nodes, (n_edges,), generator=g)
    vectors = torch.randn(n_edges, 3, generator=g, dtype=torch.float64)
    return i, j, vectors


def inputs(lmax_in, conv, n_nodes=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_nodes, natural(C, lmax_in).dim, generator=g, dtype=torch.float64)
    i, j, vectors = graph(n_nodes)
    weights = torch.randn(len(i), conv.weight_numel, generator=g, dtype=torch.float64)
    return h, i, j, vectors, weights


def run(conv, h, i, j, vectors, weights):
    slots = neighbour_slots(i, j, h.shape[0])
    sh = o3.spherical_harmonics(list(range(LMAX_SH + 1)), vectors, normalize=True, normalization="component")
    return conv(h, to_slots(sh, slots), to_slots(weights, slots), slots)


def e3nn_reference(conv, lmax_in, lmax_out, h, i, j, vectors, weights):
    """uvu ``o3.TensorProduct`` per edge, summed over receivers, then ``o3.Linear``, with
    ``conv``'s weights (both use path-major weights; the Linear's blocks in path order)."""
    irreps_in, irreps_sh = natural(C, lmax_in), o3.Irreps.spherical_harmonics(LMAX_SH)
    irreps_mid = o3.Irreps([(C, (l3, (-1) ** l3)) for _, _, l3 in conv.paths])
    tp = o3.TensorProduct(irreps_in, irreps_sh, irreps_mid,
                          [(l1, l2, q, "uvu", True) for q, (l1, l2, _) in enumerate(conv.paths)],
                          shared_weights=False, internal_weights=False).double()
    linear = o3.Linear(irreps_mid, natural(C, lmax_out)).double()
    seen, blocks = [0] * (lmax_out + 1), []
    for _, _, l3 in conv.paths:  # Linear's instructions: one [C, C] block per path, in order
        blocks.append(conv.mix[l3].detach().view(-1, C, C)[seen[l3]].flatten())
        seen[l3] += 1
    linear.weight.data = torch.cat(blocks)
    sh = o3.spherical_harmonics(list(range(LMAX_SH + 1)), vectors, normalize=True, normalization="component")
    messages = tp(h[j], sh, weights)
    return linear(torch.zeros(h.shape[0], irreps_mid.dim, dtype=h.dtype).index_add(0, i, messages)
                  / AVG)


@pytest.mark.parametrize("lmax_in,lmax_out", [(0, 3), (1, 3), (2, 3), (1, 2)])
def test_equals_e3nn_tensor_product_and_linear(lmax_in, lmax_out):
    torch.manual_seed(0)
    conv = EdgeConv(C, lmax_in, LMAX_SH, lmax_out, AVG).double()
    args = inputs(lmax_in, conv)
    out, ref = run(conv, *args), e3nn_reference(conv, lmax_in, lmax_out, *args)
    assert out.shape == (6, natural(C, lmax_out).dim)
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    assert out[-1].abs().max() == 0  # no neighbours, no message


@pytest.mark.parametrize("lmax_in", [0, 1, 2])
def test_rotation_equivariance(lmax_in):
    torch.manual_seed(0)
    conv = EdgeConv(C, lmax_in, LMAX_SH, 3, AVG).double()
    h, i, j, vectors, weights = inputs(lmax_in, conv)
    R = -o3.rand_matrix(dtype=torch.float64)  # improper: parity is checked too
    d_in = natural(C, lmax_in).D_from_matrix(R)
    d_out = natural(C, 3).D_from_matrix(R)
    rotated = run(conv, h @ d_in.T, i, j, vectors @ R.T, weights)
    expected = run(conv, h, i, j, vectors, weights) @ d_out.T
    # e3nn's wigner_3j holds float32-accurate constants: ~1e-7 off exact equivariance
    assert (rotated - expected).abs().max() < 1e-6 * expected.abs().max()


def test_slots_any_edge_order():
    i, j, _ = graph()
    slots = neighbour_slots(i, j, 6)
    assert slots.width == int(torch.bincount(i).max())
    filled = slots.edge < len(i)
    assert sorted(slots.edge[filled].tolist()) == list(range(len(i)))  # each edge once
    receiver = torch.arange(6).repeat_interleave(slots.width)
    assert torch.equal(i[slots.edge[filled]], receiver[filled])
    assert torch.equal(j[slots.edge[filled]], slots.sender[filled])


@pytest.mark.parametrize("lmax_out", [1, 3])
def test_product_equals_e3nn_uuu_tensor_product(lmax_out):
    torch.manual_seed(0)
    product = ChannelProduct(C, 3, 3, lmax_out).double()
    irreps, irreps_out = natural(C, 3), natural(C, lmax_out)
    tp = o3.TensorProduct(irreps, irreps, irreps_out,
                          [(l1, l2, l3, "uuu", True) for l1, l2, l3 in product.paths]).double()
    tp.weight.data = product.weight.detach().flatten()  # both path-major, same path order
    x, y = torch.randn(2, 5, irreps.dim, dtype=torch.float64)
    ref = tp(x, y)
    assert (product(x, y) - ref).abs().max() < 1e-5 * ref.abs().max()
    R = -o3.rand_matrix(dtype=torch.float64)  # improper: parity is checked too
    d, d_out = irreps.D_from_matrix(R), irreps_out.D_from_matrix(R)
    rotated = product(x @ d.T, y @ d.T)
    assert (rotated - ref @ d_out.T).abs().max() < 1e-6 * ref.abs().max()
