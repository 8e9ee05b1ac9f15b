"""Regenerate the multi-fidelity QM dataset (deterministic): ``python data/qm/make_qm.py``.

Four levels of theory on real electronic-structure codes: GFN1-xTB and GFN2-xTB (tblite)
and PBE/def2-SVP (pyscf) on HCNO molecules and clusters, and ASE's EMT on metal and alloy
cells. Stages: sample configurations (xTB-driven Langevin MD + random displacements),
label them at both xTB levels, label a subset of small molecules with DFT, build and label
the metal cells, split train/test by molecule (by composition-prototype group for metals),
write one ``.extxyz.xz`` file per molecule and split, compute IR reference spectra of the
test molecules (``test/ir/*.json``), and write ``stats.json``. ``--quick`` makes a tiny
version in seconds (for a test); ``--relabel`` recomputes the molecular labels of the
written files (charges and dipoles added, energies and forces checked) without resampling;
``--ir`` redoes only the IR spectra; ``--dft-test-extra`` adds DFT labels to the test
molecules above the DFT size limit (the full run ends with it). README.md records how the
shipped copy was made.
Needs the optional extra: ``pip install -e '.[qm]'``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # sibling modules, then the repository

import qm_configs as cfg  # noqa: E402
import qm_ir as ir  # noqa: E402
import qm_labels as lab  # noqa: E402
import qm_relabel as rl  # noqa: E402
import qm_write as wr  # noqa: E402
from common.progress import Progress  # noqa: E402


@dataclasses.dataclass
class Plan:
    """Every size and setting of a run (the shipped data used the defaults)."""

    seed: int = 2026
    md_temperatures_molecule: tuple[float, ...] = (500.0, 1000.0, 1500.0)
    md_temperatures_cluster: tuple[float, ...] = (300.0, 500.0, 700.0)  # weakly bound
    md_steps: int = 400
    md_every: int = 40
    md_skip: int = 80  # steps discarded as equilibration
    md_timestep_fs: float = 0.5
    md_friction_per_fs: float = 0.01
    n_displaced: int = 8
    displacement_sigma_A: tuple[float, float] = (0.02, 0.10)
    dft_max_atoms: int = 8
    dft_max_heavy: int = 3
    dft_frames_per_molecule: int = 8
    metal_cells_per_group: int = 6
    metal_strain: float = 0.03
    metal_volume_scale: tuple[float, float] = (0.94, 1.06)
    metal_rattle_A: tuple[float, float] = (0.02, 0.10)
    test_fraction: float = 0.18
    max_force: float = 50.0  # eV/A: the recipes' outlier bound; larger frames are dropped
    only: tuple[str, ...] = ()  # mol_ids to keep (quick mode); empty: all
    metal_groups: int = 0  # first N groups (quick mode); 0: all
    water_trimer: bool = True
    ir_max_atoms: int = 12  # test molecules up to this size get GFN1/GFN2 IR spectra
    ir_dft: bool = True  # and the DFT test molecules a PBE/def2-SVP one


QUICK = Plan(md_temperatures_molecule=(800.0,), md_temperatures_cluster=(300.0,), md_steps=40,
             md_every=20, md_skip=0, n_displaced=2, dft_frames_per_molecule=1,
             metal_cells_per_group=2, only=("g2-H2O", "g2-NH3", "g2-CH4", "g2-HCN"),
             metal_groups=6, water_trimer=False, ir_dft=False)


class PlanMismatch(ValueError):
    """The written data in --out holds molecules the plan does not (e.g. --quick on data/qm)."""


def rng_for(plan: Plan, *keys: int) -> np.random.Generator:
    """An independent generator per (stage, item, ...) so adding items never shifts others."""
    return np.random.default_rng([plan.seed, *keys])


def systems(plan: Plan) -> list[cfg.System]:
    """The molecules and clusters, in a fixed order (G2, S22, water trimer)."""
    out = cfg.g2_molecules() + cfg.s22_clusters()
    if plan.water_trimer:
        from ase.optimize import BFGS

        a = cfg.water_trimer_guess()
        a.calc = lab.xtb_calculator("GFN2-xTB")
        BFGS(a, logfile=None).run(fmax=0.01, steps=300)
        out.append(cfg.System("cluster-water_trimer", cfg._clean(a), "cluster"))
    if plan.only:
        out = [s for s in out if s.mol_id in plan.only]
    return out


def dft_eligible(plan: Plan, s: cfg.System) -> bool:
    """Small enough for the DFT budget (atoms and heavy atoms)."""
    return len(s.atoms) <= plan.dft_max_atoms and int((s.atoms.numbers > 1).sum()) <= plan.dft_max_heavy


def split_molecules(plan: Plan, syss: list[cfg.System]) -> dict[str, str]:
    """mol_id -> "train"/"test"; the test fraction is drawn separately among the
    DFT-eligible molecules and the rest, so both splits hold DFT molecules, and a DFT test
    molecule is a test molecule at every fidelity (one split per molecule)."""
    split = {}
    for k, pool in enumerate(([s for s in syss if dft_eligible(plan, s)],
                              [s for s in syss if not dft_eligible(plan, s)])):
        if not pool:
            continue
        n_test = max(1, round(plan.test_fraction * len(pool))) if len(pool) > 1 else 0
        test = set(rng_for(plan, 90, k).choice(len(pool), n_test, replace=False).tolist())
        split.update({s.mol_id: "test" if i in test else "train" for i, s in enumerate(pool)})
    return split


def sample(plan: Plan, syss: list[cfg.System], dropped: Counter) -> list:
    """MD and displaced frames of every system, each tagged with mol_id, charge, spin."""
    runs = sum(len(plan.md_temperatures_molecule if s.kind == "molecule"
                   else plan.md_temperatures_cluster) for s in syss)
    frames = []
    with Progress(runs + len(syss), "sample (MD runs + displacement sets)", "runs") as bar:
        for i, s in enumerate(syss):
            driver = "GFN2-xTB" if i % 2 == 0 else "GFN1-xTB"  # alternate: no single-level bias
            temps = plan.md_temperatures_molecule if s.kind == "molecule" else plan.md_temperatures_cluster
            mine = []
            for k, temp in enumerate(temps):
                seed = int(rng_for(plan, 10, i, k).integers(2**31 - 1))
                run = cfg.md_frames(s, lab.xtb_calculator(driver), temp, plan.md_steps, plan.md_every,
                                    plan.md_skip, plan.md_timestep_fs, plan.md_friction_per_fs, seed)
                for a in run:
                    a.info["md_driver"] = driver
                mine += run
                bar.update(1, mol=s.mol_id)
            mine += cfg.displaced(s, plan.n_displaced, plan.displacement_sigma_A, rng_for(plan, 20, i))
            bar.update(1, mol=s.mol_id)
            for a in mine:
                if cfg.too_close(a):
                    dropped["atoms_too_close"] += 1
                    continue
                a.info.update(mol_id=s.mol_id, charge=0, spin=1, frame=len(frames))
                frames.append(a)
    return frames


def label_xtb(plan: Plan, frames: list, dropped: Counter) -> list:
    """Both xTB levels on every frame; frames failing either level (or above max_force)
    are dropped and counted. Frame indices are renumbered per molecule afterwards."""
    kept = []
    with Progress(len(frames), "label GFN1-xTB + GFN2-xTB", "structures") as bar:
        for a in frames:
            try:
                for fid, prefix in lab.XTB_METHODS.items():
                    lab.xtb_label(a, fid).store(a, prefix)
            except Exception as err:  # noqa: BLE001 - a failed SCF drops this frame only
                dropped[f"xtb_failed: {type(err).__name__}"] += 1
                bar.update(1)
                continue
            fmax = max(np.linalg.norm(a.arrays[f"{p}_forces"], axis=1).max() for p in lab.XTB_METHODS.values())
            if fmax > plan.max_force:
                dropped["xtb_force_above_max_force"] += 1
            else:
                kept.append(a)
            bar.update(1)
    count: Counter = Counter()
    for a in kept:
        a.info["frame"] = count[a.info["mol_id"]]
        count[a.info["mol_id"]] += 1
    return kept


def pick_dft_frames(plan: Plan, mine: list, *keys: int) -> list:
    """``dft_frames_per_molecule`` of one molecule's frames (all if fewer), drawn with
    ``rng_for(plan, *keys)``, in frame order."""
    n = min(plan.dft_frames_per_molecule, len(mine))
    pick = sorted(rng_for(plan, *keys).choice(len(mine), n, replace=False).tolist())
    return [mine[j] for j in pick]


def label_dft(plan: Plan, syss: list[cfg.System], frames: list, dropped: Counter) -> list:
    """PBE/def2-SVP on ``dft_frames_per_molecule`` frames of each DFT-eligible molecule,
    chosen at random among its labelled frames; each frame keeps its xTB labels too."""
    chosen = []
    for i, s in enumerate(syss):
        if dft_eligible(plan, s):
            chosen += pick_dft_frames(plan, [a for a in frames if a.info["mol_id"] == s.mol_id], 30, i)
    return dft_labelled(chosen, dropped)


def dft_labelled(chosen: list, dropped: Counter, seconds: Counter | None = None) -> list:
    """Copies of the xTB-labelled ``chosen`` frames (grouped by molecule) with PBE/def2-SVP
    labels, ``dft_scf_cycles`` and ``xtb_frame``, through :func:`qm_labels.dft_chain`;
    frames whose SCF fails are dropped and counted; ``seconds`` sums the wall time per molecule."""
    out, t0 = [], time.monotonic()
    with Progress(len(chosen), f"label {lab.DFT_FIDELITY} (pyscf)", "structures", interval=30) as bar:
        for a, labels, cycles in lab.dft_chain(chosen):
            if seconds is not None:  # dft_chain yields right after computing frame a
                seconds[a.info["mol_id"]] += time.monotonic() - t0
            bar.update(1, mol=a.info["mol_id"], cycles=cycles)
            t0 = time.monotonic()
            if labels is None:
                dropped["dft_scf_not_converged"] += 1
                continue
            b = a.copy()
            labels.store(b, "dft")
            b.info.update(dft_scf_cycles=cycles, xtb_frame=a.info["frame"])
            out.append(b)
    return out


def metals(plan: Plan) -> tuple[list, dict[str, str]]:
    """EMT-labelled metal cells and the split of their composition-prototype groups."""
    groups = cfg.metal_groups()
    if plan.metal_groups:
        groups = groups[:plan.metal_groups]
    frames = []
    with Progress(len(groups) * plan.metal_cells_per_group, "label EMT (metal cells)", "cells") as bar:
        for g, (gid, elements, proto) in enumerate(groups):
            rng = rng_for(plan, 40, g)
            for _ in range(plan.metal_cells_per_group):
                a = cfg.metal_cell(elements, proto, rng, plan.metal_strain,
                                   plan.metal_volume_scale, plan.metal_rattle_A)
                e, f, s = lab.emt_label(a)
                a.info.update(group=gid, emt_energy=e, emt_stress=s)
                a.arrays["emt_forces"] = f
                frames.append(a)
                bar.update(1)
    n_test = max(1, round(plan.test_fraction * len(groups)))
    test = set(rng_for(plan, 91).choice(len(groups), n_test, replace=False).tolist())
    return frames, {gid: "test" if i in test else "train" for i, (gid, _, _) in enumerate(groups)}


def ir_spectra(plan: Plan, syss: list[cfg.System], split: dict[str, str], dft_ids: set[str],
               out: Path) -> dict:
    """IR reference spectra of the test molecules into ``out/test/ir`` (the folder is
    rewritten); returns the record for ``stats.json``."""
    test = [s for s in syss if split.get(s.mol_id) == "test"]
    jobs = [(s, level) for s in test if len(s.atoms) <= plan.ir_max_atoms for level in ("gfn1", "gfn2")]
    jobs += [(s, "dft") for s in test if plan.ir_dft and s.mol_id in dft_ids]
    folder = out / "test" / "ir"
    for old in folder.glob("*.json"):
        old.unlink()
    wall: Counter = Counter()
    files = {}
    with Progress(len(jobs), "IR spectra (relax + finite differences)", "spectra") as bar:
        for s, level in jobs:
            t0 = time.monotonic()
            rec = ir.spectrum(s.mol_id, s.atoms, level)
            size = ir.write(folder / f"{s.mol_id}.{level}.json", rec)
            wall[f"{level}_s"] += time.monotonic() - t0
            files[f"{s.mol_id}.{level}"] = {
                "atoms": len(s.atoms), "relax_steps": rec["relax_steps"],
                "residual_max_force_eV_A": rec["residual_max_force_eV_A"],
                "ir_active_frequencies_cm1": rec["ir_active_frequencies_cm1"], "bytes": size}
            bar.update(1, mol=s.mol_id, level=level)
    return {"settings": ir.IR_SETTINGS, "wall_s": {k: round(v, 1) for k, v in sorted(wall.items())},
            "bytes": sum(f["bytes"] for f in files.values()), "spectra": files}


def run(plan: Plan, out: Path) -> dict:
    """All stages; writes the files and ``stats.json`` under ``out``; returns the stats."""
    _require_codes()
    wall, dropped, t0 = {}, Counter(), time.monotonic()
    syss = systems(plan)
    split = split_molecules(plan, syss)
    frames = sample(plan, syss, dropped)
    wall["sample_md_and_displacements_s"], t0 = round(time.monotonic() - t0, 1), time.monotonic()
    frames = label_xtb(plan, frames, dropped)
    wall["label_xtb_s"], t0 = round(time.monotonic() - t0, 1), time.monotonic()
    dft = label_dft(plan, syss, frames, dropped)
    wall["label_dft_s"], t0 = round(time.monotonic() - t0, 1), time.monotonic()
    cells, metal_split = metals(plan)
    wall["label_emt_s"] = round(time.monotonic() - t0, 1)
    wr.clear(out)
    sizes = wr.write_grouped(out, "hcno-xtb", frames, split)
    sizes |= wr.write_grouped(out, "hcno-dft", dft, split)
    sizes |= wr.write_grouped(out, "metals-emt", cells, metal_split, key="group")
    stats = summarise(plan, syss, split, metal_split, frames, dft, cells, dropped, wall, sizes)
    stats["ir"] = ir_spectra(plan, syss, split, {a.info["mol_id"] for a in dft}, out)
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return run_dft_test_extra(plan, out)  # on the test files just written, as in the shipped copy


def run_relabel(plan: Plan, out: Path) -> dict:
    """``--relabel``: new molecular labels on the stored structures (:mod:`qm_relabel`);
    updates ``stats.json`` (extras statistics, the relabel record, file sizes)."""
    _require_codes()
    done = rl.relabel(out)
    stats = json.loads((out / "stats.json").read_text())
    for fid, entry in extras_summary(done["frames"]["hcno-xtb"], done["frames"]["hcno-dft"],
                                     done["split"]).items():
        stats["fidelities"][fid]["extras"] = entry
    stats["compressed_bytes"] = sum(p.stat().st_size for p in out.glob("*/*/*.extxyz.xz"))
    stats.update(xtb_settings=lab.XTB_SETTINGS, dft_settings=lab.DFT_SETTINGS, relabel=done["record"])
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def run_ir(plan: Plan, out: Path) -> dict:
    """``--ir``: only the IR spectra of the written dataset's test molecules."""
    _require_codes()
    test = {p.name.removesuffix(".extxyz.xz") for p in out.glob("test/hcno-xtb/*.extxyz.xz")}
    stats = json.loads((out / "stats.json").read_text())
    stats["plan"].update(ir_max_atoms=plan.ir_max_atoms, ir_dft=plan.ir_dft)
    # the reference geometries (the trimer's is relaxed again only if it is a test molecule)
    syss = systems(dataclasses.replace(plan, water_trimer="cluster-water_trimer" in test, only=()))
    # DFT spectra for the DFT-eligible test molecules only, as in the full run (not for those
    # --dft-test-extra labelled: 6N gradients + a relaxation each, ~2 h for the seven here)
    dft_ids = {s.mol_id for s in syss if s.mol_id in test and dft_eligible(plan, s)}
    stats["ir"] = ir_spectra(plan, syss, dict.fromkeys(test, "test"), dft_ids, out)
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def run_dft_test_extra(plan: Plan, out: Path) -> dict:
    """``--dft-test-extra``: PBE/def2-SVP labels for the written test molecules that have
    none (those above the DFT size limit): ``dft_frames_per_molecule`` structures each, drawn
    among the molecule's ``hcno-xtb`` test frames with stage key 31 (so no other draw shifts)
    and labelled as in the full run, into new ``test/hcno-dft`` files; the split and every
    existing file stay as they are. Updates ``stats.json`` (:func:`dft_test_summary`)."""
    _require_codes()
    t0 = time.monotonic()
    xtb = {p.name.removesuffix(".extxyz.xz"): p for p in out.glob("test/hcno-xtb/*.extxyz.xz")}
    missing = set(xtb) - {p.name.removesuffix(".extxyz.xz") for p in out.glob("test/hcno-dft/*.extxyz.xz")}
    # the molecule index i of label_dft (the trimer, last, is relaxed only when needed)
    trimer = plan.water_trimer and "cluster-water_trimer" in missing
    syss = systems(dataclasses.replace(plan, water_trimer=trimer))
    unknown = missing - {s.mol_id for s in syss}
    if unknown:
        raise PlanMismatch(f"{out}: test molecules {sorted(unknown)} are not in this plan's molecules; "
                         "run with the plan that wrote the data (no --quick for data/qm)")
    chosen = [a for i, s in enumerate(syss) if s.mol_id in missing
              for a in pick_dft_frames(plan, wr.read_xz(xtb[s.mol_id]), 31, i)]
    dropped, seconds = Counter(), Counter()
    new = dft_labelled(chosen, dropped, seconds)
    sizes = wr.write_grouped(out, "hcno-dft", new, dict.fromkeys(missing, "test"))
    molecules = {m: {"xtb_frames": [], "scf_cycles": [], "wall_s": round(seconds[m], 1)}
                 for m in sorted(missing)}
    for a in new:
        molecules[a.info["mol_id"]]["xtb_frames"].append(int(a.info["xtb_frame"]))
        molecules[a.info["mol_id"]]["scf_cycles"].append(int(a.info["dft_scf_cycles"]))
    stats = json.loads((out / "stats.json").read_text())
    if new:
        dft_test_summary(stats, out, new)
    stats["dft_test_extra"] = {"rng_stage_key": 31, "structures": len(new),
                               "dropped": dict(sorted(dropped.items())), "molecules": molecules,
                               "wall_s": round(time.monotonic() - t0, 1), "bytes": sum(sizes.values())}
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def _require_codes() -> None:
    """Fail with the pip command when tblite or pyscf is missing."""
    for module, package in (("tblite", "tblite"), ("pyscf", "pyscf")):
        lab.require(module, package)


