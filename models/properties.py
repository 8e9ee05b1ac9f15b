"""Property heads: targets beyond the energy, read from the same backbone features.

A target is declared by the name of a record extra (``data_pipeline/build/recipe.py``)
and a kind:

* ``charges``: per-atom partial charges (e). A per-fidelity readout of the invariants
  gives raw values ``q~_i``; the excess over the structure's total charge ``Q`` is spread
  evenly over its atoms, ``q_i = q~_i + (Q - sum_j q~_j) / n``, in float64, so the charges
  sum to ``Q`` to rounding whatever the weights (the constraint is exact, not learned).
* ``atom_scalar``: any other per-atom scalar (``magmoms``, in muB, served as ASE's
  magnetic moments), no constraint.
* ``dipole``: the structure's dipole moment (e*A), ``mu = sum_i q_i r_i + sum_i p_i``: latent
  charges ``q_i`` (constrained to ``Q`` as above, learned only through the dipole) at the
  positions as given (the origin of the coordinates, as the reference codes report it; for
  a neutral structure the sum does not depend on the origin), plus, with
  ``atomic_dipoles``, a learned per-atom dipole ``p_i = sum_j c_ij r_ij``: the atom's edge
  vectors weighted by ``c_ij = phi(r_ij) sum_c w[f_i, c] s_ic s_jc`` (both atoms'
  invariants ``s``, a per-fidelity weight ``w``, a cosine cutoff ``phi`` that keeps the
  dipole smooth as neighbours come and go). Edge vectors, not l = 1 features: every
  backbone's invariants are invariant under inversion, while an SO(3)-only backbone's
  (eSEN's) l = 1 features do not flip, so this is an O(3)-equivariant vector for every
  family. Defined for molecules; in a periodic cell it depends on where atoms were wrapped.
* ``structure_scalar``: a per-structure scalar, the sum (``reduce: sum``, extensive) or the
  mean (``mean``, intensive) of per-atom contributions.

Heads are per fidelity, like the energy heads (one matmul for every fidelity, the atom's
own gathered); a target trains and is served only at the fidelities it declares. Outputs
are keyed ``extras.<name>`` (:func:`data_pipeline.keys.extra`), the batch key of its label.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from common.config import ConfigError
from data_pipeline import keys as K
from models.layers.heads import FidelityScalarHeads

KINDS = ("charges", "atom_scalar", "dipole", "structure_scalar")
#: ``per`` and trailing shape of each kind's label (the manifest's ``extras`` section
#: records the same for the data, checked against it before training)
LAYOUT = {"charges": ("atom", []), "atom_scalar": ("atom", []), "dipole": ("structure", [3]),
          "structure_scalar": ("structure", [])}
RESERVED = ("energy", "forces", "stress")
#: units of what a model serves as charges, dipole and magmoms (the build converts labels to them)
TARGET_UNITS = {"charges": "e", "dipole": "e*A", "magmoms": "muB"}


@dataclasses.dataclass
class TargetConfig:
    """One extra target: the record extra it learns, its kind, fidelities and loss weight."""

    name: str
    """The extra's name in the records (the recipe's ``extras`` ``name``), e.g. ``charges``."""
    kind: Literal["charges", "atom_scalar", "dipole", "structure_scalar"]
    """``charges`` (per atom, sum = total charge), ``atom_scalar`` (per atom, e.g. magmoms),
    ``dipole`` (per structure, equivariant vector), ``structure_scalar``."""
    weight: float = 1.0
    """Loss weight of the target's term (per labelled atom for per-atom kinds, per labelled
    structure for per-structure kinds, in the label's unit)."""
    fidelities: list[str] = dataclasses.field(default_factory=list)
    """Fidelities whose heads learn and serve it; empty: every fidelity whose training
    records carry the extra (resolved from the manifest when training starts)."""
    atomic_dipoles: bool = True
    """``dipole``: add a learned per-atom dipole (from the atom's edge vectors) to the
    latent charges' dipole."""
    reduce: Literal["sum", "mean"] = "sum"
    """``structure_scalar``: sum (extensive) or mean (intensive) of atomic contributions."""

    def validate(self) -> None:
        """Names that can key a module and a batch; kinds and weights that can train."""
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"targets: name {self.name!r} must be letters, digits, '_' or '-'")
        if self.name in RESERVED:
            raise ConfigError(f"targets: {self.name!r} is the energy loss's own label; name an extra")
        if self.kind not in KINDS:
            raise ConfigError(f"targets.{self.name}.kind: got {self.kind!r}, expected one of {KINDS}")
        if not self.weight >= 0:
            raise ConfigError(f"targets.{self.name}.weight: got {self.weight}, expected >= 0")
        if self.reduce not in ("sum", "mean"):
            raise ConfigError(f"targets.{self.name}.reduce: got {self.reduce!r}, expected sum or mean")

    @property
    def per(self) -> str:
        """``atom`` or ``structure``: what one label belongs to."""
        return LAYOUT[self.kind][0]

    @property
    def served_as(self) -> str:
        """The ASE property name the calculator serves it as."""
        if self.kind in ("charges", "dipole"):
            return self.kind
        if self.kind == "atom_scalar" and self.name in ("magmoms", "magmom", "magnetic_moments"):
            return "magmoms"
        return self.name


