"""A trained model served at one fidelity: ASE ``Atoms`` in, energies, forces and stress out.

:class:`Predictor` is what the ASE calculator (``pretrain/release/calculator.py``) runs,
and what any other client (a script, an MD engine's glue) can run without ASE's
``Calculator`` around it:

* the fidelity is chosen by name through the model's fidelity table (an unknown name is
  an error listing the ones it has, never a fallback to another head);
* forces are served as the model was trained: conservative (``-dE/dr``) or from its
  direct head (``TrainedModel.forces``);
* an element the fidelity's training data never contained has no elemental reference
  (0 eV), so a total energy with it is off by that whole reference: refused by default
  (``coverage="error"``), or with a warning (``"warn"``) or silently (``"ignore"``) when
  asked;
* charge and spin multiplicity come from ``atoms.info["charge"]`` / ``["spin"]``, else the
  predictor's defaults (0 and 0: "unknown"), within the range the model embeds;
* many structures are batched by atom count (:meth:`Predictor.predict`);
* a model with calibrated uncertainty at this fidelity (``models/uncertainty.py``) also
  returns ``energy_uncertainty`` (eV) and ``forces_uncertainty`` (eV/A per atom and
  component): a few small matmuls on features the forward pass has already made;
* a model with extra targets trained at this fidelity (``models/properties.py``) also
  returns them under their ASE names: ``charges [n]`` (e, summing to the charge),
  ``dipole [3]`` (e*A), ``magmoms [n]`` (muB), any other target under its own name.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from common.errors import UserError
from data_pipeline import keys as K
from data_pipeline.batch import atoms_batch, to_torch

PREDICT_ATOMS = {"cpu": 128, "cuda": 4096}  # predict's default batch size per device type
MAX_CHARGE, MAX_SPIN = 10, 10  # the range the embedding was built for (models/layers/embedding.py)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
COVERAGE = ("error", "warn", "ignore")


class CoverageWarning(UserWarning):
    """An element the chosen fidelity's training data did not contain."""


class CoverageError(UserError, ValueError):
    """An element the chosen fidelity's training data did not contain (``coverage="error"``)."""


