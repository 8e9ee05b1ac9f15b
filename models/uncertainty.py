"""Per-prediction uncertainty of a Potential: a trained shallow ensemble or post-hoc LLPR.

Both methods read the same features, invariant under rotation once squared:

* energy: the last hidden layer ``h_i [H]`` of the atom's fidelity head (the layer the
  energy readout is linear in), summed per structure ``f_s = sum_i h_i`` (the total
  energy is linear in ``f_s``);
* forces: each atom's backbone invariants ``s_i [C]`` and its l = 1 features ``x_i [3, C]``
  (a backbone without l = 1 features gives its invariants again).

The force uncertainty is ``sigma_i^2 = a * v_inv,i + b * v_l1,i``: one variance from the
invariants, one from the l = 1 features, weighted per fidelity by the calibration
(``scale [F, 3]``: energy, invariant, l = 1 scale; all 0: not calibrated, ``a = b = 1``).
``widths [F, 2, L]`` (energy, forces) are the calibrated half-widths, in units of sigma,
of the central intervals at the levels of ``pretrain.uncertainty.metrics.LEVELS`` (0: read
sigma as a Gaussian standard deviation).
Everything comes from features the forward pass has already made, with no backward pass
of its own (an exact force variance needs one per direction, ~0.5x a force call each,
measured on the demo model).

``ensemble`` (trained, ``model.uncertainty: ensemble``): K readouts per fidelity on the
shared backbone. Energy members are the fidelity head plus a centred deviation of its
output weights (``energy_members [F, K, H]``, mean over members subtracted), so the
members' mean is the plain head's energy exactly and ``var_k(E_k) = mean_k (d_k . f_s)^2``.
Force members deviate from the served forces by an l = 1 readout (a vector,
``force_members [F, K, C]``) and an isotropic invariant readout (``force_members_inv``);
``v_l1`` and ``v_inv`` are their mean squares. The loss trains the members with the
Gaussian negative log-likelihood of the served prediction's residual
(``pretrain/loss.py``) on detached features: the backbone and the prediction train
exactly as without an ensemble (with the NLL reaching the backbone, the demo's held-out
force MAE was 3.5x worse at 400 steps).

``llpr`` (post hoc, any trained model): last-layer prediction rigidity. The covariance of
each feature set over (a sample of) the training data, ``C = sum f f^T``, gives the
precision ``P = (C + r I)^-1`` and the variance ``f^T P f``: per structure for energy,
per atom for the invariants, per atom averaged over the three l = 1 components. It is
large where the training data did not pin the features down.
``pretrain/uncertainty/fit.py`` accumulates ``C`` over ranks and picks ``r``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

METHODS = ("none", "llpr", "ensemble")
LEVELS = 99  # interval levels of the calibrated half-widths: 0.01, 0.02, ..., 0.99
VAR_FLOOR = 1e-12  # keeps sqrt and log finite for an exactly rigid prediction


def force_features(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s [N, C], x1 [N, m, C])``: the invariants and the l = 1 part of backbone
    features ``x [N, K, C]`` (m = 3), or the invariants again (m = 1) without l = 1."""
    return x[:, 0], (x[:, 1:4] if x.shape[1] >= 4 else x[:, :1])


