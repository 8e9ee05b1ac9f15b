"""The robustness report: does a release hold where its training data has no examples?

Per fidelity, on structures of the elements that fidelity's data covered (float64, forces
as the release serves them):

* **dimers**: every pair of covered elements (all pairs up to :data:`MAX_PAIRS`, a seeded
  sample with every homonuclear pair beyond) pushed from 2.5 A to 0.25 A. Inside the
  pair's minimum the energy must rise at every step (a fall of more than :data:`TOL` eV
  fails: atoms pushed together would fuse) and end at least :data:`MIN_RISE` eV above the
  separated atoms;
* **compression**: the elemental crystal of every covered metal (ASE's reference
  structure and lattice constant) and, where the fidelity covers molecular elements, a
  dense box of small molecules made of them, scaled (every coordinate with the cell, the
  equation-of-state convention) from 2 V0 down to 0.35 V0: below the volume of lowest
  energy the energy per atom must rise at every step (no spurious minimum under
  compression). The molecular box is also compressed with whole molecules (their centres
  move with the cell, their bonds keep their length): intermolecular contacts under
  pressure, which molecular training data rarely holds. That result is reported, as a
  known limit when it falls, but does not decide the verdict;
* **hot MD**: :data:`MD_STEPS` Langevin steps at about three times a typical melting
  point (:data:`MD_TEMPERATURE` K for an alloy supercell of the covered metals,
  :data:`MD_TEMPERATURE_MOLECULAR` K for the molecular box): no two atoms closer than
  :data:`MIN_DISTANCE` A, no non-finite energy, no jump of more than :data:`MAX_JUMP`
  eV/atom between steps.

Each check passes or fails with its worst case named; :func:`plot` draws the curves in one
PNG. ``release create`` writes the report into the release (``robustness.json``,
``robustness.png``) and its card; ``release verify`` recomputes it and fails on a fragile
release unless ``--allow-fragile``; ``eval --robustness`` runs it on any trained model.
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import numpy as np

MAX_PAIRS = 66  # all pairs of up to 11 elements; beyond, a seeded sample of this many
RADII = np.round(np.arange(2.5, 0.2499, -0.05), 4)  # A, from far to close
TOL = 1e-3  # eV: a fall smaller than this is numerical noise, not a minimum
REL_TOL = 0.05  # nor a fall giving back less than this share of the wall climbed before it
MIN_RISE = 5.0  # eV above the separated atoms at 0.25 A
BOND_FLOOR = 0.6  # x the sum of covalent radii: no bond is shorter (triple bonds ~0.8)
VOLUMES = np.round(np.linspace(2.0, 0.35, 34), 4)  # V / V0, from expanded to compressed
VOLUME_FLOOR = 0.6  # V / V0: no equilibrium volume lies below
MD_STEPS, MD_TEMPERATURE, MD_TIMESTEP = 200, 3000.0, 0.5  # steps, K (metals: ~3x Al's, 2.2x Cu's melting point), fs
MD_TEMPERATURE_MOLECULAR = 1000.0  # K: ~3x the melting point of ice (methane, ammonia: lower)
MIN_DISTANCE, MAX_JUMP = 0.5, 5.0  # A; eV/atom between consecutive steps
NOBLE = {"He", "Ne", "Ar", "Kr", "Xe", "Rn"}


def robustness_report(trained, fidelities: list[str] | None = None, seed: int = 0,
                      device: str = "cpu") -> tuple[dict, dict]:
    """``(report, curves)`` of ``trained`` (a ``TrainedModel``; not modified): the report
    is JSON (pass/fail, counts and the worst case per check and fidelity), the curves are
    what :func:`plot` draws."""
    from pretrain.release.calculator import MLIPCalculator  # noqa: PLC0415

    served = copy.deepcopy(trained)  # float64 for the checks; the caller's model stays as it is
    report, curves = {"passed": True, "fidelities": {}, "settings": _settings()}, {}
    for fid in fidelities or trained.table.names:
        elements = list(trained.table.elements.get(fid) or [])
        if not elements:
            continue
        calc = MLIPCalculator(served, fid, device=device, dtype="float64", coverage="error")
        checks, curves[fid] = {}, {}
        checks["dimers"], curves[fid]["dimers"] = dimer_check(calc, elements, seed)
        checks["compression"], curves[fid]["compression"] = compression_check(calc, elements)
        checks["hot_md"], curves[fid]["hot_md"] = hot_md_check(calc, elements, seed)
        report["fidelities"][fid] = checks
        report["passed"] &= all(c["passed"] for c in checks.values() if c["cases"])
    return report, curves


def _settings() -> dict:
    return {"dimer_radii_A": [float(RADII[0]), float(RADII[-1])], "tolerance_eV": TOL,
            "min_rise_eV": MIN_RISE, "volumes_V0": [float(VOLUMES[0]), float(VOLUMES[-1])],
            "md": {"steps": MD_STEPS, "temperature_K": MD_TEMPERATURE,
                   "temperature_molecular_K": MD_TEMPERATURE_MOLECULAR, "timestep_fs": MD_TIMESTEP,
                   "min_distance_A": MIN_DISTANCE, "max_jump_eV_per_atom": MAX_JUMP}}


def _energies(calc, structures: list) -> np.ndarray:
    return np.array([r["energy"] for r in calc.predict(structures)])


def pairs_of(elements: list[str], seed: int = 0, bound: int = MAX_PAIRS) -> list[tuple[str, str]]:
    """All pairs of ``elements`` (homonuclear included), or every homonuclear pair and a
    seeded sample of the others up to ``bound``."""
    every = list(itertools.combinations_with_replacement(elements, 2))
    if len(every) <= bound:
        return every
    same = [(e, e) for e in elements][:bound]
    others = [p for p in every if p[0] != p[1]]
    pick = np.random.default_rng(seed).choice(len(others), size=max(0, bound - len(same)), replace=False)
    return same + [others[k] for k in sorted(pick)]


def dimer_check(calc, elements: list[str], seed: int = 0) -> tuple[dict, dict]:
    """Dimer curves of every pair (:func:`pairs_of`) from 2.5 to 0.25 A."""
    from ase import Atoms  # noqa: PLC0415

    pairs = pairs_of(elements, seed)
    far = calc.trained.potential.cutoff + 1.0  # no edge: the two isolated atoms
    structures = [Atoms(a + b, positions=[[0, 0, 0], [r, 0, 0]]) for a, b in pairs for r in (*RADII, far)]
    energies = _energies(calc, structures).reshape(len(pairs), len(RADII) + 1)
    failures, worst, curves = 0, None, {}
    for (a, b), row in zip(pairs, energies):
        e, separated = row[:-1], row[-1]
        curves[f"{a}-{b}"] = (e - separated).tolist()
        problem = _inner_problem(e, RADII, "A", BOND_FLOOR * _covalent(a, b))
        rise = e[-1] - separated
        if problem is None and not (np.isfinite(rise) and rise >= MIN_RISE):
            problem = (MIN_RISE - rise if np.isfinite(rise) else math.inf,
                       f"ends {rise:.3g} eV above the separated atoms at {RADII[-1]:g} A (< {MIN_RISE:g})")
        if problem is not None:
            failures += 1
            if worst is None or problem[0] > worst[0]:
                worst = (problem[0], f"{a}-{b}: {problem[1]}")
    return _result(len(pairs), failures, worst, "pairs"), {"radii": RADII.tolist(), "curves": curves}


def _inner_problem(e: np.ndarray, x: np.ndarray, unit: str, floor: float) -> tuple[float, str] | None:
    """``(severity, words)`` when ``e`` (ordered from far/expanded to close/compressed) falls
    anywhere inside its innermost well by more than :data:`TOL` and by more than
    :data:`REL_TOL` of the height it had climbed above the well before the fall (a small
    wiggle at the top of a wall of many eV cannot trap anything: a fall that gives back a
    real share of the wall is a spurious minimum, or a collapse); or is not finite; else None.

    The well is the innermost local minimum at ``x >= floor`` (a bond, the equilibrium
    volume: a molecule's dimer may have a lower minimum further out, which is allowed), or
    the lowest point when there is none; below ``floor`` no minimum is physical."""
    if not np.isfinite(e).all():
        return math.inf, "non-finite energy"
    n = len(e)
    minima = [k for k in range(n) if (k == 0 or e[k] <= e[k - 1]) and (k == n - 1 or e[k] <= e[k + 1])
              and x[k] >= floor]
    k = max(minima) if minima else int(np.argmin(e))
    inner = e[k:]
    peak = np.maximum.accumulate(inner)
    drops = peak - inner
    significant = drops - np.maximum(TOL, REL_TOL * (peak - inner[0]))
    m = int(np.argmax(significant))
    if significant[m] <= 0:
        return None
    top = int(np.argmax(inner[:m + 1]))
    falls = int((np.diff(inner) < -TOL).sum())
    return float(drops[m]), (f"energy falls by {drops[m]:.3g} eV from {x[k + top]:g} to {x[k + m]:g} {unit} "
                             f"inside its minimum at {x[k]:g} {unit} (falls at {falls} of {len(inner) - 1} steps)")


def _covalent(a: str, b: str) -> float:
    from ase.data import atomic_numbers, covalent_radii  # noqa: PLC0415

    return float(covalent_radii[atomic_numbers[a]] + covalent_radii[atomic_numbers[b]])


def _result(cases: int, failures: int, worst, what: str) -> dict:
    return {"passed": failures == 0, "cases": cases, "failures": failures, "unit": what,
            "worst": worst[1] if worst else None}


def metals_of(elements: list[str]) -> list[str]:
    """Covered elements whose reference crystal is a metal's (fcc, bcc, hcp; not noble gases)."""
    from ase.data import atomic_numbers, reference_states  # noqa: PLC0415

    return [e for e in elements if e not in NOBLE
            and (reference_states[atomic_numbers[e]] or {}).get("symmetry") in ("fcc", "bcc", "hcp")]


#: closed-shell small molecules, tried first for the molecular box (ASE's g2 names)
MOLECULES = ("H2O", "CH4", "NH3", "CO2", "N2", "O2", "H2", "CO", "HF", "HCl", "SH2", "SiH4", "PH3",
             "F2", "Cl2", "SO2", "C2H4", "HCN")


def molecular_box(elements: list[str]):
    """A periodic box of 8 small molecules made only of ``elements`` (closed-shell ones of
    :data:`MOLECULES` first, then the rest of ASE's g2 set for elements they miss), up to 8
    kinds, at a liquid-like spacing of 3.5 A; None when no molecule fits."""
    from ase import Atoms  # noqa: PLC0415
    from ase.build import molecule  # noqa: PLC0415
    from ase.collections import g2  # noqa: PLC0415

    allowed = set(elements)
    others = sorted((n for n in g2.names if n not in MOLECULES), key=lambda n: (len(g2[n]), n))
    fits = [n for n in (*MOLECULES, *others) if len(g2[n]) > 1 and set(g2[n].get_chemical_symbols()) <= allowed]
    chosen, seen = [], set()
    for name in fits:  # greedily: each brings an element the others lack
        symbols = set(g2[name].get_chemical_symbols())
        if len(chosen) < 8 and not symbols <= seen:
            chosen.append(name)
            seen |= symbols
    if not chosen:
        return None
    box, spacing = Atoms(cell=np.eye(3) * 7.0, pbc=True), 3.5
    for k, (x, y, z) in enumerate(itertools.product((0, 1), repeat=3)):
        mol = molecule(chosen[k % len(chosen)])
        mol.positions += np.array([x, y, z]) * spacing + 1.75 - mol.get_center_of_mass()
        mol.set_tags(k + 1)  # which molecule each atom belongs to: compressed whole
        box += mol
    return box


def scaled(atoms, factor: float, whole_molecules: bool = False):
    """``atoms`` with its cell scaled by ``factor`` (lengths): every atom moves with it, or,
    with ``whole_molecules`` (a tagged molecular box), each molecule's centre of mass while
    the molecule stays whole."""
    out = atoms.copy()
    tags = atoms.get_tags()
    if not (whole_molecules and tags.any()):
        out.set_cell(atoms.cell.array * factor, scale_atoms=True)
        return out
    out.set_cell(atoms.cell.array * factor, scale_atoms=False)
    for tag in np.unique(tags):
        mine = tags == tag
        centre = atoms[mine].get_center_of_mass()
        out.positions[mine] += centre * (factor - 1.0)
    return out


def compression_check(calc, elements: list[str]) -> tuple[dict, dict]:
    """Elemental crystals of the covered metals and a dense molecular box, 2 V0 -> 0.35 V0."""
    from ase.build import bulk  # noqa: PLC0415

    cells = {}
    for e in metals_of(elements):
        cells[f"{e} {_symmetry(e)}"] = bulk(e, cubic=_cubic_ok(e))
    box = molecular_box(elements)
    if box is not None:
        cells[f"molecules {box.get_chemical_formula()}"] = box
    failures, worst, curves = 0, None, {}
    for name, atoms in cells.items():
        e = _energies(calc, [scaled(atoms, v ** (1 / 3)) for v in VOLUMES]) / len(atoms)
        curves[name] = (e - np.nanmin(e)).tolist()
        problem = _inner_problem(e, VOLUMES, "V0", VOLUME_FLOOR)
        if problem is not None:
            failures += 1
            if worst is None or problem[0] > worst[0]:
                worst = (problem[0], f"{name}: {problem[1].replace(' eV ', ' eV/atom ', 1)}")
    result = _result(len(cells), failures, worst, "cells")
    if box is not None:  # informational: whole molecules pushed together
        e = _energies(calc, [scaled(box, v ** (1 / 3), whole_molecules=True) for v in VOLUMES]) / len(box)
        curves[f"whole molecules {box.get_chemical_formula()}"] = (e - np.nanmin(e)).tolist()
        problem = _inner_problem(e, VOLUMES, "V0", VOLUME_FLOOR)
        result["whole_molecules"] = problem[1].replace(" eV ", " eV/atom ", 1) if problem else "rises"
    return result, {"volumes": VOLUMES.tolist(), "curves": curves}


def _symmetry(element: str) -> str:
    from ase.data import atomic_numbers, reference_states  # noqa: PLC0415

    return reference_states[atomic_numbers[element]]["symmetry"]


def _cubic_ok(element: str) -> bool:
    return _symmetry(element) in ("fcc", "bcc")


def hot_md_check(calc, elements: list[str], seed: int = 0) -> tuple[dict, dict]:
    """Langevin MD at :data:`MD_TEMPERATURE` K of a metal alloy supercell and the molecular box."""
    from ase.build import bulk  # noqa: PLC0415

    systems = {}
    metals = metals_of(elements)
    if metals:
        cell = bulk(metals[0], cubic=_cubic_ok(metals[0]))
        cell = cell.repeat([max(1, math.ceil((32 / len(cell)) ** (1 / 3)))] * 3)
        cell.numbers = [_z(metals[k % len(metals)]) for k in range(len(cell))]
        systems[f"alloy {cell.get_chemical_formula()}"] = cell
    box = molecular_box(elements)
    if box is not None:
        systems[f"molecules {box.get_chemical_formula()}"] = box
    failures, worst, curves = 0, None, {}
    for name, atoms in systems.items():
        hot = MD_TEMPERATURE_MOLECULAR if name.startswith("molecules") else MD_TEMPERATURE
        closest, problem = _hot_run(calc, atoms, seed, hot)
        curves[name] = closest
        if problem is not None:
            failures += 1
            if worst is None or problem[0] > worst[0]:
                worst = (problem[0], f"{name}: {problem[1]}")
    return _result(len(systems), failures, worst, "runs"), {"curves": curves}


def _z(symbol: str) -> int:
    from ase.data import atomic_numbers  # noqa: PLC0415

    return atomic_numbers[symbol]


def _hot_run(calc, atoms, seed: int, temperature: float) -> tuple[list[float], tuple[float, str] | None]:
    """Closest distance per step of one hot Langevin run, and its worst problem (or None)."""
    from ase import units  # noqa: PLC0415
    from ase.md.langevin import Langevin  # noqa: PLC0415
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution  # noqa: PLC0415

    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, MD_TIMESTEP * units.fs, temperature_K=temperature, friction=0.02 / units.fs,
                   fixcm=False, rng=rng)
    closest, energies, problem = [], [], None
    for step in range(MD_STEPS):
        dyn.run(1)
        d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
        np.fill_diagonal(d, np.inf)
        closest.append(float(d.min()))
        energies.append(atoms.get_potential_energy() / len(atoms))
        if not np.isfinite(energies[-1]):
            problem = (math.inf, f"non-finite energy at step {step + 1}")
        elif closest[-1] < MIN_DISTANCE:
            i, j = np.unravel_index(int(np.argmin(d)), d.shape)
            problem = (MIN_DISTANCE - closest[-1], f"atoms {i} and {j} at {closest[-1]:.3f} A at step {step + 1}")
        elif len(energies) > 1 and abs(energies[-1] - energies[-2]) > MAX_JUMP:
            problem = (abs(energies[-1] - energies[-2]),
                       f"energy jumps {energies[-1] - energies[-2]:+.3g} eV/atom at step {step + 1}")
        if problem is not None:
            break
    return closest, problem


