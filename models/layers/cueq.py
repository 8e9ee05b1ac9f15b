"""Optional GPU fast path for :class:`~models.layers.conv.EdgeConv`: cuEquivariance kernels.

:class:`CueqEdgeConv` computes ``EdgeConv``'s function from the same parameters (it holds
a reference to the ``EdgeConv`` and owns none): the radial-weighted Clebsch-Gordan messages
and their neighbour sum run as one fused gather-multiply-scatter kernel of
``cuequivariance_torch`` (``uniform_1d``), the per-degree channel mixing stays a ``matmul``.
It is never required: ``cuequivariance_torch`` is imported only here, only when a
``CueqEdgeConv`` is built, and on CPU (or without the ``cuequivariance_ops_torch`` kernels)
the library's pure-torch fallback runs instead, slowly.

How our layout maps onto cuEquivariance's channel-wise tensor product
(``cue.descriptors.channelwise_tensor_product``, subscripts ``uv,iu,jv,kuv+ijk``, derived
and checked at construction, see :func:`_mapped_descriptor`):

- coefficients: cuEquivariance normalises each path so that every output component has
  unit variance (``sum_ij c_ijk^2 = 1``); with one path per output segment that is
  ``sqrt(2 l3 + 1) * C^{l1 l2 l3}`` with e3nn's unit-norm ``wigner_3j``, and the signs and
  real basis of ``cue.O3`` are e3nn's: the same coefficients as ``EdgeConv``'s, scale 1 per
  path (e3nn's element path normalisation is also 1 here: one ``Y`` channel, one path per
  output segment);
- weights: cuEquivariance orders paths by output degree; ``EdgeConv``'s radial weights are
  path-major in :func:`~models.layers.conv.conv_paths` order. Permuting the descriptor's
  weight segments (free, done once) makes the kernel read our ``[slots, paths * C]`` as is;
- output: permuted to ``EdgeConv``'s ``by_l3`` rows (per degree, paths in ``conv_paths``
  order) in the ``ir_mul`` layout (``[m, c]`` per path), so the mixing blocks apply unchanged;
- neighbour normalisation ``1 / avg_neighbors``: ``EdgeConv`` folds it into its coupling
  buffer (entry ``cg0[0, 0]`` is ``C^{000} / avg = 1 / avg``); read from there, the same number.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import nn

from models.layers.conv import EdgeConv, Slots, to_components


def installed() -> bool:
    """Whether ``cuequivariance_torch`` is importable (its pure-torch fallback runs anywhere)."""
    return importlib.util.find_spec("cuequivariance_torch") is not None


def available(device: torch.device | str) -> bool:
    """Whether the fast kernels can run on ``device``: a CUDA device, ``cuequivariance_torch``
    and its CUDA kernels (``cuequivariance_ops_torch``, the ``cuda`` extra) importable."""
    return (torch.device(device).type == "cuda" and torch.cuda.is_available() and installed()
            and importlib.util.find_spec("cuequivariance_ops_torch") is not None)


def _natural(cue, channels: int, lmax: int):
    """``channels x (0e + 1o + 2e + ...)`` as cuEquivariance irreps (e3nn's ``natural``)."""
    return cue.Irreps("O3", [(channels, cue.O3(l, (-1) ** l)) for l in range(lmax + 1)])


def _mapped_descriptor(conv: EdgeConv, lmax_sh: int):
    """cuEquivariance's channel-wise product for ``conv``, its weight segments in
    ``conv_paths`` order and its output segments in ``by_l3`` order (see the module docstring).

    Raises ``ValueError`` if its paths or coefficients differ from ``conv``'s (a changed
    convention in a future cuEquivariance): no silent mismatch.
    """
    import cuequivariance as cue
    from e3nn import o3

    filter_out = [cue.O3(l, (-1) ** l) for l in range(conv.lmax_out + 1)]
    poly = cue.descriptors.channelwise_tensor_product(
        _natural(cue, conv.channels, conv.lmax_in), _natural(cue, 1, lmax_sh), filter_out).polynomial
    [(_, d)] = poly.operations
    out_dim = [segment[0] for segment in d.operands[3]]  # output segments: (2 l3 + 1, C, 1)
    segment = {}  # our path -> (weight segment, output segment) in cuEquivariance's order
    for path in d.paths:
        w, i1, i2, o = path.indices
        l3 = (out_dim[o] - 1) // 2
        key = (i1, i2, l3)  # one input segment per degree: segment index = l1, l2
        ref = math.sqrt(2 * l3 + 1) * o3.wigner_3j(*key, dtype=torch.float64).numpy()
        if key in segment or abs(path.coefficients - ref).max() > 1e-12:
            raise ValueError(f"cuequivariance path {key} is not EdgeConv's (coefficients or "
                             "duplicate path): this cuequivariance version cannot be mapped")
        segment[key] = (w, o)
    if sorted(segment) != sorted(conv.paths):
        raise ValueError(f"cuequivariance paths {sorted(segment)} != EdgeConv's {conv.paths}")
    by_l3 = sorted(range(conv.n_paths), key=lambda p: (conv.paths[p][2], p))
    d = d.permute_segments(0, [segment[p][0] for p in conv.paths])
    d = d.permute_segments(3, [segment[conv.paths[p]][1] for p in by_l3])
    return cue.SegmentedPolynomial.eval_last_operand(d)


class CueqEdgeConv(nn.Module):
    """``EdgeConv``'s function (same signature, same parameters) on cuEquivariance kernels.

    Build it with :meth:`from_edge_conv`. It keeps a reference to that ``EdgeConv`` outside
    its own module tree and no persistent state: a model's ``state_dict`` is the same with
    or without it, and training either updates the one set of parameters.
    """

    def __init__(self, conv: EdgeConv, lmax_sh: int):
        super().__init__()
        import cuequivariance_torch as cuet

        self._conv = (conv,)  # a tuple: not a submodule, so its parameters are not listed twice
        poly = _mapped_descriptor(conv, lmax_sh)
        self.fallback = cuet.SegmentedPolynomial(poly, method="naive")
        self.kernel = (cuet.SegmentedPolynomial(poly, method="uniform_1d")
                       if available("cuda") else None)
        for module in self.modules():  # the library's coefficient buffers: rebuilt, not saved
            module._non_persistent_buffers_set.update(module._buffers)

    @classmethod
    def from_edge_conv(cls, conv: EdgeConv) -> CueqEdgeConv:
        """The cuEquivariance twin of ``conv`` (on ``conv``'s device)."""
        lmax_sh = math.isqrt(conv.cg0.shape[0]) - 1  # cg0: [(lmax_sh + 1)^2, ...]
        return cls(conv, lmax_sh).to(conv.cg0.device)

    def forward(self, h: torch.Tensor, sh: torch.Tensor, weights: torch.Tensor,
                slots: Slots) -> torch.Tensor:
        """``h [N, natural(C, lmax_in)]``, slot harmonics ``sh [N*D, (lmax_sh+1)^2]`` and slot
        weights ``[N*D, n_paths * C]`` (path-major) -> ``[N, natural(C, lmax_out)]``."""
        conv = self._conv[0]
        n, c = h.shape[0], conv.channels
        sh, weights = sh.to(h.dtype), weights.to(h.dtype)  # one dtype (bf16 under autocast)
        h = to_components(h, c, conv.lmax_in).transpose(1, 2).reshape(n, -1)  # ir_mul [N, K*C]
        receiver = torch.arange(n, device=h.device).repeat_interleave(slots.width)  # [N*D]
        poly = self.kernel if self.kernel is not None and h.is_cuda else self.fallback
        # empty slots (Y = 0, weight 0) add exact zeros: no mask needed
        [summed] = poly([weights, h, sh], input_indices={1: slots.sender},
                        output_shapes={0: h.new_empty(n, 1)}, output_indices={0: receiver})
        summed = summed.view(n, -1, c) * conv.cg0[0, 0]  # [N, P, C] by l3; * 1 / avg_neighbors
        return conv.mix_degrees(summed)  # [N, natural(C, lmax_out)]
