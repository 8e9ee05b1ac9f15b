"""The shipped QM dataset (data/qm, configs/data/qm-*.yaml) built by the real builder.

Both recipes must build without rejects into four fidelities, the split must be by
molecule (no molecule's conformers on both sides, DFT test molecules test at xTB too),
labels finite; every molecular frame carries charges and dipoles at each of its levels,
and the IR reference files are complete. These tests need neither tblite nor pyscf; the
last one regenerates the quick version with them (from ``$QM_PYTHON`` if set, else this
Python) and is skipped where they are not installed.

The recipes map the charges and dipoles with the ``{key, name, unit}`` extras syntax; a
build that does not read it yet gets the recipes without their extras (everything else is
still checked) and the test of the built extras is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase import units

from common.config import ConfigError
from data_pipeline.build import build
from data_pipeline.build.recipe import Recipe, expand_sources, load_recipe
from data_pipeline.build.sources.extxyz import read_extxyz
from data_pipeline.stream import ShardedDataset

REPO = Path(__file__).resolve().parents[3]
QM = REPO / "data" / "qm"
FIDELITIES = {"GFN1-xTB", "GFN2-xTB", "PBE/def2-SVP", "EMT"}
MOLECULAR = {"GFN1-xTB", "GFN2-xTB", "PBE/def2-SVP"}
EXTRAS = {"hcno-xtb": ("gfn1", "gfn2"), "hcno-dft": ("gfn1", "gfn2", "dft")}  # dataset -> prefixes


def group_id(source_id: str) -> str:
    """The molecule (or metal group) a record belongs to: its file's name."""
    return Path(source_id.split("#")[0]).name.removesuffix(".extxyz.xz")


def load_shipped(path: Path, tmp: Path, **overrides) -> tuple[Recipe, bool]:
    """The recipe, and whether the build reads its extras; where it rejects the extras
    syntax (``sources[i].extras[j]``), the same recipe without extras."""
    args = [f"{k}={v}" for k, v in overrides.items()]
    try:
        return load_recipe(path, args), True
    except ConfigError as err:
        if ".extras[" not in str(err):
            raise
    raw = yaml.safe_load(path.read_text())
    raw["root"] = str((path.parent / raw["root"]).resolve())
    for src in raw["sources"]:
        src.pop("extras", None)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / path.name).write_text(yaml.safe_dump(raw))
    return load_recipe(tmp / path.name, args), False


def build_recipe(path: Path, out: Path, **overrides) -> tuple[dict, dict[str, set[str]], list, bool]:
    """Build ``path``; return the manifest, fidelity -> group ids, every record, and
    whether the build kept the recipe's extras."""
    recipe, with_extras = load_shipped(path, out.with_name(out.name + "-recipe"), **overrides)
    manifest = build(recipe, out, workers=2, progress=False)
    ds = ShardedDataset(out)
    records = [ds[i] for i in range(len(ds))]
    ids: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        ids[rec["fidelity"]].add(group_id(rec["source_id"]))
    return manifest, ids, records, with_extras


@pytest.fixture(scope="module")
def shipped(ray_local, tmp_path_factory):
    """{split: (manifest, ids, records, with_extras)} of the two shipped recipes."""
    return {split: build_recipe(REPO / "configs" / "data" / f"qm-{split}.yaml",
                                tmp_path_factory.mktemp(f"qm-{split}"))
            for split in ("train", "test")}


def test_four_fidelities_without_rejects(shipped):
    for split, (manifest, ids, _, _) in shipped.items():
        assert manifest["rejects"]["total"] == 0, (split, manifest["rejects"])
        groups = {g["fidelity"]: g for g in manifest["groups"]}
        assert set(groups) == FIDELITIES, split
        assert all(g["structures"] > 0 for g in groups.values()), split
        assert set(manifest["element_references"]) == FIDELITIES
    train, test = (shipped[s][0]["records"] for s in ("train", "test"))
    assert 0.1 < test / (train + test) < 0.3  # ~15-20% of molecules, in structures


def test_split_by_molecule(shipped):
    (_, train, _, _), (_, test, _, _) = shipped["train"], shipped["test"]
    every_train = set().union(*train.values())
    for fid in FIDELITIES:
        assert not (test[fid] & every_train), f"{fid}: test molecules also in train"
    for split in (train, test):  # the DFT structures are a subset of the xTB ones
        assert split["PBE/def2-SVP"] <= split["GFN1-xTB"] == split["GFN2-xTB"]
    assert train["PBE/def2-SVP"] and test["PBE/def2-SVP"]


def test_labels_finite_and_molecular_metadata(shipped):
    for split, (_, _, records, _) in shipped.items():
        for rec in records:
            assert np.isfinite(rec["energy"]), rec["source_id"]
            assert np.isfinite(rec["forces"]).all() and np.abs(rec["forces"]).max() < 50.0
            if rec["fidelity"] in MOLECULAR:
                assert (rec["charge"], rec["spin"]) == (0, 1), rec["source_id"]
                assert not rec["pbc"].any() and rec["stress"] is None
            else:
                assert rec["pbc"].all() and np.isfinite(rec["stress"]).all(), rec["source_id"]


