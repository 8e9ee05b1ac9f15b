"""The shipped QM dataset (data/qm, configs/data/qm-*.yaml) built by the real builder.

Both recipes must build without rejects into four fidelities, the split must be by
molecule (no molecule's conformers on both sides, DFT test molecules test at xTB too),
labels finite. These tests need neither tblite nor pyscf; the last one regenerates the
quick version with them and is skipped where they are not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.build import build
from data_pipeline.build.recipe import expand_sources, load_recipe
from data_pipeline.build.sources.extxyz import read_extxyz
from data_pipeline.stream import ShardedDataset

REPO = Path(__file__).resolve().parents[3]
FIDELITIES = {"GFN1-xTB", "GFN2-xTB", "PBE/def2-SVP", "EMT"}
MOLECULAR = {"GFN1-xTB", "GFN2-xTB", "PBE/def2-SVP"}


def group_id(source_id: str) -> str:
    """The molecule (or metal group) a record belongs to: its file's name."""
    return Path(source_id.split("#")[0]).name.removesuffix(".extxyz.xz")


def build_recipe(path: Path, out: Path, **overrides) -> tuple[dict, dict[str, set[str]], list]:
    """Build ``path``; return the manifest, fidelity -> group ids, and every record."""
    recipe = load_recipe(path, [f"{k}={v}" for k, v in overrides.items()])
    manifest = build(recipe, out, workers=2, progress=False)
    ds = ShardedDataset(out)
    records = [ds[i] for i in range(len(ds))]
    ids: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        ids[rec["fidelity"]].add(group_id(rec["source_id"]))
    return manifest, ids, records


@pytest.fixture(scope="module")
def shipped(ray_local, tmp_path_factory):
    """{split: (manifest, ids, records)} of the two shipped recipes."""
    return {split: build_recipe(REPO / "configs" / "data" / f"qm-{split}.yaml",
                                tmp_path_factory.mktemp(f"qm-{split}"))
            for split in ("train", "test")}


def test_four_fidelities_without_rejects(shipped):
    for split, (manifest, ids, _) in shipped.items():
        assert manifest["rejects"]["total"] == 0, (split, manifest["rejects"])
        groups = {g["fidelity"]: g for g in manifest["groups"]}
        assert set(groups) == FIDELITIES, split
        assert all(g["structures"] > 0 for g in groups.values()), split
        assert set(manifest["element_references"]) == FIDELITIES
    train, test = (shipped[s][0]["records"] for s in ("train", "test"))
    assert 0.1 < test / (train + test) < 0.3  # ~15-20% of molecules, in structures


def test_split_by_molecule(shipped):
    (_, train, _), (_, test, _) = shipped["train"], shipped["test"]
    every_train = set().union(*train.values())
    for fid in FIDELITIES:
        assert not (test[fid] & every_train), f"{fid}: test molecules also in train"
    for split in (train, test):  # the DFT structures are a subset of the xTB ones
        assert split["PBE/def2-SVP"] <= split["GFN1-xTB"] == split["GFN2-xTB"]
    assert train["PBE/def2-SVP"] and test["PBE/def2-SVP"]


def test_labels_finite_and_molecular_metadata(shipped):
    for split, (_, _, records) in shipped.items():
        for rec in records:
            assert np.isfinite(rec["energy"]), rec["source_id"]
            assert np.isfinite(rec["forces"]).all() and np.abs(rec["forces"]).max() < 50.0
            if rec["fidelity"] in MOLECULAR:
                assert (rec["charge"], rec["spin"]) == (0, 1), rec["source_id"]
                assert not rec["pbc"].any() and rec["stress"] is None
            else:
                assert rec["pbc"].all() and np.isfinite(rec["stress"]).all(), rec["source_id"]


def test_files_name_their_molecule(shipped):
    """The id in a file's name is the mol_id (metal group) stored in each frame's info."""
    recipe = load_recipe(REPO / "configs" / "data" / "qm-test.yaml")
    for index, path, _ in expand_sources(recipe):
        key = "group" if recipe.sources[index].fidelity == "EMT" else "mol_id"
        stems = {frame.info[key] for _, frame in read_extxyz(path)}
        assert stems == {group_id(str(path))}, path


def test_quick_regeneration_is_deterministic_and_builds(ray_local, tmp_path):
    pytest.importorskip("tblite")
    pytest.importorskip("pyscf")
    script = REPO / "data" / "qm" / "make_qm.py"
    outs = [tmp_path / f"run{k}" / "data" / "qm" for k in range(2)]
    for out in outs:
        subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], check=True,
                       capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    files = [sorted(p.relative_to(o) for p in o.rglob("*.extxyz.xz")) for o in outs]
    assert files[0] == files[1] and files[0]
    assert all((outs[0] / f).read_bytes() == (outs[1] / f).read_bytes() for f in files[0])
    manifest, ids, _ = build_recipe(REPO / "configs" / "data" / "qm-train.yaml", tmp_path / "built",
                                    root=str(tmp_path / "run0"))
    assert manifest["rejects"]["total"] == 0
    assert {g["fidelity"] for g in manifest["groups"]} == FIDELITIES
