"""Writing the QM dataset: one xz-compressed extxyz file per molecule (or metal group) and
split, and the summary statistics that ``stats.json`` and the README quote."""

from __future__ import annotations

import io
import lzma
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np

DATASETS = ("hcno-xtb", "hcno-dft", "metals-emt")
# The charge and dipole keys go after every other key of a frame, in this order, in both
# the full run and the relabel: added to a shipped file, they leave the text of the keys
# already there unchanged, and both paths write the same layout.
LAST_INFO = ("gfn1_dipole", "gfn2_dipole", "dft_dipole")
LAST_ARRAYS = ("gfn1_charges", "gfn2_charges", "dft_charges")


def clear(out: Path) -> None:
    """Remove the previous train/test folders of the datasets this script writes."""
    for split in ("train", "test"):
        for name in DATASETS:
            shutil.rmtree(out / split / name, ignore_errors=True)


def read_xz(path: Path) -> list:
    """Every frame of an ``.extxyz.xz`` file (ASE reads back what :func:`write_xz` wrote)."""
    import ase.io

    return ase.io.read(io.StringIO(lzma.decompress(path.read_bytes()).decode()), index=":",
                       format="extxyz")


def _extras_last(frames: list) -> None:
    """Move the charge and dipole keys after all others (:data:`LAST_INFO`, :data:`LAST_ARRAYS`);
    dipoles are rounded to 8 decimals, the precision extxyz gives the per-atom columns
    (full float repr would add ~50 kB of incompressible digits)."""
    for a in frames:
        for key in LAST_INFO:
            if key in a.info:
                a.info[key] = np.round(a.info.pop(key), 8) + 0.0  # + 0.0: no "-0.0"
        for key in LAST_ARRAYS:
            if key in a.arrays:
                a.arrays[key] = a.arrays.pop(key)


