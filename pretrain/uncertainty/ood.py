"""Does the uncertainty rise out of distribution? Held-out structures compressed, and
elements a fidelity never saw, against the same fidelity's held-out structures as they are.

For each calibrated fidelity: the median force uncertainty per atom and the median
energy uncertainty per atom (total energy sigma / atoms) of its held-out structures (in
distribution), of the same structures compressed to :data:`COMPRESSION` of their size
(molecules about their centre, periodic cells with their atoms), and of the other
fidelities' held-out structures whose elements this fidelity's training data never
contained. The ratios to the in-distribution medians are what the model card and the
demo report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_pipeline import keys as K
from data_pipeline.batch import atoms_batch, to_torch

COMPRESSION = 0.7  # linear: 0.34 of the volume; bonds 30% shorter than the data's
MAX_STRUCTURES = 64  # per fidelity and case: medians settle well before


def _atoms(record):
    from ase import Atoms  # noqa: PLC0415

    atoms = Atoms(numbers=record["numbers"], positions=record["positions"], cell=record["cell"], pbc=record["pbc"])
    atoms.info.update(charge=int(record.get("charge") or 0), spin=int(record.get("spin") or 0))
    return atoms


def compressed(atoms, factor: float = COMPRESSION):
    """``atoms`` shrunk by ``factor``: a periodic cell with its atoms, else about the centre."""
    out = atoms.copy()
    if out.pbc.any():
        out.set_cell(out.cell.array * factor, scale_atoms=True)
    else:
        centre = out.positions.mean(axis=0)
        out.positions = centre + (out.positions - centre) * factor
    return out


def median_uncertainty(potential, structures: list, fidelity: int, max_atoms: int = 512) -> tuple[float, float]:
    """(median per-atom force uncertainty in eV/A, median energy uncertainty per atom in
    eV/atom) of ``structures`` at model fidelity ``fidelity``."""
    values, energies, chunk, size = [], [], [], 0
    for atoms in structures + [None]:
        if chunk and (atoms is None or size + len(atoms) > max_atoms):
            batch = to_torch(atoms_batch(chunk, potential.cutoff, fidelity, "float32"))
            batch[K.CHARGE] = torch.tensor([a.info.get("charge", 0) for a in chunk])
            batch[K.SPIN] = torch.tensor([a.info.get("spin", 0) for a in chunk])
            with torch.no_grad():
                out = potential(batch, forces=False, uncertainty=True)
            values.append(out["forces_uncertainty"].numpy())
            energies.append((out["energy_uncertainty"] / batch[K.N_ATOMS]).numpy())
            chunk, size = [], 0
        if atoms is not None:
            chunk.append(atoms)
            size += len(atoms)
    if not values:
        return float("nan"), float("nan")
    return float(np.median(np.concatenate(values))), float(np.median(np.concatenate(energies)))


def out_of_distribution(potential, folder: str | Path, records: np.ndarray, elements: dict[str, list[str]]) -> dict:
    """``{fidelity: {"in_distribution", "compressed", "compressed_ratio", "unseen_elements",
    "unseen_ratio", ...}}`` (forces; the same keys with ``energy_`` for the energy per
    atom) for the calibrated fidelities, from held-out ``records`` of ``folder``;
    ``elements``: each fidelity's covered elements (the fidelity table's)."""
    from data_pipeline.stream.dataset import ShardedDataset  # noqa: PLC0415

    ds = ShardedDataset(folder)
    names = ds.manifest["fidelities"]
    by_fid: dict[str, list] = {}
    for i in np.asarray(records, dtype=np.int64):
        name = names[int(ds.fidelity_ids[i])]
        if len(by_fid.setdefault(name, [])) < MAX_STRUCTURES:
            by_fid[name].append(_atoms(ds[int(i)]))
    potential = potential.eval()
    out = {}
    for f in potential.uncertainty.calibrated_fidelities:
        name = potential.fidelities[f]
        own = by_fid.get(name, [])
        if not own:
            continue
        row = {"structures": len(own), "compression": COMPRESSION}
        cases = {"in_distribution": own, "compressed": [compressed(a) for a in own]}
        covered = set(elements.get(name) or [])
        foreign = [a for other, group in by_fid.items() if other != name for a in group
                   if covered and not set(a.get_chemical_symbols()) <= covered][:MAX_STRUCTURES]
        if foreign:
            cases["unseen_elements"] = foreign
            row["unseen_structures"] = len(foreign)
        for case, structures in cases.items():
            row[case], row[f"energy_{case}"] = median_uncertainty(potential, structures, f)
        for case in ("compressed", "unseen_elements"):
            if case in row:
                key = "compressed_ratio" if case == "compressed" else "unseen_ratio"
                row[key] = row[case] / row["in_distribution"]
                row[f"energy_{key}"] = row[f"energy_{case}"] / row["energy_in_distribution"]
        out[name] = row
    return out