def test_files_name_their_molecule(shipped, tmp_path):
    """The id in a file's name is the mol_id (metal group) stored in each frame's info."""
    recipe, _ = load_shipped(REPO / "configs" / "data" / "qm-test.yaml", tmp_path)
    for index, path, _ in expand_sources(recipe):
        key = "group" if recipe.sources[index].fidelity == "EMT" else "mol_id"
        stems = {frame.info[key] for _, frame in read_extxyz(path)}
        assert stems == {group_id(str(path))}, path


def test_built_records_carry_charges_and_dipole(shipped):
    """Every molecular record has extras ``charges`` [n] (sum 0) and ``dipole`` [3] in e*A,
    the DFT one converted from the files' Debye once; EMT records have none."""
    if not all(with_extras for *_, with_extras in shipped.values()):
        pytest.skip("this build does not read the recipes' {key, name, unit} extras yet")
    raw = {}  # (source file, frame) -> stored DFT dipole, Debye
    for path in QM.glob("*/hcno-dft/*.extxyz.xz"):
        for k, frame in read_extxyz(path):
            raw[(path.relative_to(REPO).as_posix(), k)] = frame.info["dft_dipole"]
    for _, _, records, _ in shipped.values():
        for rec in records:
            if rec["fidelity"] not in MOLECULAR:
                assert not rec["extras"], rec["source_id"]
                continue
            q, mu = rec["extras"]["charges"], rec["extras"]["dipole"]
            assert q.shape == (len(rec["numbers"]),) and abs(q.sum()) < 1e-5, rec["source_id"]
            assert mu.shape == (3,) and np.isfinite(mu).all(), rec["source_id"]
            if rec["fidelity"] == "PBE/def2-SVP":
                file, index = rec["source_id"].split("#")
                np.testing.assert_allclose(mu, raw[(file, int(index))] * units.Debye, rtol=1e-6, atol=1e-9)


def molecular_files() -> list[tuple[Path, str]]:
    """(file, dataset) of every shipped molecular file."""
    return [(p, ds) for ds in EXTRAS for p in sorted(QM.glob(f"*/{ds}/*.extxyz.xz"))]


def test_shipped_frames_carry_charges_and_dipoles():
    """Every molecular frame has charges [n] summing to 0 and a finite dipole [3] at each of
    its levels (a DFT frame at all three); metal frames have none."""
    files = molecular_files()
    assert len(files) == 68 + 28 + 7, len(files)  # all at xTB; at DFT 28 small + 7 larger test ones
    for path, dataset in files:
        for k, frame in read_extxyz(path):
            n = len(frame.numbers)
            for prefix in EXTRAS[dataset]:
                q, mu = frame.arrays[f"{prefix}_charges"], np.asarray(frame.info[f"{prefix}_dipole"])
                assert q.shape == (n,) and mu.shape == (3,), (path, k, prefix)
                # 8 decimals in the file: the rounding alone leaves |sum| <= n * 5e-9
                assert abs(q.sum()) < 1e-5 and np.isfinite(mu).all(), (path, k, prefix)
    for path in QM.glob("*/metals-emt/*.extxyz.xz"):
        for _, frame in read_extxyz(path):
            assert not any(key.endswith(("_charges", "_dipole")) for key in {**frame.info, **frame.arrays})


def test_dft_dipole_is_stored_in_debye():
    """A unit slip would show as a factor 4.8 between levels: the DFT dipole (Debye,
    converted to e*A) and GFN2's (e*A) of the same structure agree to within 2x."""
    ratios = []
    for path in QM.glob("*/hcno-dft/*.extxyz.xz"):
        for _, frame in read_extxyz(path):
            gfn2 = np.linalg.norm(frame.info["gfn2_dipole"])
            if gfn2 > 0.1:  # e*A; leaves out the near-apolar molecules
                ratios.append(np.linalg.norm(frame.info["dft_dipole"]) * units.Debye / gfn2)
    assert len(ratios) > 50 and 0.5 < np.median(ratios) < 2.0, np.median(ratios)


