"""An ASE calculator on a release folder: ``MLIPCalculator.from_release(DIR, fidelity=...)``.

Example::

    from ase.build import molecule
    from models.calculator import MLIPCalculator

    calc = MLIPCalculator.from_release("releases/my-model", fidelity="PBE/def2-SVP")
    atoms = molecule("H2O")
    atoms.calc = calc
    atoms.get_potential_energy(), atoms.get_forces()
    calc.predict([atoms1, atoms2, ...])      # many structures, batched by atom count

The release is read from ``config.json`` and ``model.safetensors`` only (no pickle, no
code from the folder; ``models/release_format.py``), its SHA256SUMS checked first.

* ``fidelity``: a name of the release's fidelity table; an unknown name is an error
  listing the available ones (never a fallback to some other head).
* Charge and spin multiplicity come from ``atoms.info["charge"]`` and
  ``atoms.info["spin"]``, else from the calculator's ``charge`` / ``spin`` arguments
  (defaults 0 and 0; spin 0 means "unknown", as in training data without spin labels).
  Use the convention of the fidelity's training data (molecular DFT data usually gives
  the multiplicity: 1 for closed-shell singlets).
* An element outside the fidelity's training data warns (``coverage="warn"``), raises
  (``"error"``) or passes (``"ignore"``).
* Stress (Voigt, eV/A^3, ASE sign) is available for fully periodic cells.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from data_pipeline.manifest import FidelityError

PREDICT_ATOMS = {"cpu": 128, "cuda": 4096}  # predict's default batch size per device type
MAX_CHARGE, MAX_SPIN = 10, 10  # the range the embedding was built for (models/layers/embedding.py)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class CoverageWarning(UserWarning):
    """An element the chosen fidelity's training data did not contain."""


def prepare(model, device: str | torch.device, dtype: str):
    """``model`` on ``device`` in ``dtype``, its elemental references kept float64."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: got {dtype!r}, expected one of {sorted(DTYPES)}")
    refs = model.references.detach().double().clone()
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    model.references.data = refs.to(device)  # totals reach 1e4 eV: float32 would round them
    for p in model.parameters():
        p.requires_grad_(False)  # forces come from positions; weights need no gradient
    return model


class MLIPCalculator(Calculator):
    """ASE calculator of one fidelity of a released potential."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model, config: dict, fidelity: str, device: str = "cpu",
                 dtype: str = "float32", coverage: str = "warn", charge: int = 0, spin: int = 0,
                 **kwargs):
        super().__init__(**kwargs)
        names = [f["name"] for f in config["fidelities"]]
        if fidelity not in names:
            raise FidelityError(f"fidelity {fidelity!r} is not in this release; available: {names}")
        if coverage not in ("warn", "error", "ignore"):
            raise ValueError(f"coverage: got {coverage!r}, expected warn, error or ignore")
        self.config, self.fidelity, self.coverage = config, fidelity, coverage
        self.fidelity_id = names.index(fidelity)
        self.elements = set(config["fidelities"][self.fidelity_id].get("elements") or [])
        self.device, self.dtype = torch.device(device), dtype
        self.model = prepare(model, self.device, dtype)
        self.default_charge, self.default_spin = _check_state(charge, spin, "calculator arguments")

    @classmethod
    def from_release(cls, folder: str | Path, fidelity: str, device: str = "cpu",
                     dtype: str = "float32", coverage: str = "warn", verify: bool = True,
                     **kwargs) -> "MLIPCalculator":
        """The calculator of ``fidelity`` of the release at ``folder`` (checksums checked
        unless ``verify=False``)."""
        from models.release_format import load_release  # noqa: PLC0415

        model, config = load_release(folder, verify=verify)
        return cls(model, config, fidelity, device, dtype, coverage, **kwargs)

    @property
    def fidelities(self) -> list[str]:
        return [f["name"] for f in self.config["fidelities"]]

    def _batch(self, atoms_list) -> dict[str, torch.Tensor]:
        from data_pipeline import keys as K  # noqa: PLC0415
        from data_pipeline.stream.collate import collate_atoms, to_torch  # noqa: PLC0415

        for k, atoms in enumerate(atoms_list):
            self._check_coverage(atoms, k)
        batch = collate_atoms(atoms_list, self.model.cutoff, self.fidelity_id, self.dtype)
        states = [_check_state(a.info.get("charge", self.default_charge),
                               a.info.get("spin", self.default_spin), f"structure {k} info")
                  for k, a in enumerate(atoms_list)]
        batch[K.CHARGE] = np.array([c for c, _ in states], dtype=np.int64)
        batch[K.SPIN] = np.array([s for _, s in states], dtype=np.int64)
        return {k: v.to(self.device) for k, v in to_torch(batch).items()}

    def _check_coverage(self, atoms, k: int) -> None:
        if self.coverage == "ignore" or not self.elements:
            return
        outside = sorted(set(atoms.get_chemical_symbols()) - self.elements)
        if not outside:
            return
        msg = (f"structure {k}: {', '.join(outside)} not in the {self.fidelity!r} training data "
               f"(it covered {' '.join(sorted(self.elements))}): an extrapolation")
        if self.coverage == "error":
            raise ValueError(msg)
        warnings.warn(msg, CoverageWarning, stacklevel=4)

    def _run(self, atoms_list, stress: bool) -> dict[str, np.ndarray]:
        batch = self._batch(atoms_list)
        with torch.enable_grad():
            out = self.model(batch, forces=True, stress=stress, create_graph=False)
        return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in out.items()}

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """ASE's entry point: energy, free_energy, forces and (periodic cells) stress."""
        super().calculate(atoms, properties, system_changes)
        periodic = bool(self.atoms.pbc.all()) and self.atoms.cell.volume > 1e-12
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a fully periodic cell with a volume")
        out = self._run([self.atoms], stress=periodic)
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy, "forces": out["forces"]}
        if periodic:
            self.results["stress"] = out["stress"][0]

    def predict(self, atoms_list, max_atoms: int | None = None) -> list[dict[str, np.ndarray]]:
        """Energy, forces (and stress of periodic cells) of many structures, batched to
        ``max_atoms`` atoms per forward pass; one dict per structure, in order.

        ``max_atoms`` defaults to 4,096 on a GPU and 128 on a CPU: on CPU the per-slot
        tensors of a batch (atoms x neighbours x features) outgrow the caches, and a
        128-atom batch ran 2.4x faster per structure than a 4,096-atom one (8-64-atom
        cells, 0.9 M-parameter MACE, 2 threads; BENCHMARKS.md "Inference")."""
        if max_atoms is None:
            max_atoms = PREDICT_ATOMS.get(self.device.type, PREDICT_ATOMS["cuda"])
        results, chunk, size = [], [], 0
        for atoms in list(atoms_list) + [None]:
            if chunk and (atoms is None or size + len(atoms) > max_atoms):
                periodic = [bool(a.pbc.all()) and a.cell.volume > 1e-12 for a in chunk]
                out = self._run(chunk, stress=any(periodic))
                starts = np.cumsum([0] + [len(a) for a in chunk])
                for k, a in enumerate(chunk):
                    r = {"energy": float(out["energy"][k]), "forces": out["forces"][starts[k]:starts[k + 1]]}
                    if periodic[k]:
                        r["stress"] = out["stress"][k]
                    results.append(r)
                chunk, size = [], 0
            if atoms is not None:
                chunk.append(atoms)
                size += len(atoms)
        return results


def _check_state(charge, spin, where: str) -> tuple[int, int]:
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
