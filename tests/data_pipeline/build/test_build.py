"""The data build end to end: determinism, kill-and-resume, rejects, strict mode, reader API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError
from data_pipeline.build import BuildError, build
from data_pipeline.build.recipe import load_recipe
from data_pipeline.stream import ShardedDataset
from tests.conftest import write_recipe

REPO = Path(__file__).resolve().parents[3]


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.lmdb"))}


def test_same_bytes_with_1_or_2_workers(built, tmp_path):
    recipe, out2, manifest2 = built
    manifest1 = build(recipe, tmp_path / "out1", workers=1, progress=False)
    assert shard_bytes(tmp_path / "out1") == shard_bytes(out2)
    assert manifest1 == manifest2
    assert (tmp_path / "out1" / "rejects.jsonl").read_bytes() == (out2 / "rejects.jsonl").read_bytes()
    assert (tmp_path / "out1" / "recipe.resolved.yaml").exists()


def test_manifest_contents(built):
    recipe, out, m = built
    assert m["records"] == 110 and m["rejects"]["total"] == 0
    assert [s["records"] for s in m["shards"]] == [28, 28, 27, 27]  # round robin: balanced
    groups = {(g["dataset"], g["fidelity"]): g for g in m["groups"]}
    assert set(groups) == {("alloys", "EMT"), ("alloys", "EMT-asap"), ("more", "EMT")}
    assert groups[("alloys", "EMT")]["structures"] == 60
    assert sum(g["atoms"] for g in m["groups"]) == m["atoms"]
    assert set(m["element_references"]) == {"EMT", "EMT-asap"}
    assert m["element_references"]["EMT"]["structures"] == 85
    assert not (out / ".build").exists()


def test_reader_api_matches_inputs(built, raw_root):
    import ase.io

    _, out, m = built
    ds = ShardedDataset(out)
    assert len(ds) == m["records"] == len(ds.n_atoms)
    frames = {f"pbe/part{k}.extxyz#{i}": a for k in range(3)
              for i, a in enumerate(ase.io.read(raw_root / "pbe" / f"part{k}.extxyz", ":"))}
    seen = 0
    for i in range(len(ds)):
        rec = ds[i]
        assert set(rec) >= {"numbers", "positions", "cell", "pbc", "energy", "forces", "stress",
                            "charge", "spin", "fidelity", "dataset", "source_id", "extras"}
        assert ds.n_atoms[i] == len(rec["numbers"])
        atoms = frames.get(rec["source_id"])
        if atoms is None:
            continue
        seen += 1
        np.testing.assert_array_equal(rec["positions"], atoms.positions)
        np.testing.assert_array_equal(rec["numbers"], atoms.numbers)
        assert rec["energy"] == atoms.info["REF_energy"] and rec["fidelity"] == "EMT"
        np.testing.assert_array_equal(rec["forces"], atoms.arrays["REF_forces"].astype(np.float32))
    assert seen == 60
    fids = ds.fidelity_ids
    assert np.bincount(fids).tolist() == [85, 25]
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]


def test_rerun_is_a_no_op_and_other_recipe_is_refused(built, tmp_path):
    recipe, out, manifest = built
    before = {p: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert build(recipe, out, workers=2, progress=False) == manifest
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    recipe.shards = 3
    with pytest.raises(BuildError, match="different recipe"):
        build(recipe, out, progress=False)
    recipe.shards = 4


def test_missing_path_and_empty_glob_fail_at_start(tmp_path, raw_root):
    path = write_recipe(tmp_path / "r.yaml", raw_root)
    with pytest.raises(ConfigError, match=r"sources\[0\].path.*matches no file"):
        build(load_recipe(path, ["sources.0.path=nothing/*.xyz"]), tmp_path / "o")
    with pytest.raises(ConfigError, match=r"sources\[1\].path.*does not exist"):
        build(load_recipe(path, ["sources.1.path=asap/missing.db"]), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.fixture
def bad_inputs(tmp_path, raw_root):
    """An extxyz with a NaN energy (frame 1), overlapping atoms (frame 3), truncated in frame 5."""
    from tests.synthetic import labelled_frames, write_frames

    frames = labelled_frames(7, seed=5, method="emt", max_atoms=16)
    frames[1].info["REF_energy"] = float("nan")
    frames[3].positions[1] = frames[3].positions[0] + [0.1, 0, 0]
    path = write_frames(tmp_path / "bad" / "bad.extxyz", frames)
    text = path.read_text().splitlines(keepends=True)
    cut = sum(len(a) + 2 for a in frames[:5]) + 4  # four lines into frame 5
    path.write_text("".join(text[:cut]))
    recipe = {"root": str(tmp_path), "shards": 2, "sources": [
        {"path": "bad/*.extxyz", "dataset": "bad", "fidelity": "EMT", "energy_key": "REF_energy",
         "forces_key": "REF_forces", "stress_key": "REF_stress"}]}
    import yaml

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    return tmp_path / "bad.yaml"


def test_bad_frames_are_rejected_and_counted(ray_local, bad_inputs, tmp_path):
    m = build(load_recipe(bad_inputs), tmp_path / "out", workers=2, progress=False)
    assert m["records"] == 3  # frames 0, 2, 4
    assert m["rejects"]["by_reason"] == {"atoms_too_close": 1, "non_finite_energy": 1, "parse_error": 1}
    rejects = [json.loads(l) for l in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["index"], r["reason"]) for r in rejects] == [
        ("bad/bad.extxyz", 1, "non_finite_energy"), ("bad/bad.extxyz", 3, "atoms_too_close"),
        ("bad/bad.extxyz", 5, "parse_error")]
    ids = sorted(ShardedDataset(tmp_path / "out")[i]["source_id"] for i in range(3))
    assert ids == ["bad/bad.extxyz#0", "bad/bad.extxyz#2", "bad/bad.extxyz#4"]


def test_batches_and_a_failed_screen_give_the_same_unit(bad_inputs, tmp_path, monkeypatch):
    """A unit converted in batches of 256, one record at a time, or with a batch screen that
    fails (every record then takes the full checks) writes the same records and rejects."""
    import data_pipeline.build.convert as convert
    from data_pipeline.build.sources import plan_units

    recipe = load_recipe(bad_inputs)
    unit = plan_units(recipe)[0]

    def run(tag):
        staging = tmp_path / tag
        staging.mkdir()
        summary = convert.convert_unit(0, unit, recipe.sources[0], recipe.validation, str(staging))
        table = convert.load_npz(convert.unit_file(staging, 0, ".table.npz"))
        files = [convert.unit_file(staging, 0, s).read_bytes() for s in (".bin", ".index.npy", ".rejects.jsonl")]
        return summary, files, {k: v.tolist() for k, v in table.items()}

    batched = run("batched")
    assert batched[0]["records"] == 3 and batched[0]["rejects"] == 3
    monkeypatch.setattr(convert, "_BATCH", 1)
    assert run("one-by-one") == batched

    def broken(*args):
        raise ValueError("cannot stack")

    monkeypatch.setattr(convert, "_BATCH", 256)
    monkeypatch.setattr(convert, "screen_many", broken)
    fallback = run("fallback")
    for key in batched[2]:
        assert fallback[2][key] == pytest.approx(batched[2][key], rel=1e-12, abs=0), key
    assert fallback[:2] == batched[:2]


def test_strict_exits_nonzero_naming_first_fault(bad_inputs, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "data", "build", str(bad_inputs), "--out",
         str(tmp_path / "o"), "--strict", "--workers", "1"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "bad/bad.extxyz frame 1: non_finite_energy" in proc.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_killed_build_resumes_to_the_same_result(built, raw_root, tmp_path):
    """SIGKILL a CLI build once a unit has finished; the rerun must equal a clean build."""
    _, clean_out, clean = built
    recipe_path = write_recipe(tmp_path / "recipe.yaml", raw_root)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "launch.cli", "data", "build", str(recipe_path), "--out", str(out),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((out / ".build").glob("unit-*.done.json")) and proc.poll() is None:
        assert time.monotonic() < deadline, "build never started"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    assert list((out / ".build").glob("unit-*.done.json"))
    resumed = build(load_recipe(recipe_path), out, workers=2, progress=False)
    assert resumed == clean
    assert shard_bytes(out) == shard_bytes(clean_out)


def test_inspect_cli(built):
    _, out, m = built
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "data", "inspect", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "EMT-asap" in proc.stdout and "110 records" in proc.stdout and "rejected: 0" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "data", "inspect", str(out), "--json"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert json.loads(proc.stdout)["content_hash"] == m["content_hash"]
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "data", "inspect", str(out / "nope")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "no manifest" in proc.stderr and "Traceback" not in proc.stderr


def test_label_units_are_converted_once_and_recorded(ray_local, tmp_path):
    """A file written in hartree, hartree/bohr and VASP-sign kbar reads back in eV, eV/A, ASE sign."""
    import yaml
    from ase import units

    from tests.synthetic import labelled_frames, write_frames

    frames = labelled_frames(6, seed=9, method="emt", max_atoms=8)
    truth = {f"raw/h.extxyz#{i}": (a.info["REF_energy"], a.arrays["REF_forces"].copy(),
                                   a.info["REF_stress"].copy()) for i, a in enumerate(frames)}
    for a in frames:
        a.info["REF_energy"] /= units.Hartree
        a.arrays["REF_forces"] /= units.Hartree / units.Bohr
        a.info["REF_stress"] = -a.info["REF_stress"] / (0.1 * units.GPa)
    write_frames(tmp_path / "raw" / "h.extxyz", frames)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"shards": 1, "sources": [
        {"path": "raw/h.extxyz", "dataset": "h", "fidelity": "X", "energy_key": "REF_energy",
         "forces_key": "REF_forces", "stress_key": "REF_stress", "energy_unit": "hartree",
         "forces_unit": "hartree/bohr", "stress_unit": "kbar", "stress_sign": "vasp"}]}))
    m = build(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", workers=1, progress=False)
    assert m["label_units"][0]["energy_unit"] == "hartree"
    assert m["label_units"][0]["factors"]["stress"] == pytest.approx(-0.1 * units.GPa)
    ds = ShardedDataset(tmp_path / "out")
    assert len(ds) == 6
    for i in range(len(ds)):
        rec = ds[i]
        energy, forces, stress = truth[rec["source_id"]]
        assert rec["energy"] == pytest.approx(energy, rel=1e-12)
        np.testing.assert_allclose(rec["forces"], forces, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rec["stress"], stress, rtol=1e-5, atol=1e-9)


def test_big_text_file_splits_into_units_with_the_same_records(ray_local, tmp_path):
    import yaml

    from data_pipeline.shards import sha256_file
    from tests.synthetic import labelled_frames, write_frames

    write_frames(tmp_path / "raw" / "big.extxyz", labelled_frames(120, seed=4, method="emt", max_atoms=24))
    recipe = {"shards": 3, "sources": [{"path": "raw/big.extxyz", "dataset": "d", "fidelity": "EMT",
                                        "energy_key": "REF_energy", "forces_key": "REF_forces"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    whole = build(load_recipe(tmp_path / "r.yaml"), tmp_path / "whole", workers=2, progress=False)
    split = build(load_recipe(tmp_path / "r.yaml", ["text_unit_bytes=65536"]), tmp_path / "split",
                  workers=2, progress=False)
    assert len(whole["inputs"]) == 1 and len(split["inputs"]) >= 3
    assert [i["bytes"][0] for i in split["inputs"]][0] == 0 and all(i["rows"] is None for i in split["inputs"])
    assert split["records"] == whole["records"] == 120
    ref_split, ref_whole = (m["element_references"]["EMT"]["energies"] for m in (split, whole))
    assert ref_split == pytest.approx(ref_whole, rel=1e-12)  # summed per unit: last bits differ
    a, b = ShardedDataset(tmp_path / "whole"), ShardedDataset(tmp_path / "split")
    ids = set()
    for i in range(len(a)):
        ra, rb = a[i], b[i]
        np.testing.assert_array_equal(ra["positions"], rb["positions"])
        assert ra["energy"] == rb["energy"]
        ids.add(rb["source_id"])
    assert len(ids) == 120 and any("@" in s for s in ids)
    for s in split["shards"]:  # the digests the shard tasks returned are the files' own
        assert s["sha256"] == sha256_file(tmp_path / "split" / s["file"])


def test_a_build_staged_by_an_older_version_is_converted_again(built, raw_root, tmp_path):
    """A killed build resumed by code that stages more per unit: the old units are redone."""
    from data_pipeline.build.driver import plan_hash
    from data_pipeline.build.sources import plan_units

    _, clean_out, clean = built
    recipe = load_recipe(write_recipe(tmp_path / "recipe.yaml", raw_root))
    out = tmp_path / "out"
    (out / ".build").mkdir(parents=True)
    digest = plan_hash(recipe, plan_units(recipe))
    (out / ".build" / "plan.json").write_text(json.dumps({"plan_hash": digest, "units": 1}))  # no version
    (out / ".build" / "unit-000000.done.json").write_text(json.dumps({"records": 0}))  # an old unit
    (out / "shard-00000.lmdb").write_bytes(b"old")
    assert build(recipe, out, workers=2, progress=False) == clean
    assert shard_bytes(out) == shard_bytes(clean_out)