def extras_summary(xtb: list, dft: list, split: dict[str, str]) -> dict[str, dict]:
    """Charge and dipole statistics per molecular fidelity (``stats.json``)."""
    out = {fid: wr.extras_stats(xtb, prefix, "e*A", split) for fid, prefix in lab.XTB_METHODS.items()}
    out[lab.DFT_FIDELITY] = wr.extras_stats(dft, "dft", "Debye", split)
    return out


def dft_agreement(dft: list) -> dict:
    """How the three molecular levels agree on the DFT structures (``stats.json``)."""
    return {"GFN1-xTB vs PBE/def2-SVP": wr.compare(dft, "gfn1", "dft"),
            "GFN2-xTB vs PBE/def2-SVP": wr.compare(dft, "gfn2", "dft"),
            "GFN1-xTB vs GFN2-xTB": wr.compare(dft, "gfn1", "gfn2")}


def dft_test_summary(stats: dict, out: Path, new: list) -> None:
    """Bring ``stats.json``'s DFT figures up to date after :func:`run_dft_test_extra` wrote
    ``new``: the PBE/def2-SVP test entries, the DFT molecules, the agreement of the levels
    (all from the written files, which give the in-memory figures to the printed decimals)
    and the file count and size. The charge-sum bound keeps its "as computed" meaning: the
    larger of the previous one and the new structures' (the files' 8 decimals give 1e-8)."""
    paths = sorted(out.glob("*/hcno-dft/*.extxyz.xz"))
    dft = [a for p in paths for a in wr.read_xz(p)]
    split = {p.name.removesuffix(".extxyz.xz"): p.relative_to(out).parts[0] for p in paths}
    entry = stats["fidelities"][lab.DFT_FIDELITY]
    entry["test"] = wr.fidelity_stats(dft, "dft_energy", "dft_forces", split)["test"]
    bound = max(entry["extras"]["test"]["charge_sum_max_abs_e"],
                wr.extras_stats(new, "dft", "Debye", split)["test"]["charge_sum_max_abs_e"])
    entry["extras"]["test"] = wr.extras_stats(dft, "dft", "Debye", split)["test"]
    entry["extras"]["test"]["charge_sum_max_abs_e"] = bound
    stats["dft_molecules"] = sorted(split)
    stats["agreement_on_dft_structures"] = dft_agreement(dft)
    written = list(out.glob("*/*/*.extxyz.xz"))
    stats.update(files=len(written), compressed_bytes=sum(p.stat().st_size for p in written))


