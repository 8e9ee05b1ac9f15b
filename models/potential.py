"""``Potential(backbone, ...)``: energy per structure, forces and stress as its derivatives.

The backbone maps a Batch (``data_pipeline.keys``) to node features; per-fidelity heads
turn the invariant channels into atomic energies; elemental reference energies of the
structure's fidelity (from the data manifest) are added; the sum per structure is taken
in float64 (total energies reach 1e4 eV, where float32 resolves only ~1e-3 eV).

Forces and stress are conservative by default: ``F = -dE/dr`` and
``sigma = (1/V) dE/d(strain)`` (ASE sign: positive under tension), by autograd through
the edge vectors. With ``create_graph`` (training) the derivatives stay differentiable,
so a force loss trains the weights (double backward). Optional direct heads predict
forces (and stress) from l = 1 (and l = 0/2) features instead: no double backward, for
cheap pretraining later fine-tuned to conservative.

Precision: ``precision = "bf16"`` runs the backbone's heavy ops in bf16 under autocast
(``models/layers/precision.py``); weights, geometry, heads and references keep theirs.
"""

from __future__ import annotations

import torch
from torch import nn

from common.fidelities import FidelityError, FidelityTable
from data_pipeline import keys as K
from models.layers.embedding import MAX_Z
from models.layers.heads import FidelityScalarHeads
from models.layers.precision import compute_precision
from models.properties import PropertyHeads, TargetConfig
from models.uncertainty import Uncertainty
from models.uncertainty import features as uncertainty_features

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))  # xx yy zz yz xz xy