def summary_line(report: dict) -> str:
    """One line: per check, cases passed over all fidelities, and the verdict."""
    parts = []
    for check, label in (("dimers", "dimer pairs"), ("compression", "compressed cells"), ("hot_md", "hot MD runs")):
        cases = sum(f[check]["cases"] for f in report["fidelities"].values())
        failed = sum(f[check]["failures"] for f in report["fidelities"].values())
        parts.append(f"{cases - failed}/{cases} {label}")
    return ", ".join(parts) + (": pass" if report["passed"] else ": FAIL")


def robustness_failures(report: dict) -> list[str]:
    """``"<fidelity> <check>: <worst case>"`` for each check that failed (empty when robust)."""
    return [f"{fid} {name}: {c['worst']}" for fid, checks in report["fidelities"].items()
            for name, c in checks.items() if not c["passed"]]


def lines(report: dict) -> list[str]:
    """One line per fidelity and check, with the worst case of those that failed."""
    out = []
    for fid, checks in report["fidelities"].items():
        for name, c in checks.items():
            status = "pass" if c["passed"] else "FAIL"
            out.append(f"{fid} {name}: {c['cases'] - c['failures']}/{c['cases']} {c['unit']} {status}"
                       + (f"; worst: {c['worst']}" if c["worst"] else "")
                       + (f"; whole molecules (not in the verdict): {c['whole_molecules']}"
                          if c.get("whole_molecules", "rises") != "rises" else ""))
    return out


