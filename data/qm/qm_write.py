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


def clear(out: Path) -> None:
    """Remove the previous train/test folders of the datasets this script writes."""
    for split in ("train", "test"):
        for name in DATASETS:
            shutil.rmtree(out / split / name, ignore_errors=True)


def write_xz(path: Path, frames: list) -> int:
    """Write ``frames`` as extxyz compressed with xz (deterministic bytes); returns size."""
    import ase.io

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
