"""Relabel the molecular files of a written QM dataset in place: ``make_qm.py --relabel``.

Recomputes both xTB levels on every stored ``hcno-xtb`` structure and PBE/def2-SVP on every
``hcno-dft`` structure (per molecule in file order, the density chained from frame to frame
as in the full run), reports how far the recomputed energies and forces are from the
stored ones, and writes the charges and dipoles (:data:`qm_write.LAST_INFO`,
:data:`qm_write.LAST_ARRAYS`) after the existing keys, whose text is kept as read. The
sampling (MD) is not rerun. A DFT file's xTB charges and dipoles are copied from the same
structure in the molecule's ``hcno-xtb`` file (``xtb_frame``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import qm_labels as lab
import qm_write as wr
from common.progress import Progress


def _track(worst: dict, key: str, stored: float | np.ndarray, new: float | np.ndarray) -> None:
    """Keep the largest |stored - new| seen under ``key``."""
    worst[key] = max(worst.get(key, 0.0), float(np.max(np.abs(np.asarray(stored) - new))))


def _read(root: Path, dataset: str) -> dict[Path, list]:
    """{file: frames} of one dataset, both splits, in sorted path order."""
    return {p: wr.read_xz(p) for p in sorted(root.glob(f"*/{dataset}/*.extxyz.xz"))}


def relabel_xtb(files: dict[Path, list], worst: dict) -> None:
    """Both xTB levels on every frame: compare energy and forces, store charges and dipole."""
    total = sum(len(f) for f in files.values())
    with Progress(total, "relabel GFN1-xTB + GFN2-xTB", "structures") as bar:
        for frames in files.values():
            for a in frames:
                for fid, prefix in lab.XTB_METHODS.items():
                    new = lab.xtb_label(a, fid)
                    _track(worst, f"{prefix}_energy_eV", a.info[f"{prefix}_energy"], new.energy)
                    _track(worst, f"{prefix}_forces_eV_A", a.arrays[f"{prefix}_forces"], new.forces)
                    new.store_extras(a, prefix)
                bar.update(1, mol=a.info["mol_id"])


def relabel_dft(files: dict[Path, list], xtb: dict[Path, list], worst: dict) -> dict:
    """PBE/def2-SVP on every DFT frame (file order, chained density): compare, store the
    extras, copy the xTB extras from the ``hcno-xtb`` file; returns SCF-cycle counts."""
    cycles = {"same": 0, "different": 0}
    total = sum(len(f) for f in files.values())
    with Progress(total, f"relabel {lab.DFT_FIDELITY} (pyscf)", "structures", interval=30) as bar:
        for path, frames in files.items():
            source = xtb[path.parents[1] / "hcno-xtb" / path.name]
            for a, new, n_cycles in lab.dft_chain(frames):
                if new is None:
                    raise RuntimeError(f"{path}: frame {a.info['frame']}: the SCF no longer "
                                       "converges (it did when the file was written)")
                _track(worst, "dft_energy_eV", a.info["dft_energy"], new.energy)
                _track(worst, "dft_forces_eV_A", a.arrays["dft_forces"], new.forces)
                cycles["same" if n_cycles == a.info["dft_scf_cycles"] else "different"] += 1
                new.store_extras(a, "dft")
                twin = source[a.info["xtb_frame"]]
                if not np.array_equal(twin.positions, a.positions):
                    raise RuntimeError(f"{path}: frame {a.info['frame']}: xtb_frame "
                                       f"{a.info['xtb_frame']} of {path.name} is another structure")
                for prefix in lab.XTB_METHODS.values():
                    a.arrays[f"{prefix}_charges"] = twin.arrays[f"{prefix}_charges"]
                    a.info[f"{prefix}_dipole"] = twin.info[f"{prefix}_dipole"]
                bar.update(1, mol=a.info["mol_id"], cycles=n_cycles)
    return cycles


def relabel(root: Path) -> dict:
    """Relabel ``root``'s molecular files in place; returns the record for ``stats.json``
    (wall times, largest differences from the stored labels) and the frames and split
    that :func:`qm_write.extras_stats` needs."""
    worst: dict[str, float] = {}
    t0 = time.monotonic()
    xtb, dft = _read(root, "hcno-xtb"), _read(root, "hcno-dft")
    relabel_xtb(xtb, worst)
    t1 = time.monotonic()
    cycles = relabel_dft(dft, xtb, worst)
    t2 = time.monotonic()
    sizes = {str(p.relative_to(root)): wr.write_xz(p, frames) for p, frames in {**xtb, **dft}.items()}
    split = {a.info["mol_id"]: p.relative_to(root).parts[0] for p, f in xtb.items() for a in f}
    record = {
        "wall_s": {"relabel_xtb_s": round(t1 - t0, 1), "relabel_dft_s": round(t2 - t1, 1)},
        "structures": {"hcno-xtb": sum(map(len, xtb.values())), "hcno-dft": sum(map(len, dft.values()))},
        "max_abs_diff_recomputed_vs_stored": {k: float(f"{v:.3g}") for k, v in sorted(worst.items())},
        "dft_scf_cycles_recomputed": cycles,
        "molecular_bytes": sum(sizes.values()),
    }
    frames = {"hcno-xtb": [a for f in xtb.values() for a in f],
              "hcno-dft": [a for f in dft.values() for a in f]}
    return {"record": record, "frames": frames, "split": split}
