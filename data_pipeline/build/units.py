"""Label units and sign conventions of a source, converted once to the schema's at build time.

Shards always hold energies in eV, forces in eV/A and stress in eV/A^3 with ASE's sign
(positive under tension, ``stress = (1/V) dE/d(strain)``). A source whose labels come in
other units names them in the recipe (``energy_unit``, ``forces_unit``, ``stress_unit``,
``stress_sign``); :func:`label_factors` turns those into the three multipliers the
conversion applies to each record, and the manifest records both.

Declared extras (``extras:`` of a source) whose name is a known quantity
(:data:`EXTRA_QUANTITIES`: charges, magnetic moments, dipoles) have a fixed layout and a
canonical unit too; :func:`extra_factor` is the multiplier from the unit a source
declares for one.
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
class Quantity:
    """A known extra: per atom or per structure, its trailing shape and its units."""

    per: str  # "atom": [n_atoms, *shape]; "structure": shape
    shape: tuple[int, ...]
    unit: str  # canonical: what shards hold
    units: dict[str, float]  # accepted spelling -> canonical units per one of it


# by the record's extras name; ase.units.Debye is in e*A (1 D = 0.2081943 e*A) and
# ase.units.Bohr in A, the same constants the energy and force factors above use
EXTRA_QUANTITIES = {
    "charges": Quantity("atom", (), "e", {"e": 1.0}),
    "magmoms": Quantity("atom", (), "muB", {"muB": 1.0}),
    "dipole": Quantity("structure", (3,), "e*A", {"e*A": 1.0, "debye": ase_units.Debye,
                                                  "e*bohr": ase_units.Bohr, "au": ase_units.Bohr}),
}


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


def extra_factor(name: str, unit: str | None) -> float:
    """Canonical units per ``unit`` of the extra ``name`` (1 for no unit: kept as stored).

    Raises ValueError naming the accepted units when ``name`` is not a known quantity or
    does not accept ``unit``.
    """
    if unit is None:
        return 1.0
    known = EXTRA_QUANTITIES.get(name)
    if known is None:
        table = "; ".join(f"{k}: {', '.join(q.units)}" for k, q in EXTRA_QUANTITIES.items())
        raise ValueError(f"got {unit!r}, but {name!r} is not a known quantity, so there is nothing to "
                         f"convert it to; drop the unit (values are kept as stored) or name the extra as "
                         f"one of the known quantities ({table})")
    if unit not in known.units:
        raise ValueError(f"got {unit!r}, expected one of {', '.join(known.units)} for {name!r} "
                         f"(stored as {known.unit})")
    return known.units[unit]


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
                    "factors": dataclasses.asdict(f),
                    "extras": {e.name: {"key": e.key, "unit": e.unit, "factor": extra_factor(e.name, e.unit)}
                               for e in src.extras}})
    return out
