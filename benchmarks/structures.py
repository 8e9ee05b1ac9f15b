"""A realistic structure mix for benchmarks: periodic crystals of 8-200 atoms and molecules.

``make_structure(rng)`` returns, with cheap finite ``REF_*`` labels (the build only needs
them finite; forces stay well below ``validation.max_force``):

- 75%: a crystal of one of 21 lattice types from ``ase.build.bulk`` in a primitive, cubic
  or orthorhombic cell, a supercell of 8-200 atoms (log-uniform sizes), a random sheared
  strain (most cells end up triclinic), rattled by 0.05 A;
- 12.5%: randomly rotated copies of one G2 molecule, >= 2 A apart, 5-60 atoms, no cell;
- 12.5%: a metal nanoparticle (the atoms of a rattled crystal nearest its centre), no cell.
"""

from __future__ import annotations

import functools

import numpy as np

# (formula, lattice, a, extra bulk() arguments); the first 9 are the nanoparticle metals
CRYSTALS = [("Cu", "fcc", 3.61, {}), ("Al", "fcc", 4.05, {}), ("Ni", "fcc", 3.52, {}),
            ("Pt", "fcc", 3.92, {}), ("Ag", "fcc", 4.09, {}), ("Fe", "bcc", 2.87, {}),
            ("W", "bcc", 3.16, {}), ("Mo", "bcc", 3.15, {}), ("V", "bcc", 3.03, {}),
            ("Mg", "hcp", 3.21, {"c": 5.21}), ("Ti", "hcp", 2.95, {"c": 4.68}),
            ("Co", "hcp", 2.51, {"c": 4.07}), ("Si", "diamond", 5.43, {}),
            ("C", "diamond", 3.57, {}), ("Ge", "diamond", 5.66, {}), ("NaCl", "rocksalt", 5.64, {}),
            ("MgO", "rocksalt", 4.21, {}), ("LiF", "rocksalt", 4.03, {}),
            ("GaAs", "zincblende", 5.65, {}), ("CsCl", "cesiumchloride", 4.12, {}),
            ("ZnO", "wurtzite", 3.25, {"c": 5.21})]

# Runs in a fresh interpreter: time build_loader and one epoch, batch by batch; print JSON.

def _crystal(rng: np.random.Generator):
    """A rattled, strained (mostly triclinic) supercell of 8-200 atoms."""
    from ase.build import bulk  # noqa: PLC0415

    formula, kind, a, kw = CRYSTALS[rng.integers(len(CRYSTALS))]
    shape = str(rng.choice(["primitive", "cubic", "orthorhombic"], p=[0.5, 0.25, 0.25]))
    try:
        unit = bulk(formula, kind, a=a, **kw, **({} if shape == "primitive" else {shape: True}))
    except Exception:  # noqa: BLE001 - hcp/wurtzite have no cubic cell: keep the primitive
        unit = bulk(formula, kind, a=a, **kw)
    target = np.exp(rng.uniform(np.log(8), np.log(200)))  # log-uniform: many small cells
    reps = [(x, y, z) for x in range(1, 9) for y in range(1, 9) for z in range(1, 9)
            if 8 <= len(unit) * x * y * z <= 200]
    # near the target size and not needlessly elongated
    score = [abs(np.log(len(unit) * np.prod(r) / target)) + 0.3 * np.log(max(r) / min(r))
             + rng.uniform(0, 0.2) for r in reps]
    atoms = unit.repeat(reps[int(np.argmin(score))])
    shear = 0.08 if rng.random() < 0.3 else 0.02
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.normal(0, shear, (3, 3))), scale_atoms=True)
    atoms.rattle(stdev=0.05, seed=int(rng.integers(1 << 31)))
    return atoms


@functools.cache
def _g2() -> dict:
    from ase.build import molecule  # noqa: PLC0415
    from ase.collections import g2  # noqa: PLC0415

    return {n: molecule(n) for n in g2.names if len(molecule(n)) >= 3}


def _molecules(rng: np.random.Generator, target: int):
    """Randomly rotated copies of one G2 molecule, >= 2 A apart, 5 to ~``target`` atoms."""
    from ase import Atoms  # noqa: PLC0415

    mol = _g2()[str(rng.choice([n for n, m in _g2().items() if len(m) <= target]))]
    out, radius = Atoms(), 2.0 * target ** (1 / 3)
    while len(out) < 5 or len(out) + len(mol) <= target:
        m = mol.copy()
        m.euler_rotate(*rng.uniform(0, 360, 3), center="COP")
        for _ in range(100):
            pos = m.positions - m.positions.mean(0) + rng.uniform(-radius, radius, 3)
            if not len(out) or np.linalg.norm(out.positions[:, None] - pos, axis=-1).min() >= 2.0:
                out += Atoms(m.numbers, pos)
                break
        else:
            radius *= 1.2  # crowded: try this copy again in a larger region
    return out


def _nanoparticle(rng: np.random.Generator, target: int):
    """The ``target`` atoms of a rattled fcc/bcc metal crystal nearest its centre."""
    from ase.build import bulk  # noqa: PLC0415

    formula, kind, a, _ = CRYSTALS[rng.integers(9)]
    atoms = bulk(formula, kind, a=a, cubic=True).repeat(5)
    atoms.rattle(stdev=0.05, seed=int(rng.integers(1 << 31)))
    d = np.linalg.norm(atoms.positions - atoms.cell.sum(0) / 2, axis=1)
    return atoms[np.sort(np.argsort(d)[:target])]


def make_structure(rng: np.random.Generator):
    """A crystal (75%), molecules or a nanoparticle (12.5% each), with finite labels."""
    u = rng.random()
    if u < 0.75:
        atoms = _crystal(rng)
    else:
        target = int(rng.integers(5, 61))
        atoms = _molecules(rng, target) if u < 0.875 else _nanoparticle(rng, target)
        atoms.set_cell(np.zeros((3, 3)))
        atoms.set_pbc(False)
    # cheap labels: the build only needs them finite (forces well below max_force = 50)
    atoms.info["REF_energy"] = float(-(2.0 + 0.03 * atoms.numbers).sum() + rng.normal(0, 0.1))
    atoms.arrays["REF_forces"] = rng.normal(0, 0.3, (len(atoms), 3))
    if atoms.pbc.all():
        atoms.info["REF_stress"] = rng.normal(0, 0.01, 6)
    return atoms
