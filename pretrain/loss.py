"""Training loss on energy per atom, forces and stress, with weights per term and fidelity.

Every term is a sum over labelled items divided by the number of labelled atoms in the
whole optimizer step (all micro-batches on all ranks), so the loss and its gradient do
not depend on how the step's atoms fall into micro-batches and ranks:

    L = w_E * sum_s n_s * w_f(s) * l((E_s - E*_s) / n_s) / N_E
      + w_F * sum_a       w_f(a) * mean_xyz l(F_a - F*_a)  / N_F
      + w_S * sum_s n_s * w_f(s) * mean_voigt l(S_s - S*_s) / N_S

      + w_NLL * (sum_s n_s * w_f(s) * nll(E_s / n_s) / N_E + sum_a w_f(a) * mean_xyz nll(F_a) / N_F)

with ``l`` the MAE, MSE or Huber function, ``n_s`` the atoms of structure ``s``, ``w_f``
the weight of the item's fidelity and ``N_T`` the step's global count of atoms that carry
a label for term ``T`` (:meth:`Loss.counts` of every micro-batch, summed over ranks by the
trainer). Energies are compared per atom, in float64. Structures without a label are
masked out (``data_pipeline.keys``), so one step may mix fidelities with different labels.

Each extra target ``t`` (``model.targets``: charges, dipoles, ...; ``models/properties.py``)
adds ``w_t * sum_i w_f(i) * mean_components l(y_i - y*_i) / N_t`` over its labelled items
``i`` (atoms for per-atom targets, structures for per-structure ones) at the fidelities it
declares, ``N_t`` the step's global count of them: the same normalisation as the forces.

The last line is present only for a model with a trained shallow ensemble
(``models/uncertainty.py``): the Gaussian negative log-likelihood
``nll(y) = (log v + r^2 / v) / 2`` of the label under the ensemble's variance ``v``, with
``r`` the served prediction's residual, detached: the NLL trains the spread, the terms
above train the prediction, as in a run without an ensemble.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from common.config import ConfigError
from data_pipeline import keys as K

TERMS = ("energy", "forces", "stress")
#: what the loss returns and the trainer logs: the terms, then the ensemble's NLL
PARTS = TERMS + ("nll",)
#: variance floors of the NLL: (eV/atom)^2 and (eV/A)^2, far below any achievable error
NLL_FLOOR = (1e-8, 1e-6)
#: per fidelity, what :meth:`Loss.errors` sums: |e|/atom, structures, |F| sum, components, |S| sum, components
ERROR_COLUMNS = 6
#: then per extra target: sum |err|, sum err^2, labelled components
TARGET_COLUMNS = 3


@dataclasses.dataclass
class LossConfig:
    """Loss function and weights."""

    #: per-item error function: mean absolute, mean squared or Huber error
    kind: Literal["mae", "mse", "huber"] = "huber"
    #: Huber threshold, in the item's unit (eV/atom, eV/A, eV/A^3)
    huber_delta: float = 0.01
    #: weight of the energy-per-atom term
    energy: float = 1.0
    #: weight of the force term
    forces: float = 10.0
    #: weight of the stress term (0: stress is not computed)
    stress: float = 0.0
    #: weight of the Gaussian NLL of a trained ensemble (model.uncertainty: ensemble)
    nll: float = 0.1
    #: multiplier per fidelity name (missing fidelities: 1)
    fidelity_weights: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        """Weights must be >= 0 with at least one term on; the Huber threshold > 0."""
        for name in TERMS:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: got {getattr(self, name)}, expected a weight >= 0")
        if not any(getattr(self, name) > 0 for name in TERMS):
            raise ConfigError("energy, forces, stress: every weight is 0; turn at least one term on")
        if self.nll < 0:
            raise ConfigError(f"nll: got {self.nll}, expected a weight >= 0")
        if not self.huber_delta > 0:
            raise ConfigError(f"huber_delta: got {self.huber_delta}, expected > 0")
        bad = {f: w for f, w in self.fidelity_weights.items() if w < 0}
        if bad:
            raise ConfigError(f"fidelity_weights: negative weights {bad}")


class Loss:
    """The loss of :class:`LossConfig` for a model trained on ``fidelities`` (in id order)."""

    def __init__(self, cfg: LossConfig, fidelities: list[str], targets: list | None = None):
        unknown = sorted(set(cfg.fidelity_weights) - set(fidelities))
        if unknown:
            raise ConfigError(f"loss.fidelity_weights: {unknown} are not fidelities of the data "
                              f"(it has {fidelities})")
        self.cfg = cfg
        self.num_fidelities = len(fidelities)
        self.fidelity_weight = torch.tensor([cfg.fidelity_weights.get(f, 1.0) for f in fidelities],
                                            dtype=torch.float64)
        self.targets = list(targets or [])
        self.parts = PARTS + tuple(t.name for t in self.targets)
        self.columns = ERROR_COLUMNS + TARGET_COLUMNS * len(self.targets)
        self.weights = torch.tensor([cfg.energy, cfg.forces, cfg.stress, cfg.nll]
                                    + [t.weight for t in self.targets], dtype=torch.float64)
        # bool [T, F]: the fidelities each target learns at (all where it names none)
        self.served = torch.tensor([[not t.fidelities or f in t.fidelities for f in fidelities]
                                    for t in self.targets], dtype=torch.bool).view(len(self.targets), len(fidelities))

    @property
    def needs_forces(self) -> bool:
        return self.cfg.forces > 0

    @property
    def needs_stress(self) -> bool:
        return self.cfg.stress > 0

    def _l(self, err: torch.Tensor) -> torch.Tensor:
        if self.cfg.kind == "mae":
            return err.abs()
        if self.cfg.kind == "mse":
            return err.square()
        return torch.nn.functional.huber_loss(err, torch.zeros_like(err), reduction="none",
                                              delta=self.cfg.huber_delta)

    def counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Labelled atoms per term in ``batch``: float64 ``[3 + T]`` (energy, forces, stress,
        then each extra target's labelled atoms or structures)."""
        n = batch[K.N_ATOMS].double()
        counts = [(n * batch[K.ENERGY_MASK]).sum(), batch[K.FORCES_MASK].double().sum(),
                  (n * batch[K.STRESS_MASK]).sum()]
        counts += [self._target_mask(k, batch).double().sum() for k in range(len(self.targets))]
        return torch.stack(counts)

    def _target_mask(self, k: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """bool per labelled item of target ``k`` (atoms or structures) at a fidelity it learns."""
        t = self.targets[k]
        fid = batch[K.FIDELITY]
        graph = batch[K.extra_mask(t.name)] & self.served[k].to(fid.device)[fid]  # [G]
        return graph[batch[K.BATCH]] if t.per == "atom" else graph

    def __call__(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                 denominators: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss for backward, float64 ``[4 + T]`` of its parts (:attr:`parts`), detached).

        ``denominators``: the step's global :meth:`counts`, summed over micro-batches and ranks.
        """
        n = batch[K.N_ATOMS].double()
        fid = batch[K.FIDELITY]
        w_graph = self.fidelity_weight.to(n.device)[fid]
        denom = denominators.to(n.device).clamp(min=1.0)
        terms = []
        err = (out["energy"] - batch[K.ENERGY]) / n
        terms.append((n * w_graph * self._l(err) * batch[K.ENERGY_MASK]).sum() / denom[0])
        if self.needs_forces:
            w_atom = w_graph[batch[K.BATCH]] * batch[K.FORCES_MASK]
            per_atom = self._l(out["forces"].double() - batch[K.FORCES].double()).mean(dim=1)
            terms.append((w_atom * per_atom).sum() / denom[1])
        else:
            terms.append(err.new_zeros(()))
        if self.needs_stress:
            per_graph = self._l(out["stress"].double() - batch[K.STRESS].double()).mean(dim=1)
            terms.append((n * w_graph * per_graph * batch[K.STRESS_MASK]).sum() / denom[2])
        else:
            terms.append(err.new_zeros(()))
        terms.append(self._nll(out, batch, err, n, w_graph, denom) if "energy_var" in out else err.new_zeros(()))
        for k, t in enumerate(self.targets):
            w = (w_graph[batch[K.BATCH]] if t.per == "atom" else w_graph) * self._target_mask(k, batch)
            terms.append((w * self._l(self._residual(t, out, batch)).mean(dim=1)).sum() / denom[3 + k])
        terms = torch.stack(terms)
        total = (terms * self.weights.to(terms.device)).sum()
        return total.float(), terms.detach()

    @staticmethod
    def _residual(t, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per item of target ``t``: the prediction minus the label, float64 ``[items, components]``."""
        key = K.extra(t.name)
        r = out[key].double() - batch[key].double()
        return r.reshape(r.shape[0], -1)

    def _nll(self, out, batch, err, n, w_graph, denom) -> torch.Tensor:
        """The ensemble's Gaussian NLL of energies per atom and force components."""
        def nll(r, v):
            return 0.5 * (torch.log(v) + r.square() / v)
        v_e = out["energy_var"] / n.square() + NLL_FLOOR[0]
        total = (n * w_graph * nll(err.detach(), v_e) * batch[K.ENERGY_MASK]).sum() / denom[0]
        if "forces" in out and self.needs_forces:
            w_atom = w_graph[batch[K.BATCH]] * batch[K.FORCES_MASK]
            r = out["forces"].detach().double() - batch[K.FORCES].double()  # [N, 3]
            v_f = (out["forces_var_inv"] + out["forces_var_l1"]).double()[:, None] + NLL_FLOOR[1]
            total = total + (w_atom * nll(r, v_f).mean(dim=1)).sum() / denom[1]
        return total

    def errors(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Absolute-error sums per fidelity, float64 ``[F, 6 + 3 T]`` (``ERROR_COLUMNS``, ``TARGET_COLUMNS``): add
        over batches and ranks, then MAE = sum / count."""
        dev = out["energy"].device
        table = torch.zeros(self.num_fidelities, self.columns, dtype=torch.float64, device=dev)
        fid, emask = batch[K.FIDELITY], batch[K.ENERGY_MASK].double()
        e = ((out["energy"].detach() - batch[K.ENERGY]) / batch[K.N_ATOMS]).abs()
        table[:, 0].index_add_(0, fid, e * emask)
        table[:, 1].index_add_(0, fid, emask)
        if "forces" in out:
            fid_atom, fmask = fid[batch[K.BATCH]], batch[K.FORCES_MASK].double()
            f = (out["forces"].detach().double() - batch[K.FORCES].double()).abs().sum(dim=1)
            table[:, 2].index_add_(0, fid_atom, f * fmask)
            table[:, 3].index_add_(0, fid_atom, 3 * fmask)
        if "stress" in out:
            smask = batch[K.STRESS_MASK].double()
            s = (out["stress"].detach().double() - batch[K.STRESS].double()).abs().sum(dim=1)
            table[:, 4].index_add_(0, fid, s * smask)
            table[:, 5].index_add_(0, fid, 6 * smask)
        for k, t in enumerate(self.targets):
            if K.extra(t.name) not in out:
                continue
            mask = self._target_mask(k, batch).double()
            r = self._residual(t, out, batch).detach()
            item_fid = fid[batch[K.BATCH]] if t.per == "atom" else fid
            c = ERROR_COLUMNS + TARGET_COLUMNS * k
            table[:, c].index_add_(0, item_fid, r.abs().sum(dim=1) * mask)
            table[:, c + 1].index_add_(0, item_fid, r.square().sum(dim=1) * mask)
            table[:, c + 2].index_add_(0, item_fid, r.shape[1] * mask)
        return table


def error_metrics(table: torch.Tensor, fidelities: list[str], prefix: str,
                  targets: tuple[str, ...] = ()) -> dict[str, float]:
    """``{prefix/<fidelity>/energy_mae_per_atom, .../forces_mae, .../stress_mae}`` from summed
    :meth:`Loss.errors`, and ``.../<target>_mae``, ``_rmse`` per extra target named in
    ``targets`` (entries without labels are left out)."""
    metrics = {}
    for f, name in enumerate(fidelities):
        row = table[f].tolist()
        for label, (s, c) in (("energy_mae_per_atom", row[0:2]), ("forces_mae", row[2:4]),
                              ("stress_mae", row[4:6])):
            if c > 0:
                metrics[f"{prefix}/{name}/{label}"] = s / c
        for k, target in enumerate(targets):
            a, sq, c = row[ERROR_COLUMNS + TARGET_COLUMNS * k:ERROR_COLUMNS + TARGET_COLUMNS * (k + 1)]
            if c > 0:
                metrics[f"{prefix}/{name}/{target}_mae"] = a / c
                metrics[f"{prefix}/{name}/{target}_rmse"] = (sq / c) ** 0.5
    return metrics
