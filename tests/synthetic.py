"""Small real raw datasets for tests, the shipped sample and benchmarks.

Structures are random alloys of fcc metals (strained, rattled supercells) and free
clusters, labelled with ASE's EMT potential (``emt``; the ``asap_cutoff`` variant gives
a second, genuinely different level of theory of the same chemistry: ``emt-asap``) or,
for large benchmark sets where labelling time would dominate, with ``linear`` labels:
known per-element energies plus noise (which also lets a test check the elemental
reference fit against the truth).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

EMT_METALS = ["Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au"]
# per-element energies (eV) used by the ``linear`` labels
LINEAR_REFERENCES = {"Al": -3.1, "Ni": -5.4, "Cu": -3.7, "Pd": -5.2, "Ag": -2.8, "Pt": -6.0, "Au": -3.2}


def random_crystal(rng: np.random.Generator, elements=EMT_METALS, max_atoms: int = 64):
    """A rattled, strained fcc supercell alloy of 1-3 elements with at most ``max_atoms``."""
    from ase.build import bulk  # noqa: PLC0415

    host = str(rng.choice(elements))
    atoms = bulk(host, "fcc", a=float({"Al": 4.05, "Ni": 3.52, "Cu": 3.61, "Pd": 3.89, "Ag": 4.09,
                                       "Pt": 3.92, "Au": 4.08}[host]), cubic=bool(rng.random() < 0.5))
    while True:
        reps = rng.integers(1, 4, size=3)
        if len(atoms) * int(np.prod(reps)) <= max_atoms:
            break
    atoms = atoms.repeat(tuple(int(r) for r in reps))
    guests = rng.choice(elements, size=int(rng.integers(0, 3)))
    symbols = np.array(atoms.get_chemical_symbols(), dtype=object)
    for g in guests:
        symbols[rng.random(len(symbols)) < 0.25] = g
    atoms.set_chemical_symbols(list(symbols))
    strain = np.eye(3) + rng.normal(0, 0.02, (3, 3))
    atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
    atoms.rattle(stdev=0.05, seed=int(rng.integers(1 << 31)))
    return atoms


def random_cluster(rng: np.random.Generator, elements=EMT_METALS, max_atoms: int = 40):
    """A non-periodic rattled cluster cut from an fcc crystal."""
    atoms = random_crystal(rng, elements, max_atoms=4 * max_atoms)
    atoms.center()
    centre = atoms.positions.mean(0)
    keep = np.argsort(np.linalg.norm(atoms.positions - centre, axis=1))[: int(rng.integers(2, max_atoms + 1))]
    cluster = atoms[np.sort(keep)]
    cluster.set_pbc(False)
    cluster.set_cell(np.zeros((3, 3)))
    return cluster


def label(atoms, method: str, rng: np.random.Generator | None = None) -> dict:
    """Energy (eV), forces (eV/A) and, when periodic, stress (Voigt, eV/A^3)."""
    if method == "linear":
        rng = rng or np.random.default_rng(0)
        e = sum(LINEAR_REFERENCES[s] for s in atoms.get_chemical_symbols())
        out = {"energy": float(e + rng.normal(0, 0.01) * np.sqrt(len(atoms))),
               "forces": rng.normal(0, 0.3, (len(atoms), 3))}
        if atoms.pbc.all():
            out["stress"] = rng.normal(0, 0.01, 6)
        return out
    from ase.calculators.emt import EMT  # noqa: PLC0415

    atoms.calc = EMT(asap_cutoff=(method == "emt-asap"))
    out = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    if atoms.pbc.all():
        out["stress"] = atoms.get_stress(voigt=True)
    atoms.calc = None
    return out


def labelled_frames(n: int, seed: int, method: str = "emt", clusters: float = 0.0,
                    max_atoms: int = 64) -> list:
    """``n`` labelled ``ase.Atoms`` with labels in MACE-style ``REF_*`` info/arrays keys."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = random_cluster(rng, max_atoms=max_atoms) if rng.random() < clusters else \
            random_crystal(rng, max_atoms=max_atoms)
        labels = label(atoms, method, rng)
        atoms.info["REF_energy"] = labels["energy"]
        atoms.arrays["REF_forces"] = np.asarray(labels["forces"])
        if "stress" in labels:
            atoms.info["REF_stress"] = np.asarray(labels["stress"])
        frames.append(atoms)
    return frames


def with_calculator(frames: list) -> list:
    """Copies whose REF_* labels sit in a single-point calculator (as DFT codes write)."""
    from ase.calculators.singlepoint import SinglePointCalculator  # noqa: PLC0415

    out = []
    for atoms in frames:
        a = atoms.copy()
        results = {"energy": a.info.pop("REF_energy"), "forces": a.arrays.pop("REF_forces")}
        if "REF_stress" in a.info:
            results["stress"] = a.info.pop("REF_stress")
        a.calc = SinglePointCalculator(a, **results)
        out.append(a)
    return out


def write_frames(path: Path, frames: list, fmt: str | None = None) -> Path:
    """Write frames as extxyz/traj (``ase.io``), an ASE ``.db`` or an ``.aselmdb`` file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = fmt or {".db": "db", ".aselmdb": "aselmdb"}.get(path.suffix, "ase")
    if fmt == "db":
        import ase.db  # noqa: PLC0415

        with ase.db.connect(str(path), type="db", append=False) as db:
            for atoms in frames:
                db.write(atoms, data={k: v for k, v in atoms.arrays.items() if k.startswith("REF_")},
                         **{k: v for k, v in atoms.info.items() if np.isscalar(v)})
    elif fmt == "aselmdb":
        from ase_db_backends.aselmdb import LMDBDatabase  # noqa: PLC0415

        db = LMDBDatabase(str(path), readonly=False)
        for atoms in frames:
            db.write(atoms)
        db.close()
    else:
        import ase.io  # noqa: PLC0415

        ase.io.write(str(path), frames, format="extxyz" if path.suffix in (".xyz", ".extxyz") else None)
    return path