def prepare(model: torch.nn.Module, device: str | torch.device, dtype: str) -> torch.nn.Module:
    """``model`` on ``device`` in ``dtype`` for inference, its elemental references float64."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}, expected one of {sorted(DTYPES)}")
    refs = model.references.detach().double().clone()
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    model.references.data = refs.to(device)  # totals reach 1e4 eV: float32 would round them
    for p in model.parameters():
        p.requires_grad_(False)  # forces come from positions; weights need no gradient
    return model


class NoUncertaintyError(UserError, RuntimeError):
    """Uncertainty asked of a model, or a fidelity, that carries none."""


class Predictor:
    """One fidelity of a trained model (:class:`~pretrain.weights.TrainedModel`), served."""

    def __init__(self, trained, fidelity: str, device: str = "cpu", dtype: str = "float32",
                 coverage: str = "error", charge: int = 0, spin: int = 0):
        if coverage not in COVERAGE:
            raise ValueError(f"coverage: got {coverage!r}, expected one of {', '.join(COVERAGE)}")
        self.fidelity_id = trained.table.index(fidelity, where=str(trained.path))
        self.fidelity, self.coverage, self.direct = fidelity, coverage, trained.direct
        self.elements = set(trained.table.elements.get(fidelity) or [])
        self.device, self.dtype = torch.device(device), dtype
        self.model = prepare(trained.potential, self.device, dtype)
        self.default_charge, self.default_spin = check_state(charge, spin, "predictor arguments")
        unc = trained.potential.uncertainty
        self.uncertainty = unc is not None and self.fidelity_id in unc.calibrated_fidelities
        self._where = str(trained.path)
        heads = trained.potential.properties
        #: ``{served name: (target name, per)}`` of the extra targets trained at this fidelity
        self.properties = {t.served_as: (t.name, t.per) for t in (heads.targets if heads else [])
                           if heads.serves(t.name, fidelity)}

    def require_uncertainty(self) -> None:
        """Raise :class:`NoUncertaintyError` saying why this predictor has no uncertainty."""
        if self.uncertainty:
            return
        if self.model.uncertainty is None:
            raise NoUncertaintyError(f"{self._where}: this model carries no uncertainty (a release made "
                                     "before format 3, or with --uncertainty none); release it again with "
                                     "mlip-pretrain release create to add it")
        raise NoUncertaintyError(f"{self._where}: the uncertainty is not calibrated for fidelity "
                                 f"{self.fidelity!r} (no labelled held-out data of it at release time)")

    def interval(self, level: float = 0.95) -> dict[str, float]:
        """Half-widths of the calibrated central ``level`` interval in units of the
        uncertainty: ``{"energy": w, "forces": w}`` (the interval is ``+-w * sigma``; 1.96 at
        95% by construction, below the normal quantile at lower levels for heavy-tailed errors)."""
        self.require_uncertainty()
        energy, forces = self.model.uncertainty.interval(self.fidelity_id, level)
        return {"energy": energy, "forces": forces}

    def batch(self, atoms_list) -> dict[str, torch.Tensor]:
        """The model batch of ``atoms_list`` on the device (coverage, charge and spin checked)."""
        for k, atoms in enumerate(atoms_list):
            self.check_coverage(atoms, k)
        batch = atoms_batch(atoms_list, self.model.cutoff, self.fidelity_id, self.dtype)
        states = [check_state(a.info.get("charge", self.default_charge),
                              a.info.get("spin", self.default_spin), f"structure {k} info")
                  for k, a in enumerate(atoms_list)]
        batch[K.CHARGE] = np.array([c for c, _ in states], dtype=np.int64)
        batch[K.SPIN] = np.array([s for _, s in states], dtype=np.int64)
        return {k: v.to(self.device) for k, v in to_torch(batch).items()}

    def check_coverage(self, atoms, k: int = 0) -> None:
        """Refuse, warn about or pass elements outside the fidelity's training data."""
        if self.coverage == "ignore" or not self.elements:
            return
        outside = sorted(set(atoms.get_chemical_symbols()) - self.elements)
        if not outside:
            return
        msg = (f"structure {k}: {', '.join(outside)} not in the {self.fidelity!r} training data "
               f"(it covered {' '.join(sorted(self.elements))}): no elemental reference, so the total "
               "energy is off by it; pick a fidelity that covers them, or pass coverage='warn' to "
               "get the extrapolation anyway")
        if self.coverage == "error":
            raise CoverageError(msg)
        warnings.warn(msg, CoverageWarning, stacklevel=4)

    def run(self, atoms_list, stress: bool) -> dict[str, np.ndarray]:
        """Energies ``[G]``, forces ``[N, 3]``, (``stress``) stress ``[G, 6]`` and, where
        calibrated, ``energy_uncertainty [G]`` and ``forces_uncertainty [N]`` of one batch,
        as float64 numpy arrays."""
        batch = self.batch(atoms_list)
        with torch.enable_grad():
            out = self.model(batch, forces=True, stress=stress, create_graph=False, direct=self.direct,
                             uncertainty=self.uncertainty)
        keep = ("energy", "forces", "stress", "energy_uncertainty", "forces_uncertainty")
        result = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in out.items() if k in keep}
        for served, (name, _) in self.properties.items():
            result[served] = out[K.extra(name)].detach().cpu().numpy().astype(np.float64)
        return result

    def predict(self, atoms_list, max_atoms: int | None = None) -> list[dict[str, np.ndarray]]:
        """Energy, forces (and stress of periodic cells, uncertainties and extra targets
        where the model has them) of many structures, batched to ``max_atoms`` atoms per
        forward pass; one dict per structure, in order.

        ``max_atoms`` defaults to 4,096 on a GPU and 128 on a CPU: on CPU the per-slot
        tensors of a batch (atoms x neighbours x features) outgrow the caches, and a
        128-atom batch ran 2.4x faster per structure than a 4,096-atom one (8-64-atom
        cells, 0.9 M-parameter MACE, 2 threads; BENCHMARKS.md "Inference")."""
        if max_atoms is None:
            max_atoms = PREDICT_ATOMS.get(self.device.type, PREDICT_ATOMS["cuda"])
        results, chunk, size = [], [], 0
        for atoms in list(atoms_list) + [None]:
            if chunk and (atoms is None or size + len(atoms) > max_atoms):
                periodic = [is_periodic(a) for a in chunk]
                out = self.run(chunk, stress=any(periodic))
                starts = np.cumsum([0] + [len(a) for a in chunk])
                for k, a in enumerate(chunk):
                    r = {"energy": float(out["energy"][k]), "forces": out["forces"][starts[k]:starts[k + 1]]}
                    if periodic[k]:
                        r["stress"] = out["stress"][k]
                    if self.uncertainty:
                        r["energy_uncertainty"] = float(out["energy_uncertainty"][k])
                        r["forces_uncertainty"] = out["forces_uncertainty"][starts[k]:starts[k + 1]]
                    for served, (_, per) in self.properties.items():
                        r[served] = out[served][starts[k]:starts[k + 1]] if per == "atom" else out[served][k]
                    results.append(r)
                chunk, size = [], 0
            if atoms is not None:
                chunk.append(atoms)
                size += len(atoms)
        return results


def is_periodic(atoms) -> bool:
    """Whether ``atoms`` has a stress: periodic in all three directions, with a volume."""
    return bool(atoms.pbc.all()) and atoms.cell.volume > 1e-12


def check_state(charge, spin, where: str) -> tuple[int, int]:
    """Validated integer total charge and spin multiplicity."""
    try:
        c, s = int(charge), int(spin)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: charge and spin must be integers, got {charge!r}, {spin!r}") from None
    if c != charge or s != spin:
        raise ValueError(f"{where}: charge and spin must be integers, got {charge!r}, {spin!r}")
    if not -MAX_CHARGE <= c <= MAX_CHARGE:
        raise ValueError(f"{where}: charge {c} outside [-{MAX_CHARGE}, {MAX_CHARGE}] the model supports")
    if not 0 <= s <= MAX_SPIN:
        raise ValueError(f"{where}: spin multiplicity {s} outside [0, {MAX_SPIN}] (0: unknown)")
    return c, s
