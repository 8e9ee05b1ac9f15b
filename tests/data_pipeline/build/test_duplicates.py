"""The duplicate join: copies within and across datasets, label conflicts, pairing across
fidelities, near copies, and the recipe's choices (keep all / keep first; keep / drop / fail)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from data_pipeline.build import BuildError, build
from data_pipeline.build.recipe import load_recipe
from data_pipeline.manifest import summary_table
from tests.synthetic import labelled_frames, write_frames

KEYS = {"energy_key": "REF_energy", "forces_key": "REF_forces", "stress_key": "REF_stress"}


def _copy(atoms, seed: int, shift=(0.7, -1.3, 2.1)):
    """The same structure and labels, atoms permuted, translated and wrapped."""
    perm = np.random.default_rng(seed).permutation(len(atoms))
    out = atoms[perm]  # arrays (the forces) follow the atoms
    out.info = dict(atoms.info)
    out.translate(shift)
    out.wrap()
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("dups")
    f = labelled_frames(12, seed=11, method="emt", max_atoms=16)
    mp = f[:8] + [_copy(f[3], 1)]  # f3 twice in one dataset
    conflict = _copy(f[1], 2)
    conflict.info["REF_energy"] = f[1].info["REF_energy"] + 0.05 * len(f[1])  # 50 meV/atom apart
    near = f[2].copy()
    near.positions[0, 0] += 1e-7
    alex = [_copy(f[0], 3), conflict, near, *f[8:10]]
    write_frames(root / "mp.extxyz", mp)
    write_frames(root / "alex.extxyz", alex)
    write_frames(root / "scan.extxyz", [_copy(f[0], 4), f[10], f[11]])  # f0 also at a second fidelity
    return root


def _recipe(root, tmp_path, **extra):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"root": str(root), "shards": 2, **extra, "sources": [
        {"path": "mp.extxyz", "dataset": "mp", "fidelity": "PBE", **KEYS},
        {"path": "alex.extxyz", "dataset": "alex", "fidelity": "PBE", **KEYS},
        {"path": "scan.extxyz", "dataset": "mp", "fidelity": "r2SCAN", **KEYS}]}))
    return load_recipe(path)


def test_copies_conflicts_near_copies_and_pairing_are_reported(ray_local, sources, tmp_path):
    manifest = build(_recipe(sources, tmp_path), tmp_path / "out", workers=2, progress=False)
    d = manifest["duplicates"]
    pbe = d["fidelities"]["PBE"]
    assert pbe["exact_duplicates_within_dataset"] == 1  # f3 twice in mp
    assert pbe["exact_duplicates_across_datasets"] == 2  # f0 and f1 (the conflict) in alex
    assert pbe["conflicting_structures"] == 1 and pbe["conflicting_records"] == 2
    assert pbe["near_duplicates"] == 2  # f2 and its 1e-7 A displaced copy
    assert d["fidelities"]["r2SCAN"]["exact_duplicates_across_datasets"] == 0
    assert d["across_fidelities"] == {"structures_at_several": 1, "pairs": {"PBE | r2SCAN": 1}}
    assert d["conflicts"]["energy_spread_max"] == pytest.approx(0.05, rel=1e-6)
    assert d["conflicts"]["force_spread_max"] < 1e-5  # same forces, matched atom by atom
    assert manifest["records"] == 17 and d["dropped"] == 0  # keep_all, keep: nothing lost
    (line,) = (tmp_path / "out" / "conflicts.jsonl").read_text().splitlines()
    c = json.loads(line)
    assert {(m["file"], m["index"]) for m in c["records"]} == {("mp.extxyz", 1), ("alex.extxyz", 1)}
    assert c["action"] == "kept"
    text = summary_table(manifest)
    assert "label conflicts: 1 structures" in text and "PBE | r2SCAN: 1" in text
    assert any("different labels" in w for w in manifest["warnings"])


def test_keep_first_and_drop_conflicts_reject_with_reasons(ray_local, sources, tmp_path):
    recipe = _recipe(sources, tmp_path, duplicates="keep_first", conflicts="drop")
    manifest = build(recipe, tmp_path / "out", workers=2, progress=False)
    assert manifest["records"] == 17 - 4
    assert manifest["rejects"]["by_reason"] == {"duplicate": 2, "label_conflict": 2}
    lines = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    dup = {(r["file"], r["index"]) for r in lines if r["reason"] == "duplicate"}
    assert dup == {("mp.extxyz", 8), ("alex.extxyz", 0)}  # the later copies; the first ones stay
    assert all("mp.extxyz frame" in r["detail"] for r in lines if r["reason"] == "duplicate")
    # the structure at the second fidelity is not a duplicate of the PBE one
    assert manifest["groups"][-1]["fidelity"] == "r2SCAN" and manifest["groups"][-1]["structures"] == 3


def test_conflicts_fail_names_the_records(ray_local, sources, tmp_path):
    with pytest.raises(BuildError, match=r"mp.extxyz frame 1 .*alex.extxyz frame 1"):
        build(_recipe(sources, tmp_path, conflicts="fail"), tmp_path / "out", workers=2, progress=False)


def test_shards_carry_the_fingerprints(built):
    from data_pipeline.fingerprints import KEYS as FP, record_fingerprints
    from data_pipeline.schema import decode
    from data_pipeline.shards import ShardReader, shard_name

    _, folder, manifest = built
    reader = ShardReader(folder / shard_name(0))
    header, arrays = reader.meta()
    recs = [decode(reader.get(i)) for i in range(header["n_records"])]
    again = record_fingerprints(recs)
    for key in FP:
        assert np.array_equal(arrays[key], again[key]), key