def card_lines(report: dict | None) -> list[str]:
    """The model card's robustness section."""
    if report is None:
        return []
    verdict = ("The release **passes**: every check below." if report["passed"] else
               "**The release is fragile**: at least one check below failed (worst case named); "
               "`release verify` fails on it unless `--allow-fragile`.")
    out = ["## Robustness", "", verdict + " Computed on structures of each fidelity's covered elements, "
           f"float64: dimers from {RADII[0]:g} to {RADII[-1]:g} A must repel inside their minimum and end "
           f"{MIN_RISE:g} eV above the separated atoms; crystals and a molecular box from {VOLUMES[0]:g} to "
           f"{VOLUMES[-1]:g} V0 must have no minimum under compression; {MD_STEPS} Langevin steps at "
           f"{MD_TEMPERATURE:g} K (metals) or {MD_TEMPERATURE_MOLECULAR:g} K (molecules) must keep atoms "
           f"{MIN_DISTANCE:g} A apart (`robustness.json`, "
           "`robustness.png`).", "", "| fidelity | check | passed | worst case |", "|---|---|---|---|"]
    limits = []
    for fid, checks in report["fidelities"].items():
        for name, c in checks.items():
            out.append(f"| {fid} | {name} | {c['cases'] - c['failures']}/{c['cases']} {c['unit']} | "
                       f"{c['worst'] or '-'} |")
            if c.get("whole_molecules", "rises") != "rises":
                limits.append(f"- {fid}: compressing the molecular box with whole molecules (intermolecular "
                              f"contacts under pressure, not in the verdict): {c['whole_molecules']}")
    return out + [""] + ((["Known limits found by the report:", ""] + limits + [""]) if limits else [])