class Potential(nn.Module):
    """Backbone + fidelity heads + elemental references -> energy, forces, stress.

    Args:
        backbone: module ``(numbers, vectors, edge_index, batch, fidelity, charge, spin)
            -> [N, K, C]`` node features, index 0 invariant, indices 1-3 the l = 1 part.
        fidelities: the fidelity table (:class:`~common.fidelities.FidelityTable`), or its
            names in the order of the batch's ``fidelity`` ids.
        channels: C of the backbone's output.
        element_references: with a list of names, ``{fidelity: {symbol or Z: eV}}`` (the
            manifest's ``element_references[f]["energies"]``); missing entries are 0.
        learn_references: train a shift of the references: a float32 parameter
            (``reference_shift``, starting at 0) added to the float64 manifest values, so
            the learned references keep float64 precision in every ZeRO stage, the EMA and
            the release (ZeRO-3 refuses float64 parameters).
        direct_forces, direct_stress: add direct heads; ``forward(..., direct=True)`` uses
            them (forces from l = 1 features; stress from pair invariants times r (x) r / V).
        repulsion: a short-range pair prior added to the energy
            (:class:`~models.layers.zbl.ZBLRepulsion`), or None; its own forces and stress
            are its exact derivatives in every mode (direct heads learn the rest).
        uncertainty: ``none``, ``llpr`` or ``ensemble`` (:mod:`models.uncertainty`), with
            ``members`` ensemble members.
        targets: extra targets (charges, dipoles, ...: :mod:`models.properties`), heads
            per fidelity on the same features.
        delta: ``{fidelity: base fidelity}``: that fidelity's energy head learns a correction
            to the base's (:meth:`~models.layers.heads.FidelityScalarHeads.set_delta`); a base
            is not itself a delta.

    ``precision`` (attribute, not saved): ``"fp32"`` (default) or ``"bf16"`` (the backbone's
    matmuls and contractions in bf16; see ``models/layers/precision.py``).
    """

    def __init__(self, backbone: nn.Module, fidelities: FidelityTable | list[str], channels: int,
                 head_hidden: int = 64, element_references: dict | None = None,
                 learn_references: bool = False, direct_forces: bool = False,
                 direct_stress: bool = False, repulsion: nn.Module | None = None,
                 uncertainty: str = "none", members: int = 8,
                 targets: list[TargetConfig] | None = None, delta: dict[str, str] | None = None):
        super().__init__()
        self.backbone = backbone
        self.table = (fidelities if isinstance(fidelities, FidelityTable)
                      else FidelityTable(list(fidelities), dict(element_references or {})))
        self.fidelities = self.table.names
        self.cutoff = float(backbone.radial.basis.cutoff)
        self.heads = FidelityScalarHeads(channels, head_hidden, len(self.fidelities))
        self.delta = dict(delta or {})
        self.heads.set_delta(delta_bases(self.delta, self.fidelities))
        self.register_buffer("references", reference_table(self.fidelities, self.table.references))
        self.reference_shift = (nn.Parameter(torch.zeros(len(self.fidelities), MAX_Z + 1))
                                if learn_references else None)
        self.force_head = nn.Linear(channels, 1, bias=False) if direct_forces else None
        # direct stress: (1/V) sum over edges of w_e r_e (x) r_e, w_e from both atoms'
        # invariants: symmetric and equivariant by construction, for any backbone
        self.stress_head = nn.Linear(channels, 1) if direct_stress else None
        self.repulsion = repulsion
        self.uncertainty = (None if uncertainty == "none" else
                            Uncertainty(uncertainty, len(self.fidelities), head_hidden, channels, members))
        self.properties = (PropertyHeads(targets, self.fidelities, channels, head_hidden, self.cutoff)
                           if targets else None)
        self.precision = "fp32"

    def attach_uncertainty(self, method: str, members: int = 8) -> Uncertainty:
        """Give a trained model an (unfitted) uncertainty method, e.g. LLPR post hoc."""
        ref = self.references
        self.uncertainty = Uncertainty(method, len(self.fidelities), self.heads.h,
                                       self.heads.hidden.in_features, members).to(ref.device)
        return self.uncertainty

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.float()``, ``.bfloat16()``, ...: the references move with the model
        but stay float64 (a total energy of 1e4 eV in bf16 would be off by 30 eV)."""
        refs = self.references.data
        out = super()._apply(fn, recurse)
        self.references.data = refs.to(self.references.device)
        return out

    def forward(self, batch: dict[str, torch.Tensor], forces: bool = True, stress: bool = False,
                create_graph: bool | None = None, direct: bool = False,
                uncertainty: bool | str = False, properties: bool = True) -> dict[str, torch.Tensor]:
        """``{"energy": float64 [G], "forces": [N, 3], "stress": [G, 6]}`` (as requested).

        ``direct``: forces from the direct force head, stress from the direct stress head
        where the model has one, else the strain derivative of the energy (a direct-force
        model trained without a stress loss has no stress head).

        ``uncertainty``: True adds ``energy_uncertainty [G]`` (eV) and ``forces_uncertainty
        [N]`` (eV/A per component), calibrated, and the raw variances; ``"features"`` adds
        what LLPR accumulates instead (:func:`models.uncertainty.features`). A training
        ensemble always returns its raw variances and member forces (the loss's NLL).

        ``properties``: a model with extra targets adds ``extras.<name>`` for each
        (:mod:`models.properties`; heads on the same features: no second backbone pass).
        """
        create_graph = self.training if create_graph is None else create_graph
        pos, cell, b = batch[K.POSITIONS], batch[K.CELL], batch[K.BATCH]
        direct_stress = direct and stress and self.stress_head is not None
        grad_forces, grad_stress = forces and not direct, stress and not direct_stress
        if grad_forces:
            pos = pos.detach().requires_grad_(True)
        strain = None
        if grad_stress:
            # symmetric strain eps: r -> r (1 + eps), cell -> cell (1 + eps); dE/d eps = V sigma
            strain = torch.zeros_like(cell).requires_grad_(True)
            sym = 0.5 * (strain + strain.transpose(1, 2))
            pos = pos + torch.einsum("na,nab->nb", pos, sym[b])
            cell = cell + torch.bmm(cell, sym)
        i, j = batch[K.EDGE_INDEX]
        # edge vectors from differences (torch.cdist has no double backward)
        vectors = pos[j] - pos[i] + torch.einsum("ek,ekl->el", batch[K.CELL_SHIFTS], cell[b[i]])
        # geometry in the weights' precision (fp32 or fp64), also when the backbone's heavy
        # ops run in bf16; the heads read its output in that precision again
        dtype = next(self.backbone.parameters()).dtype
        with compute_precision(pos.device, self.precision):
            x = self.backbone(batch[K.NUMBERS], vectors.to(dtype), batch[K.EDGE_INDEX], b,
                              batch[K.FIDELITY], batch[K.CHARGE], batch[K.SPIN])  # [N, K, C]
        x = x.to(dtype)
        fid_atom = batch[K.FIDELITY][b]
        head_e, h = self.heads(x[:, 0], fid_atom, features=True)
        atomic = head_e.double() + self.reference_energies(fid_atom, batch[K.NUMBERS])
        if self.repulsion is not None:  # float64 from the geometry, never bf16
            atomic = atomic + self.repulsion(batch[K.NUMBERS], vectors, batch[K.EDGE_INDEX])
        energy = torch.zeros(batch[K.N_ATOMS].shape[0], dtype=torch.float64, device=pos.device)
        energy = energy.index_add(0, b, atomic)
        out = {"energy": energy}
        if properties and self.properties is not None:
            out.update(self.properties(x, batch, vectors))
        n_graphs = batch[K.N_ATOMS].shape[0]
        if uncertainty == "features":
            out.update(uncertainty_features(h, x, b, n_graphs))
        elif self.uncertainty is not None and (
                uncertainty or (self.training and self.uncertainty.method == "ensemble")):
            raw = self.uncertainty(h, x, fid_atom, batch[K.FIDELITY], b, n_graphs)
            out.update(raw)
            if uncertainty:
                out.update(self.uncertainty.calibrated(raw, fid_atom, batch[K.FIDELITY]))
        elif uncertainty:
            raise RuntimeError("uncertainty requested but the model has none (model.uncertainty: "
                               "ensemble, or fit LLPR post hoc: mlip-pretrain release create)")
        if direct and forces:
            out["forces"] = self._direct_forces(x)
        if direct_stress:
            out["stress"] = self._direct_stress(x, vectors, i, j, batch)
        if direct and self.repulsion is not None and (forces or direct_stress):
            rep_forces, rep_strain = self.repulsion.derivatives(batch[K.NUMBERS], vectors, batch[K.EDGE_INDEX],
                                                                b, batch[K.N_ATOMS].shape[0])
            if forces:
                out["forces"] = out["forces"] + rep_forces.to(out["forces"].dtype)
            if direct_stress:
                sigma = rep_strain * _inverse_volume(batch[K.CELL])[:, None, None]
                out["stress"] = out["stress"] + torch.stack([sigma[:, a, c] for a, c in VOIGT], dim=1).to(
                    out["stress"].dtype)
        if grad_forces or grad_stress:
            inputs = ([pos] if grad_forces else []) + ([strain] if grad_stress else [])
            total = energy.sum()  # the ones seed written out: the torch.export trace records it as an op
            grads = torch.autograd.grad(total, inputs, torch.ones_like(total), create_graph=create_graph)
            if grad_forces:
                out["forces"] = -grads[0]
            if grad_stress:
                sigma = grads[-1] * _inverse_volume(batch[K.CELL])[:, None, None]
                out["stress"] = torch.stack([sigma[:, a, c] for a, c in VOIGT], dim=1)
        return out

    def reference_energies(self, fidelity: torch.Tensor | None = None,
                           numbers: torch.Tensor | None = None) -> torch.Tensor:
        """float64 elemental references added to each atom (``fidelity``, ``numbers``: per
        atom), or the whole ``[F, MAX_Z + 1]`` table: the manifest's plus the learned shift."""
        refs = self.references if fidelity is None else self.references[fidelity, numbers]
        if self.reference_shift is None:
            return refs
        shift = self.reference_shift if fidelity is None else self.reference_shift[fidelity, numbers]
        return refs + shift.double()

    def _direct_forces(self, x: torch.Tensor) -> torch.Tensor:
        if self.force_head is None:
            raise RuntimeError("direct forces requested but the model has no direct force head "
                               "(model.direct_forces=true)")
        return self.force_head(x[:, 1:4]).squeeze(-1)  # l = 1 components: e3nn orders them x, y, z

    def _direct_stress(self, x, vectors, i, j, batch) -> torch.Tensor:
        w = self.stress_head(x[i, 0] * x[j, 0]).squeeze(-1)  # [E], symmetric in i and j
        outer = w[:, None, None] * vectors[:, :, None] * vectors[:, None, :]  # [E, 3, 3]
        b = batch[K.BATCH]
        sigma = outer.new_zeros(batch[K.N_ATOMS].shape[0], 3, 3).index_add(0, b[i], outer)
        sigma = sigma * _inverse_volume(batch[K.CELL])[:, None, None]
        return torch.stack([sigma[:, a, c] for a, c in VOIGT], dim=1)


def _inverse_volume(cell: torch.Tensor) -> torch.Tensor:
    """``1 / |det(cell)|`` per structure, 0 where the cell has no volume (molecules,
    slabs without a vacuum vector): stress is reported as 0 there, not divided by 0."""
    volume = torch.linalg.det(cell).abs()
    return torch.where(volume > 1e-12, 1.0 / volume.clamp_min(1e-12), torch.zeros_like(volume))


def delta_bases(delta: dict[str, str], fidelities: list[str]) -> list[int]:
    """The base head of each fidelity (-1: none) from ``{fidelity: base fidelity}``; names
    outside the table, a fidelity that is its own base, or a chain are refused."""
    base = [-1] * len(fidelities)
    for fid, of in delta.items():
        missing = [n for n in (fid, of) if n not in fidelities]
        if missing:
            raise FidelityError(f"model.delta names {missing}, not fidelities of this model "
                                f"({fidelities}); name the data's fidelities")
        if fid == of or of in delta:
            raise FidelityError(f"model.delta: {fid} -> {of}: a base must be another fidelity and "
                                "not itself a delta")
        base[fidelities.index(fid)] = fidelities.index(of)
    return base


def reference_table(fidelities: list[str], refs: dict) -> torch.Tensor:
    """``float64 [F, MAX_Z + 1]`` reference energy of each element under each fidelity."""
    from ase.data import atomic_numbers  # noqa: PLC0415

    table = torch.zeros(len(fidelities), MAX_Z + 1, dtype=torch.float64)
    for f, name in enumerate(fidelities):
        for element, value in refs.get(name, {}).items():
            z = int(element) if str(element).isdigit() else atomic_numbers[element]
            table[f, z] = float(value)
    return table


#: parameters and buffers of a Potential with one equal block of rows per fidelity, in
#: table order (moved by name when a model's table changes: :func:`remap_state`), besides
#: the property heads' (``properties.*``: all per fidelity)
PER_FIDELITY = ("backbone.embed.fidelity.weight", "heads.hidden.weight", "heads.hidden.bias",
                "heads.out_w", "heads.out_b", "references", "reference_shift",
                "uncertainty.energy_members", "uncertainty.force_members", "uncertainty.force_members_inv",
                "uncertainty.energy_precision", "uncertainty.force_precision", "uncertainty.force_precision_inv",
                "uncertainty.scale", "uncertainty.widths")


#: the backbone's per-fidelity rows: a new delta fidelity starts from its base's
BACKBONE_ROWS = ("backbone.embed.fidelity.weight", ".film.")


def remap_state(state: dict[str, torch.Tensor], old: FidelityTable, fresh: dict[str, torch.Tensor],
                new: FidelityTable, delta: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """``state`` of a model with fidelity table ``old`` rewritten for one with ``new``.

    Per-fidelity rows (:data:`PER_FIDELITY`) are moved by name; a fidelity of ``new`` that
    ``old`` lacks keeps its rows of ``fresh`` (the new model's initial state: a new head), and
    so does a property head ``old`` lacks altogether. A new fidelity that is a delta of an
    old one (``delta``: ``{fidelity: base}``) takes its base's backbone rows
    (:data:`BACKBONE_ROWS`), so with its zeroed delta head it starts at the base's answer
    (plus its own references). Every other tensor is copied unchanged.
    """
    delta = delta or {}
    out = dict(state)
    # every property head's tensor is a block of rows per fidelity (models/properties.py), and
    # so is every layer's fidelity conditioning (backbone.film.<k>.weight)
    keys = PER_FIDELITY + tuple(k for k in fresh if k.startswith("properties.") or ".film." in k)
    for key in keys:
        if key not in state and key.startswith("properties.") and key in fresh:
            out[key] = fresh[key].clone()  # a target the old model did not have: a fresh head
            continue
        if key not in state or key not in fresh:
            continue
        src, dst = state[key], fresh[key].clone()
        if src.shape[0] % len(old) or dst.shape[0] % len(new):
            raise FidelityError(f"{key}: {src.shape[0]} rows do not split into {len(old)} fidelities")
        k = src.shape[0] // len(old)
        backbone = any(part in key for part in BACKBONE_ROWS)
        for f, name in enumerate(new.names):
            source = name if name in old.names else delta.get(name) if backbone else None
            if source in old.names:
                g = old.index(source)
                dst[f * k:(f + 1) * k] = src[g * k:(g + 1) * k].to(dst.dtype)
        out[key] = dst
    return out