def write_xz(path: Path, frames: list) -> int:
    """Write ``frames`` as extxyz compressed with xz (deterministic bytes); returns size."""
    import ase.io

    _extras_last(frames)
    buf = io.StringIO()
    ase.io.write(buf, frames, format="extxyz")
    data = lzma.compress(buf.getvalue().encode(), format=lzma.FORMAT_XZ, preset=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def write_grouped(out: Path, dataset: str, frames: list, split_of: dict[str, str],
                  key: str = "mol_id") -> dict[str, int]:
    """Write frames grouped by ``info[key]`` to ``out/<split>/<dataset>/<id>.extxyz.xz``;
    returns {relative path: bytes}."""
    groups: dict[str, list] = defaultdict(list)
    for a in frames:
        groups[a.info[key]].append(a)
    sizes = {}
    for gid in sorted(groups):
        rel = Path(split_of[gid]) / dataset / f"{gid}.extxyz.xz"
        sizes[str(rel)] = write_xz(out / rel, groups[gid])
    return sizes


def _rms(arrays: list[np.ndarray]) -> float:
    if not arrays:
        return float("nan")
    flat = np.concatenate([np.ravel(a) for a in arrays])
    return float(np.sqrt(np.mean(flat ** 2)))


def fidelity_stats(frames: list, energy_key: str, forces_key: str, split_of: dict[str, str],
                   key: str = "mol_id") -> dict[str, dict]:
    """Per split: structures, molecules (or groups), atoms, force RMS, energy/atom mean/std."""
    out = {}
    for split in ("train", "test"):
        sel = [a for a in frames if split_of[a.info[key]] == split]
        e_atom = np.array([a.info[energy_key] / len(a) for a in sel]) if sel else np.zeros(0)
        out[split] = {
            "structures": len(sel),
            "groups": len({a.info[key] for a in sel}),
            "atoms": int(sum(len(a) for a in sel)),
            "force_rms_eV_A": round(_rms([a.arrays[forces_key] for a in sel]), 4),
            "energy_per_atom_mean_eV": round(float(e_atom.mean()), 4) if sel else None,
            "energy_per_atom_std_eV": round(float(e_atom.std()), 4) if sel else None,
        }
    return out


def extras_stats(frames: list, prefix: str, dipole_unit: str, split_of: dict[str, str]) -> dict:
    """Per split: charges (RMS, mean |q|, largest |sum q| of a structure) and dipoles (RMS
    and mean |.| of the components in their stored unit; mean norm and the RMS of the
    dipole minus the point-charge dipole sum q_i r_i, both in e*A)."""
    from ase import units

    to_ea = units.Debye if dipole_unit == "Debye" else 1.0
    out = {}
    for split in ("train", "test"):
        sel = [a for a in frames if split_of[a.info["mol_id"]] == split]
        if not sel:
            continue
        q = [a.arrays[f"{prefix}_charges"] for a in sel]
        mu = np.array([a.info[f"{prefix}_dipole"] for a in sel])  # [n_frames, 3]
        point = np.array([qi @ a.positions for qi, a in zip(q, sel)])  # [n_frames, 3] e*A
        out[split] = {
            "structures": len(sel),
            "charges_rms_e": round(_rms(q), 4),
            "charges_mean_abs_e": round(float(np.mean(np.abs(np.concatenate(q)))), 4),
            "charge_sum_max_abs_e": float(f"{max(abs(float(qi.sum())) for qi in q):.2g}"),
            "dipole_unit": dipole_unit,
            "dipole_component_rms": round(_rms([mu]), 4),
            "dipole_component_mean_abs": round(float(np.abs(mu).mean()), 4),
            "dipole_norm_mean_eA": round(float(np.linalg.norm(mu * to_ea, axis=1).mean()), 4),
            "dipole_minus_point_charges_rms_eA": round(_rms([mu * to_ea - point]), 4),
        }
    return out


def _centred(frames: list, key: str) -> np.ndarray:
    """Energies minus the mean of the same molecule's frames (relative energies, eV)."""
    by_mol: dict[str, list[float]] = defaultdict(list)
    for a in frames:
        by_mol[a.info["mol_id"]].append(a.info[key])
    mean = {m: float(np.mean(v)) for m, v in by_mol.items()}
    return np.array([a.info[key] - mean[a.info["mol_id"]] for a in frames])


def compare(frames: list, a_prefix: str, b_prefix: str) -> dict[str, float]:
    """How two levels of theory agree on the same structures: force RMS difference,
    Pearson r of force components, RMS difference of per-molecule relative energies."""
    fa = np.concatenate([a.arrays[f"{a_prefix}_forces"].ravel() for a in frames])
    fb = np.concatenate([a.arrays[f"{b_prefix}_forces"].ravel() for a in frames])
    ea, eb = _centred(frames, f"{a_prefix}_energy"), _centred(frames, f"{b_prefix}_energy")
    return {
        "structures": len(frames),
        "force_rms_diff_eV_A": round(float(np.sqrt(np.mean((fa - fb) ** 2))), 4),
        "force_rms_a_eV_A": round(float(np.sqrt(np.mean(fa ** 2))), 4),
        "force_rms_b_eV_A": round(float(np.sqrt(np.mean(fb ** 2))), 4),
        "force_pearson_r": round(float(np.corrcoef(fa, fb)[0, 1]), 4),
        "relative_energy_rms_diff_eV": round(float(np.sqrt(np.mean((ea - eb) ** 2))), 4),
        "relative_energy_pearson_r": round(float(np.corrcoef(ea, eb)[0, 1]), 4),
    }


def markdown_counts(stats: dict) -> str:
    """The counts table of the README: fidelity x split."""
    lines = ["| dataset | fidelity | split | structures | molecules/groups | atoms | force RMS (eV/A) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for fid, entry in stats["fidelities"].items():
        for split in ("train", "test"):
            s = entry[split]
            lines.append(f"| {entry['dataset']} | {fid} | {split} | {s['structures']} | "
                         f"{s['groups']} | {s['atoms']} | {s['force_rms_eV_A']} |")
    return "\n".join(lines)