def write_robustness(trained, out: Path) -> list[Path]:
    """The report of ``trained`` into ``out`` (``robustness.json``, ``robustness.png``),
    its lines printed (``eval --robustness``)."""
    import json  # noqa: PLC0415

    from common.atomic import write_atomic  # noqa: PLC0415
    from pretrain.release.format import ROBUSTNESS, ROBUSTNESS_PLOT  # noqa: PLC0415

    report, curves = robustness_report(trained)
    write_atomic(out / ROBUSTNESS, json.dumps(report, indent=1) + "\n")
    for line in lines(report) + [summary_line(report)]:
        print(f"[robustness] {line}", flush=True)
    return [out / ROBUSTNESS, plot(curves, out / ROBUSTNESS_PLOT)]


def plot(curves: dict, path: Path) -> Path:
    """One PNG: per fidelity, the dimer curves, the compression curves and the closest
    distance in the hot runs."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = max(1, len(curves))
    fig, axes = plt.subplots(rows, 3, figsize=(13, 3.4 * rows), squeeze=False)
    for ax_row, (fid, c) in zip(axes, curves.items()):
        d, v, m = c["dimers"], c["compression"], c["hot_md"]
        for name, e in d["curves"].items():
            ax_row[0].plot(d["radii"], e, lw=0.8, label=name if len(d["curves"]) <= 10 else None)
        ax_row[0].set(yscale="symlog", xlabel="distance (A)", ylabel="E - E(separated) (eV)", title=f"{fid}: dimers")
        for name, e in v["curves"].items():
            ax_row[1].plot(v["volumes"], e, lw=1, label=name)
        ax_row[1].set(yscale="symlog", xlabel="V / V0", ylabel="E - min (eV/atom)", title=f"{fid}: compression")
        for name, dist in m["curves"].items():
            ax_row[2].plot(range(1, len(dist) + 1), dist, lw=1, label=name)
        ax_row[2].axhline(MIN_DISTANCE, color="0.5", lw=0.8, ls="--")
        ax_row[2].set(xlabel="MD step", ylabel="closest pair (A)", title=f"{fid}: hot MD")
        for ax in ax_row:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