class Uncertainty(nn.Module):
    """The parameters and buffers of one uncertainty method for ``F`` fidelities.

    Args:
        method: ``llpr`` or ``ensemble``.
        num_fidelities: F.
        hidden: H, the width of the energy heads' last hidden layer.
        channels: C, the backbone's feature channels.
        members: K, ensemble members (``ensemble`` only).
    """

    def __init__(self, method: str, num_fidelities: int, hidden: int, channels: int, members: int = 8):
        super().__init__()
        if method not in ("llpr", "ensemble"):
            raise ValueError(f"uncertainty method: got {method!r}, expected llpr or ensemble")
        self.method = method
        f = num_fidelities
        if method == "ensemble":
            if members < 2:
                raise ValueError(f"ensemble members: got {members}, expected >= 2")
            # small distinct deviations: the NLL grows them to the residuals' size
            self.energy_members = nn.Parameter(torch.randn(f, members, hidden) * 0.01 / hidden**0.5)
            self.force_members = nn.Parameter(torch.randn(f, members, channels) * 0.1 / channels**0.5)
            self.force_members_inv = nn.Parameter(torch.randn(f, members, channels) * 0.1 / channels**0.5)
        else:  # float64: a precision of a nearly singular covariance has a wide range
            for name, dim in (("energy_precision", hidden), ("force_precision", channels),
                              ("force_precision_inv", channels)):
                self.register_buffer(name, torch.zeros(f, dim, dim, dtype=torch.float64))
        self.register_buffer("scale", torch.zeros(f, 3, dtype=torch.float64))
        self.register_buffer("widths", torch.zeros(f, 2, LEVELS, dtype=torch.float64))

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.float()``, ...: the buffers move but stay float64."""
        kept = {name: buf.data for name, buf in self.named_buffers(recurse=False)}
        out = super()._apply(fn, recurse)
        for name, data in kept.items():
            buf = getattr(self, name)
            buf.data = data.to(buf.device)
        return out

    def forward(self, h: torch.Tensor, x: torch.Tensor, fid_atom: torch.Tensor, fid_graph: torch.Tensor,
                batch: torch.Tensor, n_graphs: int) -> dict[str, torch.Tensor]:
        """Raw variances: ``energy_var [G]`` (eV^2, total energy), ``forces_var_inv [N]`` and
        ``forces_var_l1 [N]`` (per Cartesian component, eV^2/A^2 before calibration).

        ``h [N, H]``: each atom's head features at its fidelity; ``x [N, K, C]``: backbone
        features; ``fid_atom [N]``, ``fid_graph [G]``, ``batch [N]``: fidelity ids and graph index.
        """
        s, x1 = force_features(x)  # [N, C], [N, m, C]
        f_s = h.new_zeros(n_graphs, h.shape[1]).index_add(0, batch, h)  # [G, H]
        if self.method == "ensemble":
            s, x1, f_s = s.detach(), x1.detach(), f_s.detach()  # the NLL trains the members only
            dev = self.energy_members - self.energy_members.mean(dim=1, keepdim=True)  # [F, K, H]
            e_dev = torch.einsum("gh,gkh->gk", f_s, dev[fid_graph])  # [G, K], mean over k is 0
            inv = torch.einsum("nc,nkc->nk", s, self.force_members_inv[fid_atom])  # [N, K]
            vec = torch.einsum("nmc,nkc->nkm", x1, self.force_members[fid_atom])  # [N, K, m]
            return {"energy_var": e_dev.double().square().mean(dim=1),
                    "forces_var_inv": inv.square().mean(dim=1), "forces_var_l1": vec.square().mean(dim=(1, 2))}
        # quadratic forms in float64 (the precisions' range); the features are cast, not the weights
        f_s, s, x1 = f_s.double(), s.double(), x1.double()
        e_var = torch.einsum("gh,ghk,gk->g", f_s, self.energy_precision[fid_graph], f_s)
        return {"energy_var": e_var.clamp_min(0),
                "forces_var_inv": _atom_quadratic(s[:, None], self.force_precision_inv, fid_atom),
                "forces_var_l1": _atom_quadratic(x1, self.force_precision, fid_atom)}

    def calibrated(self, raw: dict[str, torch.Tensor], fid_atom: torch.Tensor,
                   fid_graph: torch.Tensor) -> dict[str, torch.Tensor]:
        """``energy_uncertainty [G]`` (eV) and ``forces_uncertainty [N]`` (eV/A, per
        Cartesian component): standard deviations with the fidelity's calibration."""
        scale = torch.where((self.scale > 0).any(dim=1, keepdim=True), self.scale, torch.ones_like(self.scale))
        e = raw["energy_var"].double().clamp_min(VAR_FLOOR).sqrt() * scale[fid_graph, 0]
        var_f = (scale[fid_atom, 1].square() * raw["forces_var_inv"].double()
                 + scale[fid_atom, 2].square() * raw["forces_var_l1"].double())
        return {"energy_uncertainty": e, "forces_uncertainty": var_f.clamp_min(VAR_FLOOR).sqrt()}

    def interval(self, fidelity: int, level: float) -> tuple[float, float]:
        """(energy, forces) half-width of the central ``level`` interval in units of sigma:
        the calibrated table, else the normal quantile."""
        from statistics import NormalDist  # noqa: PLC0415

        if not 0 < level < 1:
            raise ValueError(f"level: got {level}, expected a probability in (0, 1)")
        grid = torch.linspace(0.01, 0.99, self.widths.shape[-1], dtype=torch.float64)
        out = []
        for k in range(2):
            table = self.widths[fidelity, k].cpu()
            if bool((table > 0).any()):
                out.append(float(np.interp(level, grid.numpy(), table.numpy())))
            else:
                out.append(NormalDist().inv_cdf(0.5 + level / 2))
        return out[0], out[1]

    @property
    def calibrated_fidelities(self) -> list[int]:
        """Fidelity ids with a calibration (an energy scale and a force weight)."""
        return [f for f in range(self.scale.shape[0])
                if bool(self.scale[f, 0] > 0) and bool((self.scale[f, 1:] > 0).any())]


def _atom_quadratic(feats: torch.Tensor, precision: torch.Tensor, fid_atom: torch.Tensor) -> torch.Tensor:
    """``mean_m feats[n, m] . P[fid_n] . feats[n, m]`` per atom: every fidelity's precision on
    every atom, then the atom's own (no ``[N, C, C]`` gather)."""
    fp = torch.einsum("nmc,fcd->nfmd", feats, precision)  # [N, F, m, C]
    fp = fp.gather(1, fid_atom.view(-1, 1, 1, 1).expand(-1, 1, *fp.shape[2:])).squeeze(1)
    return (fp * feats).sum(dim=(1, 2)).clamp_min(0) / feats.shape[1]


def features(h: torch.Tensor, x: torch.Tensor, batch: torch.Tensor, n_graphs: int) -> dict[str, torch.Tensor]:
    """What LLPR accumulates, detached: ``energy_features [G, H]`` (``f_s``),
    ``force_features_inv [N, C]`` and ``force_features [N, m, C]``."""
    f_s = h.new_zeros(n_graphs, h.shape[1]).index_add(0, batch, h)
    s, x1 = force_features(x)
    return {"energy_features": f_s.detach(), "force_features_inv": s.detach(), "force_features": x1.detach()}
