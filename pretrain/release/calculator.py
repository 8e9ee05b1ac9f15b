"""An ASE calculator on a release folder: ``MLIPCalculator.from_release(DIR, fidelity=...)``.

Example::

    from ase.build import molecule
    from pretrain.release import MLIPCalculator

    calc = MLIPCalculator.from_release("releases/my-model", fidelity="PBE/def2-SVP")
    atoms = molecule("H2O")
    atoms.calc = calc
    atoms.get_potential_energy(), atoms.get_forces()
    calc.predict([atoms1, atoms2, ...])      # many structures, batched by atom count

The release is read from ``config.json`` and ``model.safetensors`` only (no pickle, no
code from the folder; ``pretrain/release/loader.py``), its SHA256SUMS checked first. What
the calculator serves is :class:`~pretrain.release.predict.Predictor`'s: the fidelity by
name, forces as the model was trained (conservative or direct), elements outside the
fidelity's training data refused unless ``coverage="warn"`` or ``"ignore"``, charge and
spin multiplicity from ``atoms.info["charge"]`` / ``["spin"]`` (else the ``charge`` /
``spin`` arguments; 0 means "unknown", as in training data without such labels: use the
convention of the fidelity's data, molecular DFT data usually gives the multiplicity, 1
for closed-shell singlets). Stress (Voigt, eV/A^3, ASE sign) is available for fully
periodic cells. Extra targets trained at the fidelity are served too:
``atoms.get_charges()`` (e), ``atoms.get_dipole_moment()`` (e*A),
``atoms.get_magnetic_moments()`` (muB), others by ``calc.get_property(name, atoms)``.
"""

from __future__ import annotations

from pathlib import Path

from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from pretrain.release.predict import Predictor, is_periodic


class MLIPCalculator(Calculator):
    """ASE calculator of one fidelity of a trained model."""

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energy_uncertainty",
                              "forces_uncertainty"]

    def __init__(self, trained, fidelity: str, device: str = "cpu", dtype: str = "float32",
                 coverage: str = "error", charge: int = 0, spin: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.trained = trained
        self.predictor = Predictor(trained, fidelity, device, dtype, coverage, charge, spin)
        # this fidelity's extra targets (an instance attribute: another fidelity may have others)
        self.implemented_properties = type(self).implemented_properties + list(self.predictor.properties)

    @classmethod
    def from_release(cls, folder: str | Path, fidelity: str, device: str = "cpu",
                     dtype: str = "float32", coverage: str = "error", verify: bool = True,
                     **kwargs) -> "MLIPCalculator":
        """The calculator of ``fidelity`` of the release at ``folder`` (checksums checked
        unless ``verify=False``)."""
        from pretrain.release.loader import load_release  # noqa: PLC0415

        return cls(load_release(folder, verify=verify), fidelity, device, dtype, coverage, **kwargs)

    @property
    def fidelities(self) -> list[str]:
        """The names this model has heads for."""
        return list(self.trained.table.names)

    @property
    def fidelity(self) -> str:
        return self.predictor.fidelity

    @property
    def has_uncertainty(self) -> bool:
        """Whether this fidelity of the model gives calibrated uncertainties."""
        return self.predictor.uncertainty

    def interval(self, level: float = 0.95) -> dict[str, float]:
        """``{"energy": w, "forces": w}``: the calibrated central ``level`` interval is
        ``+-w * uncertainty`` (:meth:`Predictor.interval <pretrain.release.predict.Predictor.interval>`)."""
        return self.predictor.interval(level)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """ASE's entry point: energy, free_energy, forces, (periodic cells) stress,
        where calibrated the uncertainties, and the extra targets of this fidelity (all
        from the one forward pass)."""
        if {"energy_uncertainty", "forces_uncertainty"} & set(properties):
            self.predictor.require_uncertainty()
        super().calculate(atoms, properties, system_changes)
        periodic = is_periodic(self.atoms)
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a fully periodic cell with a volume")
        out = self.predictor.run([self.atoms], stress=periodic)
        energy = float(out["energy"][0])
        self.results = {"energy": energy, "free_energy": energy, "forces": out["forces"]}
        if periodic:
            self.results["stress"] = out["stress"][0]
        if "energy_uncertainty" in out:
            self.results["energy_uncertainty"] = float(out["energy_uncertainty"][0])
            self.results["forces_uncertainty"] = out["forces_uncertainty"]
        for served, (_, per) in self.predictor.properties.items():
            self.results[served] = out[served] if per == "atom" else out[served][0]

    def predict(self, atoms_list, max_atoms: int | None = None) -> list[dict]:
        """Energy, forces (and stress of periodic cells, extra targets) of many structures
        (:meth:`Predictor.predict <pretrain.release.predict.Predictor.predict>`)."""
        return self.predictor.predict(atoms_list, max_atoms)
