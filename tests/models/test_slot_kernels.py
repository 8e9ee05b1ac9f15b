"""The fused CPU kernels of EdgeConv (float64): the same function as its torch ops, with
the same first and second derivatives, in one block or many; and a MACE backbone whose
large graphs run block by block with recomputation gives the torch path's energy, forces
and force-loss gradients."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from models.layers import slot_kernels
from models.layers.conv import EdgeConv, Slots, neighbour_slots, to_slots
from models.mace import ChannelProduct, MACEBackbone, natural
from tests.models.test_conv import AVG, C, LMAX_SH, inputs

pytestmark = pytest.mark.skipif(not slot_kernels.available(), reason="no C++ compiler: the torch path runs")


def close(a, b):
    """Equal to float64 roundoff: both paths use the same coupling constants."""
    return bool((a - b).abs().max() <= 1e-10 * b.abs().max() + 1e-12)


def fused_and_torch(conv, h, i, j, vectors, weights, block_rows=10**9):
    """EdgeConv's output on the fused kernels (compact layout, blocks of ``block_rows``
    edges) and on its torch ops (padded slots)."""
    sh = o3.spherical_harmonics(list(range(LMAX_SH + 1)), vectors, normalize=True, normalization="component")
    order, _, plans = slot_kernels.layout(i, j, h.shape[0], block_rows)
    compact = Slots(order, j[order], 0, plans=plans)
    slots = neighbour_slots(i, j, h.shape[0])
    return (conv(h, to_slots(sh, compact), to_slots(weights, compact), compact),
            conv(h, to_slots(sh, slots), to_slots(weights, slots), slots))


@pytest.mark.parametrize("lmax_in,lmax_out,block", [(0, 3, 10**9), (1, 2, 10**9), (2, 3, 10**9), (1, 3, 5)])
def test_fused_equals_torch_ops_with_first_and_second_derivatives(lmax_in, lmax_out, block):
    conv = EdgeConv(C, lmax_in, LMAX_SH, lmax_out, AVG).double()
    h, i, j, vectors, weights = inputs(lmax_in, conv)
    for x in (h, vectors, weights):
        x.requires_grad_(True)
    fused, ref = fused_and_torch(conv, h, i, j, vectors, weights, block)
    assert close(fused, ref)
    probe = torch.randn_like(ref)
    grads = [torch.autograd.grad((out * probe).sum(), (h, vectors, weights), create_graph=True)
             for out in (fused, ref)]
    for a, b in zip(*grads):
        assert close(a, b)
    # second order: a loss on the input gradients (a force loss's double backward)
    second = [torch.autograd.grad(sum((g**2).sum() for g in gs), (h, vectors, weights, *conv.mix),
                                  retain_graph=True)
              for gs in grads]
    for a, b in zip(*second):
        assert close(a, b)


def test_every_kernel_passes_gradcheck_and_gradgradcheck():
    """Each operand from the other three, by finite differences, to second order, in a
    block that holds a receiver without neighbours."""
    conv = EdgeConv(3, 1, 2, 2, AVG).double()
    n = 5
    i = torch.tensor([2, 0, 1, 2, 0, 2, 3])  # receiver 4 has no neighbours
    j = torch.tensor([1, 4, 0, 0, 3, 1, 2])
    _, _, (p,) = slot_kernels.layout(i, j, n, 10**9)
    t = conv.table
    g = torch.Generator().manual_seed(0)
    full = {"O": torch.randn(n, t.cols, 3, generator=g, dtype=torch.float64),
            "H": torch.randn(n, t.kh, 3, generator=g, dtype=torch.float64),
            "Y": torch.randn(len(i), t.m, generator=g, dtype=torch.float64),
            "W": torch.randn(len(i), t.paths, 3, generator=g, dtype=torch.float64)}
    for target in slot_kernels.OPERANDS:
        names = [k for k in slot_kernels.OPERANDS if k != target]
        given = [full[k].clone().requires_grad_(True) for k in names]

        def fn(*xs, target=target, names=names):
            return slot_kernels.contract(target, p, t, dict(zip(names, xs)))

        assert torch.autograd.gradcheck(fn, given)
        assert torch.autograd.gradgradcheck(fn, given)


def backbone(kernels, block_slots=None):
    torch.manual_seed(0)
    model = MACEBackbone(2, cutoff=3.0, channels=4, lmax=2, hidden_lmax=1, correlation=3, layers=2,
                         avg_neighbors=4.0, kernels=kernels).double()
    if block_slots:
        model.block_slots = block_slots
    return model


def energy_forces_and_loss_grads(model, create_graph=True):
    g = torch.Generator().manual_seed(3)
    n = 9
    pos = (torch.rand(n, 3, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    i, j = torch.triu_indices(n, n, 1)
    i, j = torch.cat([i, j]), torch.cat([j, i])
    keep = (pos[i] - pos[j]).norm(dim=1) < 3.0
    i, j = i[keep], j[keep]
    numbers = torch.randint(1, 10, (n,), generator=g)
    zeros = torch.zeros(n, dtype=torch.long)
    h = model(numbers, pos[j] - pos[i], torch.stack([i, j]), zeros, torch.zeros(1, dtype=torch.long),
              torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    energy = (h[:, 0] ** 2).sum() + h[:, 1:].sum()
    forces = -torch.autograd.grad(energy, pos, create_graph=create_graph)[0]
    if not create_graph:
        return energy.detach(), forces, ()
    loss = (forces**2).sum()
    return energy.detach(), forces.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("block_slots", [None, 7])
def test_backbone_on_fused_kernels_equals_torch_ops(block_slots):
    """One block, and blocks of 7 slots (the recomputing path): energy, forces and the
    gradients of a force loss (double backward through checkpointed blocks)."""
    ref = energy_forces_and_loss_grads(backbone("torch"))
    got = energy_forces_and_loss_grads(backbone("auto", block_slots))
    assert close(got[0], ref[0]) and close(got[1], ref[1])
    for a, b in zip(got[2], ref[2]):
        assert close(a, b)
    forces = energy_forces_and_loss_grads(backbone("auto", block_slots), create_graph=False)[1]
    assert torch.allclose(forces, got[1], atol=1e-12)  # the same kernels, without a graph


def test_layout_blocks_cover_every_edge_once():
    i = torch.tensor([3, 0, 0, 1, 3, 0])
    j = torch.tensor([0, 1, 2, 0, 1, 3])
    order, counts, plans = slot_kernels.layout(i, j, 5, 4)  # receivers 0 (3 edges), 1 (1), 3 (2)
    assert i[order].tolist() == sorted(i.tolist()) and counts.tolist() == [3, 1, 0, 2, 0]
    assert [(p.first, p.last, p.lo, p.hi) for p in plans] == [(0, 3, 0, 4), (3, 5, 4, 6)]
    for p in plans:  # each block's rows, its receivers and its rows by sender
        assert p.recv.tolist() == (i[order][p.lo:p.hi] - p.first).tolist()
        assert sorted(p.order.tolist()) == list(range(p.hi - p.lo)) and int(p.ptr[-1]) == p.hi - p.lo
    _, _, plans = slot_kernels.layout(torch.tensor([0, 0, 0]), torch.tensor([1, 2, 3]), 4, 2)
    assert [(p.first, p.last, p.lo, p.hi) for p in plans] == [(0, 1, 0, 3), (1, 4, 3, 3)]  # over: alone
    _, _, (empty,) = slot_kernels.layout(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3, 8)
    assert (empty.first, empty.last, empty.hi) == (0, 3, 0)


def test_torch_path_where_kernels_do_not_apply():
    x = torch.zeros(2, 3)
    assert slot_kernels.usable(x)
    assert not slot_kernels.usable(x.bfloat16())
    assert not slot_kernels.usable(x, x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not slot_kernels.usable(x)
    assert natural(C, 1).dim == 4 * C


@pytest.mark.parametrize("l1max,l2max,lmax_out", [(2, 2, 2), (3, 3, 1), (1, 2, 3)])
def test_fused_channel_product_equals_torch_ops_to_second_order(l1max, l2max, lmax_out):
    product = ChannelProduct(C, l1max, l2max, lmax_out).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, natural(C, l1max).dim, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, natural(C, l2max).dim, generator=g, dtype=torch.float64, requires_grad=True)
    outs = []
    for fused in (True, False):
        product.fused = fused
        out = product(x, y)
        first = torch.autograd.grad((out**2).sum(), (x, y, product.weight), create_graph=True)
        outs.append((out, *first, *torch.autograd.grad(sum((f**3).sum() for f in first), (x, y, product.weight))))
    for a, b in zip(*outs):
        assert close(a, b)


def test_every_product_kernel_passes_gradcheck_and_gradgradcheck():
    t = ChannelProduct(3, 1, 2, 2).double().table
    g = torch.Generator().manual_seed(0)
    full = {"O": torch.randn(4, t.k3, 3, generator=g, dtype=torch.float64),
            "X": torch.randn(4, t.k1, 3, generator=g, dtype=torch.float64),
            "Y": torch.randn(4, t.k2, 3, generator=g, dtype=torch.float64),
            "W": torch.randn(t.paths, 3, generator=g, dtype=torch.float64)}
    for target in slot_kernels.PRODUCT_OPERANDS:
        names = [k for k in slot_kernels.PRODUCT_OPERANDS if k != target]
        given = [full[k].clone().requires_grad_(True) for k in names]

        def fn(*xs, target=target, names=names):
            return slot_kernels.product(target, t, dict(zip(names, xs)))

        assert torch.autograd.gradcheck(fn, given)
        assert torch.autograd.gradgradcheck(fn, given)


def test_a_missing_compiler_leaves_the_torch_path_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("MLIP_PRETRAIN_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="torch ops"):
        assert slot_kernels.library.__wrapped__() is None
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-built left behind