def summarise(plan, syss, split, metal_split, frames, dft, cells, dropped, wall, sizes) -> dict:
    """Everything the README reports, as one JSON-able dict."""
    fids = {}
    for fid, prefix in lab.XTB_METHODS.items():
        fids[fid] = {"dataset": "hcno-xtb",
                     **wr.fidelity_stats(frames, f"{prefix}_energy", f"{prefix}_forces", split)}
    fids[lab.DFT_FIDELITY] = {"dataset": "hcno-dft", **wr.fidelity_stats(dft, "dft_energy", "dft_forces", split)}
    for fid, entry in extras_summary(frames, dft, split).items():
        fids[fid]["extras"] = entry
    fids["EMT"] = {"dataset": "metals-emt",
                   **wr.fidelity_stats(cells, "emt_energy", "emt_forces", metal_split, key="group")}
    return {
        "plan": dataclasses.asdict(plan), "versions": lab.versions(),
        "xtb_settings": lab.XTB_SETTINGS, "dft_settings": lab.DFT_SETTINGS,
        "fidelities": fids, "dropped": dict(sorted(dropped.items())), "wall_s": wall,
        "compressed_bytes": sum(sizes.values()), "files": len(sizes),
        "test_molecules": sorted(m for m, s in split.items() if s == "test"),
        "dft_molecules": sorted({a.info["mol_id"] for a in dft}),
        "test_metal_groups": sorted(g for g, s in metal_split.items() if s == "test"),
        "agreement_on_dft_structures": dft_agreement(dft),
        "agreement_on_all_xtb_structures": {"GFN1-xTB vs GFN2-xTB": wr.compare(frames, "gfn1", "gfn2")},
    }