def test_ir_reference_files(tmp_path):
    """One JSON per test molecule and level (GFN1/GFN2 for <= 12 atoms, DFT for the DFT
    test molecules within the DFT size limit, not those --dft-test-extra labelled): 3N
    frequencies and intensities, a relaxed geometry, the rigid-body modes at zero, IR-active
    modes above the stated threshold; not under any recipe's glob."""
    stats = json.loads((QM / "stats.json").read_text())
    test = {p.name.removesuffix(".extxyz.xz") for p in QM.glob("test/hcno-xtb/*.extxyz.xz")}
    numbers = {m: next(read_extxyz(QM / "test" / "hcno-xtb" / f"{m}.extxyz.xz"))[1].numbers for m in test}
    plan = stats["plan"]
    dft = {m for m, z in numbers.items()
           if len(z) <= plan["dft_max_atoms"] and (z > 1).sum() <= plan["dft_max_heavy"]}
    labelled = {p.name.removesuffix(".extxyz.xz") for p in QM.glob("test/hcno-dft/*.extxyz.xz")}
    assert len(dft) == 5 and dft < labelled == test, (dft, labelled)
    files = sorted((QM / "test" / "ir").glob("*.json"))
    names = {p.name.removesuffix(".json") for p in files}
    small = {m for m, z in numbers.items() if len(z) <= 12}
    expected = {f"{m}.{level}" for m in small for level in ("gfn1", "gfn2")} | {f"{m}.dft" for m in dft}
    assert names == expected == set(stats["ir"]["spectra"]), names ^ expected
    levels = {"gfn1": "GFN1-xTB", "gfn2": "GFN2-xTB", "dft": "PBE/def2-SVP"}
    for path in files:
        rec = json.loads(path.read_text())
        n = len(rec["numbers"])
        assert rec["mol_id"] in test and path.name == f"{rec['mol_id']}.{rec['level']}.json"
        assert rec["fidelity"] == levels[rec["level"]] and (n <= 12 or rec["level"] == "dft")
        assert np.shape(rec["positions_A"]) == (n, 3) and len(rec["symbols"]) == n
        freq, inten = np.array(rec["frequencies_cm1"]), np.array(rec["ir_intensities_km_mol"])
        assert freq.shape == inten.shape == (3 * n,) and np.isfinite(freq).all()
        assert len(rec["rigid_body_modes"]) in (5, 6) and not freq[rec["rigid_body_modes"]].any()
        assert rec["residual_max_force_eV_A"] <= rec["settings"]["ir"]["fmax_eV_A"]
        thr = rec["settings"]["ir"]["ir_active_threshold_km_mol"]
        vib = sorted(set(range(3 * n)) - set(rec["rigid_body_modes"]))
        assert rec["ir_active_modes"] == [i for i in vib if inten[i] > thr], path.name
    for split in ("train", "test"):
        recipe, _ = load_shipped(REPO / "configs" / "data" / f"qm-{split}.yaml", tmp_path)
        assert not any(p.suffix == ".json" or "ir" in p.parts for _, p, _ in expand_sources(recipe))


def qm_python() -> str:
    """The Python that runs make_qm.py ($QM_PYTHON, else this one); skip without the codes."""
    exe = os.environ.get("QM_PYTHON", sys.executable)
    probe = subprocess.run([exe, "-c", "import tblite, pyscf"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"{exe} cannot import tblite and pyscf (pip install -e '.[qm]', or set "
                    "QM_PYTHON to a Python that has them)")
    return exe


def frames_of(path: Path) -> list:
    """Every frame of an extxyz file, as the build reads it."""
    return [frame for _, frame in read_extxyz(path)]


def test_quick_regeneration_is_deterministic_and_builds(ray_local, tmp_path):
    """Two quick runs give the same bytes (labels, charges, dipoles, IR files); relabelling
    one keeps every stored key and reproduces the charges and dipoles; the result builds."""
    exe = qm_python()
    script = REPO / "data" / "qm" / "make_qm.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"run{k}" / "data" / "qm" for k in range(2)]
    for out in outs:
        subprocess.run([exe, str(script), "--quick", "--out", str(out)], check=True,
                       capture_output=True, env=env)
    files = [sorted(p.relative_to(o) for p in [*o.rglob("*.extxyz.xz"), *o.rglob("ir/*.json")])
             for o in outs]
    assert files[0] == files[1] and any(f.suffix == ".json" for f in files[0])
    assert all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files[0])
    relabelled = tmp_path / "relabel"
    shutil.copytree(outs[0], relabelled)
    subprocess.run([exe, str(script), "--relabel", "--out", str(relabelled)], check=True,
                   capture_output=True, env=env)
    worst = json.loads((relabelled / "stats.json").read_text())["relabel"]["max_abs_diff_recomputed_vs_stored"]
    assert max(worst.values()) < 1e-4, worst  # the stored geometries have 8 decimals
    for path, dataset in [(p, d) for d in EXTRAS for p in sorted(outs[0].glob(f"*/{d}/*.extxyz.xz"))]:
        for a, b in zip(frames_of(path), frames_of(relabelled / path.relative_to(outs[0])), strict=True):
            new = {f"{p}_{k}" for p in EXTRAS[dataset] for k in ("charges", "dipole")}
            assert set(a.info) == set(b.info) and set(a.arrays) == set(b.arrays) and new <= {*a.info, *a.arrays}
            for key in set(a.info) - new:
                assert np.array_equal(a.info[key], b.info[key]), (path, key)
            for key in set(a.arrays) - new:
                assert np.array_equal(a.arrays[key], b.arrays[key]), (path, key)
            for key in new:
                np.testing.assert_allclose(b.info.get(key, b.arrays.get(key)),
                                           a.info.get(key, a.arrays.get(key)), atol=1e-5)
    manifest, ids, _, _ = build_recipe(REPO / "configs" / "data" / "qm-train.yaml", tmp_path / "built",
                                       root=str(tmp_path / "run0"))
    assert manifest["rejects"]["total"] == 0
    assert {g["fidelity"] for g in manifest["groups"]} == FIDELITIES
