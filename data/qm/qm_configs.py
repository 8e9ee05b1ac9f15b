"""Configurations for the QM dataset: HCNO molecules and clusters, and metal/alloy cells.

Molecules come from ASE's G2 set (closed-shell HCNO species), clusters from ASE's S22 set
plus a relaxed cyclic water trimer. Each is sampled by short Langevin MD (driven by an xTB
calculator) and by random Gaussian displacements of its reference geometry. Metal cells
are strained, rattled fcc/bcc supercells of pure metals and random binary alloys. Every
random choice draws from a ``numpy.random.Generator`` seeded by the caller.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from ase import Atoms, units
from ase.build import bulk
from ase.data import atomic_numbers, reference_states

HCNO = {"H", "C", "N", "O"}
# G2 species left out although closed-shell HCNO: a singlet carbene and ozone, whose
# ground states are multireference (a single-determinant RKS label would be poor).
SKIP_G2 = {"CH2_s1A1d", "O3"}
S22_CLUSTERS = ("Water_dimer", "Ammonia_dimer", "Methane_dimer", "Formic_acid_dimer",
                "Formamide_dimer", "Ethene_dimer", "Ethene-ethyne_complex", "Benzene-water_complex")
METALS = ("Cu", "Ni", "Al", "Pd", "Ag", "Au", "Pt")
MIN_DISTANCE = 0.6  # Angstrom: frames with a closer pair are dropped (and counted)


@dataclasses.dataclass
class System:
    """One molecule or cluster: a stable id, its reference geometry and its kind."""

    mol_id: str
    atoms: Atoms
    kind: str  # "molecule" or "cluster"


def mol_slug(prefix: str, name: str) -> str:
    """A file-name-safe stable id, e.g. ``g2-CH3CH2OH``, ``s22-Water_dimer``."""
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9_]+", "_", name)


def g2_molecules() -> list[System]:
    """Closed-shell, neutral, multi-atom HCNO molecules of G2 (even electron count, no
    reference magnetic moment)."""
    from ase.collections import g2

    out = []
    for name in g2.names:
        a = g2[name]
        if name in SKIP_G2 or len(a) < 2 or not set(a.get_chemical_symbols()) <= HCNO:
            continue
        if np.any(a.get_initial_magnetic_moments()) or a.numbers.sum() % 2:
            continue
        out.append(System(mol_slug("g2", name), _clean(a), "molecule"))
    return out


def s22_clusters() -> list[System]:
    """Small hydrogen-bonded and dispersion-bound HCNO dimers from S22."""
    from ase.collections import s22

    return [System(mol_slug("s22", name), _clean(s22[name]), "cluster") for name in S22_CLUSTERS]


def water_trimer_guess() -> Atoms:
    """A cyclic water trimer guess (O-O 2.8 A, one donor H per water towards the next O);
    relax it with an xTB calculator before use."""
    r_oo, r_oh, angle = 2.8, 0.97, np.radians(104.5)
    radius = r_oo / np.sqrt(3.0)
    oxy = [radius * np.array([np.cos(t), np.sin(t), 0.0]) for t in 2 * np.pi * np.arange(3) / 3]
    symbols, positions = [], []
    for i, o in enumerate(oxy):
        to_next = (oxy[(i + 1) % 3] - o) / r_oo
        h1 = o + r_oh * to_next
        # second H: in the plane spanned by the donor bond and z, at the H-O-H angle
        perp = np.cross(to_next, [0.0, 0.0, 1.0])
        side = np.cos(angle) * to_next + np.sin(angle) * (0.6 * perp + 0.8 * np.array([0, 0, (-1) ** i]))
        h2 = o + r_oh * side / np.linalg.norm(side)
        symbols += ["O", "H", "H"]
        positions += [o, h1, h2]
    return Atoms(symbols, positions=positions)


def _clean(a: Atoms) -> Atoms:
    """A bare copy: numbers and positions only, no cell, no pbc, no collection info."""
    return Atoms(numbers=a.numbers.copy(), positions=a.positions.copy())


def too_close(atoms: Atoms, limit: float = MIN_DISTANCE) -> bool:
    """True when any pair of a non-periodic structure is closer than ``limit``."""
    d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    np.fill_diagonal(d, np.inf)
    return bool(d.min() < limit)


def displaced(system: System, n: int, sigma: tuple[float, float], rng) -> list[Atoms]:
    """``n`` copies of the reference geometry with Gaussian displacements; each frame's
    standard deviation is drawn uniformly from ``sigma`` (Angstrom, per Cartesian)."""
    frames = []
    for k in range(n):
        s = float(rng.uniform(*sigma))
        a = _clean(system.atoms)
        a.positions += rng.normal(0.0, s, a.positions.shape)
        a.info.update(config="displaced", sigma=round(s, 6), sample=k)
        frames.append(a)
    return frames


def md_frames(system: System, calc, temperature: float, steps: int, every: int, skip: int,
              timestep_fs: float, friction_per_fs: float, seed: int) -> list[Atoms]:
    """Langevin MD at ``temperature`` K from the reference geometry (Maxwell-Boltzmann
    start, no net momentum or rotation); frames every ``every`` steps after ``skip``."""
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    rng = np.random.RandomState(seed)  # ASE's MD and velocity helpers take a RandomState
    atoms = _clean(system.atoms)
    atoms.calc = calc
    atoms.set_constraint(FixCom())  # no drift of the centre of mass under the thermostat
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    with np.errstate(invalid="ignore", divide="ignore"):  # linear molecules: a zero moment
        ZeroRotation(atoms)
    dyn = Langevin(atoms, timestep_fs * units.fs, temperature_K=temperature,
                   friction=friction_per_fs / units.fs, rng=rng, fixcm=False)
    frames = []
    for step in range(every, steps + 1, every):
        dyn.run(every)
        if step > skip:
            a = _clean(atoms)
            a.info.update(config="md", md_temperature=float(temperature), md_step=step,
                          md_time_fs=step * timestep_fs)
            frames.append(a)
    return frames


# ----------------------------------------------------------------------------- metals

FCC_REPEATS = ((1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2))  # x 4 atoms: 4, 8, 16, 32
BCC_REPEATS = ((2, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 3), (2, 2, 4))  # x 2: 4 .. 16, 24, 32


def metal_groups() -> list[tuple[str, tuple[str, ...], str]]:
    """(group id, elements, prototype) for every pure metal and binary pair, fcc and bcc."""
    comps = [(m,) for m in METALS]
    comps += [(a, b) for i, a in enumerate(METALS) for b in METALS[i + 1:]]
    return [("".join(c) + f"-{proto}", c, proto) for c in comps for proto in ("fcc", "bcc")]


def _volume_per_atom(symbol: str) -> float:
    """Experimental fcc volume per atom (ASE's reference lattice constants), A^3."""
    return reference_states[atomic_numbers[symbol]]["a"] ** 3 / 4.0


def metal_cell(elements: tuple[str, ...], proto: str, rng, strain: float,
               volume: tuple[float, float], rattle: tuple[float, float]) -> Atoms:
    """One strained, rattled supercell: random size, random composition for alloys
    (Vegard's-law volume), a random symmetric strain of up to ``strain`` per component,
    a volume scale drawn from ``volume``, Gaussian rattle with sigma drawn from ``rattle``."""
    repeats = FCC_REPEATS if proto == "fcc" else BCC_REPEATS
    rep = repeats[int(rng.integers(len(repeats)))]
    cell = bulk("Cu", proto, a=1.0, cubic=True).repeat(rep)  # species set below
    n = len(cell)
    if len(elements) == 1:
        symbols = [elements[0]] * n
    else:
        n_a = int(rng.integers(1, n))  # both species present
        symbols = [elements[0]] * n_a + [elements[1]] * (n - n_a)
        symbols = [symbols[i] for i in rng.permutation(n)]
    cell.set_chemical_symbols(symbols)
    v_atom = np.mean([_volume_per_atom(s) for s in symbols]) * rng.uniform(*volume)
    per_cell = 4 if proto == "fcc" else 2
    cell.set_cell(cell.cell * (v_atom * per_cell) ** (1.0 / 3.0), scale_atoms=True)
    eps = rng.uniform(-strain, strain, (3, 3))
    eps = 0.5 * (eps + eps.T)
    cell.set_cell(cell.cell @ (np.eye(3) + eps), scale_atoms=True)
    sigma = float(rng.uniform(*rattle))
    cell.positions += rng.normal(0.0, sigma, cell.positions.shape)
    cell.info.update(config="strained_rattled", prototype=proto, rattle=round(sigma, 6),
                     supercell=" ".join(map(str, rep)))
    return cell