def main(argv: list[str] | None = None) -> int:
    """Command line: ``make_qm.py [--quick] [--relabel | --ir | --dft-test-extra] [--out DIR] [--seed N]``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny version in seconds (for tests)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--relabel", action="store_true",
                      help="recompute the molecular labels of the files in --out (adds charges and "
                           "dipoles, checks energies and forces); no resampling")
    mode.add_argument("--ir", action="store_true", help="only the IR spectra of --out's test molecules")
    mode.add_argument("--dft-test-extra", action="store_true",
                      help="add PBE/def2-SVP labels (dft_frames_per_molecule structures each) to the "
                           "test molecules in --out that have none; existing files and the split "
                           "stay as they are")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: data/qm; required with --quick)")
    p.add_argument("--seed", type=int, default=Plan.seed)
    args = p.parse_args(argv)
    if args.quick and args.out is None:
        p.error("--quick needs --out DIR (it must not overwrite the shipped data in data/qm)")
    plan = dataclasses.replace(QUICK if args.quick else Plan(), seed=args.seed)
    stage = (run_relabel if args.relabel else run_ir if args.ir
             else run_dft_test_extra if args.dft_test_extra else run)
    try:
        stats = stage(plan, args.out or HERE)
    except (lab.MissingCode, PlanMismatch) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(wr.markdown_counts(stats))
    keys = ("dropped", "wall_s", "compressed_bytes", "files", "relabel", "dft_test_extra")
    shown = {k: stats[k] for k in keys if k in stats} | {"ir_wall_s": stats.get("ir", {}).get("wall_s")}
    print(json.dumps(shown, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
