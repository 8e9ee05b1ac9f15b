"""Label units and sign conventions of a source, converted once to the schema's at build time.

Shards always hold energies in eV, forces in eV/A and stress in eV/A^3 with ASE's sign
(positive under tension, ``stress = (1/V) dE/d(strain)``). A source whose labels come in
other units names them in the recipe (``energy_unit``, ``forces_unit``, ``stress_unit``,
``stress_sign``); :func:`label_factors` turns those into the three multipliers the
conversion applies to each record, and the manifest records both.
"""

from __future__ import annotations

import dataclasses

from ase import units as ase_units

ENERGY_UNITS = {"eV": 1.0, "hartree": ase_units.Hartree, "kcal/mol": ase_units.kcal / ase_units.mol,
                "kJ/mol": ase_units.kJ / ase_units.mol}
LENGTH_UNITS = {"A": 1.0, "bohr": ase_units.Bohr}
STRESS_UNITS = {"eV/A^3": 1.0, "GPa": ase_units.GPa, "kbar": 0.1 * ase_units.GPa}
STRESS_SIGNS = {"ase": 1.0, "vasp": -1.0}  # VASP (and pressure) report compression as positive
SCHEMA_UNITS = {"energy": "eV", "forces": "eV/A", "stress": "eV/A^3", "stress_sign": "ase"}


@dataclasses.dataclass(frozen=True)
class LabelFactors:
    """Multipliers from a source's label units to the schema's (eV, eV/A, eV/A^3 ASE sign)."""

    energy: float = 1.0
    forces: float = 1.0
    stress: float = 1.0  # sign convention included

    def identity(self) -> bool:
        """True when the labels are already in the schema's units."""
        return self.energy == self.forces == self.stress == 1.0


def forces_factor(forces_unit: str, energy_unit: str) -> float:
    """eV/A per unit of ``forces_unit``: ``matching`` (energy unit per A) or ``<energy>/<length>``.

    Raises ValueError with the accepted spellings for any other value.
    """
    if forces_unit == "matching":
        return ENERGY_UNITS[energy_unit]
    energy, _, length = forces_unit.rpartition("/")
    if energy not in ENERGY_UNITS or length not in LENGTH_UNITS:
        raise ValueError(
            f"got {forces_unit!r}, expected 'matching' or '<energy>/<length>' with energy one of "
            f"{sorted(ENERGY_UNITS)} and length one of {sorted(LENGTH_UNITS)} (e.g. 'hartree/bohr')")
    return ENERGY_UNITS[energy] / LENGTH_UNITS[length]


def label_factors(src) -> LabelFactors:
    """The multipliers of a :class:`data_pipeline.build.recipe.SourceConfig` (validated units)."""
    return LabelFactors(
        energy=ENERGY_UNITS[src.energy_unit],
        forces=forces_factor(src.forces_unit, src.energy_unit),
        stress=STRESS_UNITS[src.stress_unit] * STRESS_SIGNS[src.stress_sign],
    )


def units_record(recipe) -> list[dict]:
    """The manifest's ``label_units``: per source, its declared units and the factors applied."""
    out = []
    for i, src in enumerate(recipe.sources):
        f = label_factors(src)
        out.append({"source": i, "dataset": src.dataset, "fidelity": src.fidelity,
                    "energy_unit": src.energy_unit, "forces_unit": src.forces_unit,
                    "stress_unit": src.stress_unit, "stress_sign": src.stress_sign,
                    "factors": dataclasses.asdict(f)})
    return out