def check_targets(targets: list[TargetConfig]) -> None:
    """Targets that cannot build together (the same name twice, or one invalid)."""
    names = [t.name for t in targets]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"targets: {dup} declared twice")
    for t in targets:
        t.validate()


def spread_to_total(raw: torch.Tensor, batch_index: torch.Tensor, total: torch.Tensor,
                    n_atoms: torch.Tensor) -> torch.Tensor:
    """``raw [N]`` shifted per structure so each sums to ``total [G]``: float64 ``[N]``."""
    raw = raw.double()
    excess = total.double() - torch.zeros_like(total, dtype=torch.float64).index_add(0, batch_index, raw)
    return raw + (excess / n_atoms.double())[batch_index]


class PropertyHeads(nn.Module):
    """The heads of ``targets`` for ``num_fidelities`` fidelities (see the module docstring).

    ``forward(x [N, K, C], batch, vectors [E, 3]) -> {extras.<name>: prediction}``:
    per-atom kinds ``[N]`` (charges float64), ``dipole [G, 3]`` float64,
    ``structure_scalar [G]``. ``cutoff``: the model's, where the atomic dipoles' edge
    weights reach 0.
    """

    def __init__(self, targets: list[TargetConfig], fidelities: list[str], channels: int,
                 hidden: int, cutoff: float):
        super().__init__()
        check_targets(targets)
        self.cutoff = float(cutoff)
        self.targets = list(targets)
        self.fidelities = list(fidelities)
        f = len(fidelities)
        self.readouts = nn.ModuleDict({t.name: FidelityScalarHeads(channels, hidden, f) for t in targets})
        # per-atom dipole weights over the invariant channels, per fidelity: small, so
        # training starts from the latent charges' dipole
        self.vectors = nn.ParameterDict({
            t.name: nn.Parameter(torch.randn(f, channels) * 0.01 / channels**0.5)
            for t in targets if t.kind == "dipole" and t.atomic_dipoles})

    def serves(self, name: str, fidelity: str) -> bool:
        """Whether target ``name`` is trained at ``fidelity``."""
        t = next((t for t in self.targets if t.name == name), None)
        return t is not None and fidelity in (t.fidelities or self.fidelities)

    def forward(self, x: torch.Tensor, batch: dict[str, torch.Tensor],
                vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        b, fid = batch[K.BATCH], batch[K.FIDELITY]
        fid_atom = fid[b]
        n_graphs = batch[K.N_ATOMS].shape[0]
        out = {}
        for t in self.targets:
            atomic = self.readouts[t.name](x[:, 0], fid_atom)  # [N]
            if t.kind == "charges":
                value = spread_to_total(atomic, b, batch[K.CHARGE], batch[K.N_ATOMS])
            elif t.kind == "atom_scalar":
                value = atomic
            elif t.kind == "dipole":
                q = spread_to_total(atomic, b, batch[K.CHARGE], batch[K.N_ATOMS])
                moment = q[:, None] * batch[K.POSITIONS].double()  # [N, 3]
                if t.name in self.vectors:
                    moment = moment + self._atomic_dipoles(x[:, 0], fid_atom, batch, vectors, t.name).double()
                value = moment.new_zeros(n_graphs, 3).index_add(0, b, moment)  # [G, 3]
            else:
                value = atomic.new_zeros(n_graphs).index_add(0, b, atomic)  # [G]
                if t.reduce == "mean":
                    value = value / batch[K.N_ATOMS].to(value.dtype)
            out[K.extra(t.name)] = value
        return out

    def _atomic_dipoles(self, s, fid_atom, batch, vectors, name: str) -> torch.Tensor:
        """``p_i = sum_j c_ij r_ij`` ``[N, 3]``, ``c_ij = phi(r_ij) sum_c w[f_i, c] s_ic s_jc``."""
        i, j = batch[K.EDGE_INDEX]
        vectors = vectors.to(s.dtype)
        r = vectors.norm(dim=-1)
        phi = 0.5 * (torch.cos(torch.pi * (r / self.cutoff).clamp(max=1.0)) + 1.0)  # [E], 0 at the cutoff
        c = ((s[i] * self.vectors[name][fid_atom[i]]) * s[j]).sum(dim=-1) * phi  # [E]
        return torch.zeros_like(s[:, :3]).index_add(0, i, c[:, None] * vectors)
