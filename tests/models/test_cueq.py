"""The cuEquivariance fast path computes EdgeConv's function from EdgeConv's parameters:
outputs, gradients and forces (double backward) on CPU through the library's pure-torch
fallback; on a GPU also through the real kernels, and in a whole MACE-style model.

Skipped where ``cuequivariance_torch`` is not installed (CI: it is the optional ``cuda`` extra).
"""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from models.layers.conv import EdgeConv, neighbour_slots, to_slots
from models.mace import natural
from pretrain.release import physics
from tests.models.test_physics import tiny_model

pytest.importorskip("cuequivariance_torch", reason="cuequivariance-torch not installed "
                    "(optional: pip install -e '.[cuda]')")
from models.layers.cueq import CueqEdgeConv, available  # noqa: E402

C, LMAX_SH, AVG = 4, 3, 3.0
gpu = pytest.mark.skipif(not available("cuda"), reason="needs a CUDA GPU with "
                         "cuequivariance_ops_torch (the cuda extra)")


def case(lmax_in, lmax_out, dtype=torch.float64, device="cpu", n_nodes=6, n_edges=23):
    """An EdgeConv, its cueq twin and random inputs (the last atom has no neighbours)."""
    torch.manual_seed(0)
    conv = EdgeConv(C, lmax_in, LMAX_SH, lmax_out, AVG).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    i = torch.randint(0, n_nodes - 1, (n_edges,), generator=g)
    j = torch.randint(0, n_nodes, (n_edges,), generator=g)
    slots = neighbour_slots(i.to(device), j.to(device), n_nodes)
    vectors = torch.randn(n_edges, 3, generator=g, dtype=dtype).to(device).requires_grad_()
    h = torch.randn(n_nodes, natural(C, lmax_in).dim, generator=g, dtype=dtype).to(device)
    weights = torch.randn(n_edges, conv.weight_numel, generator=g, dtype=dtype).to(device)
    return conv, CueqEdgeConv.from_edge_conv(conv), (h.requires_grad_(), vectors,
                                                     weights.requires_grad_(), slots)


def energy(module, h, vectors, weights, slots):
    """A scalar through ``module`` that depends on every output component, and on positions
    through ``Y`` (as a potential's energy does)."""
    sh = o3.spherical_harmonics(list(range(LMAX_SH + 1)), vectors, True, normalization="component")
    out = module(h, to_slots(sh, slots), to_slots(weights, slots), slots)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device)
    return out, (out.flatten() * probe).sum() + out.pow(2).sum()


def rel(a, b):
    """Largest error relative to the largest reference entry (0 when both are exactly 0:
    with ``lmax_in = 0`` the ``l3 = 0`` mixing block never sees positions)."""
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).detach())


def compare(lmax_in, lmax_out, dtype, device, tol):
    """Outputs, first derivatives (inputs and parameters) and the gradient of a force loss."""
    conv, cueq, (h, vectors, weights, slots) = case(lmax_in, lmax_out, dtype, device)
    params = [h, weights, *conv.mix]
    results = []
    for module in (conv, cueq):
        out, e = energy(module, h, vectors, weights, slots)
        forces, *grads = torch.autograd.grad(-e, [vectors, *params], create_graph=True)
        second = torch.autograd.grad(forces.pow(2).sum(), params)  # double backward
        results.append([out, forces, *grads, *second])
    for name, ref, got in zip(["output", "forces"] + [f"grad {k}" for k in range(2 * len(params))],
                              *results):
        assert rel(got, ref) < tol, f"{name}: relative error {rel(got, ref):.2e}"
    assert results[1][0][-1].abs().max() == 0  # no neighbours, no message


# float64 tolerance: EdgeConv stores its coupling constants in float32 (then .double()),
# ~6e-8 relative per constant; cuEquivariance's are float64
@pytest.mark.parametrize("lmax_in,lmax_out", [(0, 3), (1, 3), (2, 3), (1, 2)])
def test_fallback_equals_edge_conv(lmax_in, lmax_out):
    compare(lmax_in, lmax_out, torch.float64, "cpu", 1e-6)


def test_fallback_equals_edge_conv_float32():
    compare(2, 3, torch.float32, "cpu", 1e-5)


def test_shares_parameters_and_saves_nothing():
    conv, cueq, _ = case(1, 3)
    assert list(cueq.parameters()) == [] and cueq.state_dict() == {}
    with torch.no_grad():
        conv.mix[0].mul_(2)  # an update to EdgeConv's weights is seen by its twin
    test_input = case(1, 3)[2]
    out_conv, _ = energy(conv, *test_input)
    out_cueq, _ = energy(cueq, *test_input)
    assert rel(out_cueq, out_conv) < 1e-6


def compare_models(device, dtype, tol):
    """``kernels: cueq`` and ``kernels: torch`` models with one state_dict agree."""
    model = tiny_model("mace", kernels="torch").to(device, dtype)
    fast = tiny_model("mace", kernels="cueq").to(device, dtype)
    fast.load_state_dict(model.state_dict())  # strict: the cueq path adds no keys
    batch = {k: v.to(device) for k, v in physics.batch_of(model, physics.default_probe().structures).items()}
    ref = physics.predict(model, batch)
    got = physics.predict(fast, batch)
    for key in ("energy", "forces", "stress"):
        assert physics.rel(got[key], ref[key]) < tol, key


def test_fallback_whole_model_equals_torch_path():
    compare_models("cpu", torch.float64, 1e-6)


@gpu
@pytest.mark.parametrize("lmax_in,lmax_out", [(0, 3), (1, 3), (2, 3), (1, 2)])
def test_kernels_equal_edge_conv_float64(lmax_in, lmax_out):
    assert case(lmax_in, lmax_out, device="cuda")[1].kernel is not None
    compare(lmax_in, lmax_out, torch.float64, "cuda", 1e-6)


@gpu
def test_kernels_equal_edge_conv_float32():
    compare(2, 3, torch.float32, "cuda", 1e-4)


@gpu
def test_kernels_whole_model_equals_torch_path():
    compare_models("cuda", torch.float64, 1e-6)
