"""The release format stays readable: a committed v1 release keeps its golden predictions,
older versions load through the migration registry, newer ones are refused."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "release-v1"
GOLDEN = FIXTURE.parent / "release-v1-golden.json"


def golden_structures():
    """Fixed structures (no randomness) the golden predictions were made on."""
    from ase import Atoms
    from ase.build import bulk

    cell = bulk("Cu", "fcc", a=3.6, cubic=True)
    cell.positions[1] += [0.05, -0.03, 0.02]
    alloy = bulk("NiAl", "cesiumchloride", a=2.9).repeat((2, 1, 1))
    alloy.positions[0] += [0.04, 0.0, -0.02]
    cluster = Atoms("Pd3Ag", positions=[[0, 0, 0], [2.6, 0, 0], [1.3, 2.2, 0], [1.3, 0.8, 2.1]])
    return [cell, alloy, cluster]


def predictions(folder: Path) -> dict:
    from pretrain.release import MLIPCalculator

    out = {}
    for fid in ("EMT", "EMT-asap"):
        calc = MLIPCalculator.from_release(folder, fidelity=fid, dtype="float64")
        out[fid] = [{"energy": r["energy"], "forces": r["forces"].tolist(),
                     **({"stress": r["stress"].tolist()} if "stress" in r else {})}
                    for r in calc.predict(golden_structures())]
    return out


def _assert_golden(got: dict) -> None:
    """Every fidelity, structure and property of the golden file, and nothing missing."""
    golden = json.loads(GOLDEN.read_text())
    assert sorted(got) == sorted(golden), f"fidelities {sorted(got)} vs golden {sorted(golden)}"
    for fid, rows in golden.items():
        assert len(got[fid]) == len(rows), f"{fid}: {len(got[fid])} predictions, golden has {len(rows)}"
        for k, (g, r) in enumerate(zip(rows, got[fid])):
            assert sorted(r) == sorted(g), f"{fid} structure {k}: properties {sorted(r)} vs golden {sorted(g)}"
            assert r["energy"] == pytest.approx(g["energy"], rel=1e-9, abs=1e-9)
            np.testing.assert_allclose(r["forces"], g["forces"], rtol=1e-7, atol=1e-9)
            if "stress" in g:
                np.testing.assert_allclose(r["stress"], g["stress"], rtol=1e-7, atol=1e-11)


def test_golden_check_fails_on_a_missing_prediction():
    got = predictions(FIXTURE)
    for drop in (lambda g: g["EMT"].pop(), lambda g: g["EMT-asap"][0].pop("stress"),
                 lambda g: g.pop("EMT-asap")):
        damaged = json.loads(json.dumps(got))
        drop(damaged)
        with pytest.raises(AssertionError):
            _assert_golden(damaged)


def test_committed_release_keeps_its_predictions():
    _assert_golden(predictions(FIXTURE))


def _rewrite(folder: Path, edit) -> None:
    from pretrain.release.format import write_sums

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config), indent=1))
    (folder / "SHA256SUMS").unlink()
    write_sums(folder)


def test_older_version_migrates(tmp_path):
    """A synthetic version-0 config (names and references side by side) loads the same."""
    def to_v0(config):
        config = dict(config, format_version=0)
        config["fidelity_names"] = [f["name"] for f in config["fidelities"]]
        config["element_references"] = {f["name"]: f["element_references"] for f in config.pop("fidelities")}
        return config

    shutil.copytree(FIXTURE, tmp_path / "v0")
    _rewrite(tmp_path / "v0", to_v0)
    _assert_golden(predictions(tmp_path / "v0"))


def test_newer_version_is_refused(tmp_path):
    from pretrain.release import ReleaseError, load_release
    from pretrain.release.format import FORMAT_VERSION

    shutil.copytree(FIXTURE, tmp_path / "new")
    _rewrite(tmp_path / "new", lambda c: dict(c, format_version=FORMAT_VERSION + 1))
    with pytest.raises(ReleaseError, match=f"format_version {FORMAT_VERSION + 1} is newer than this code reads "
                                           f"\\({FORMAT_VERSION}\\)"):
        load_release(tmp_path / "new")


def test_missing_migration_is_named(tmp_path):
    from pretrain.release import ReleaseError, load_release

    shutil.copytree(FIXTURE, tmp_path / "old")
    _rewrite(tmp_path / "old", lambda c: dict(c, format_version=-1))
    with pytest.raises(ReleaseError, match="format_version -1 has no migration to 0"):
        load_release(tmp_path / "old")


if __name__ == "__main__":  # regenerate the golden file (only for a deliberate format change)
    sys.path.insert(0, str(FIXTURE.parents[2]))
    GOLDEN.write_text(json.dumps(predictions(FIXTURE), indent=1) + "\n")
    print(f"wrote {GOLDEN}")


@pytest.mark.parametrize("entry", ["../outside.txt", "{abs}", "sub/inner.txt"])
def test_sums_entries_outside_the_folder_are_refused(tmp_path, entry):
    """A listed path that leaves the folder is refused before anything is read, even when
    the file it names exists and its hash is right."""
    from pretrain.release import ReleaseError
    from pretrain.release.format import check_sums, sha256_file

    folder = tmp_path / "rel"
    shutil.copytree(FIXTURE, folder)
    (folder / "sub").mkdir()
    for target in (tmp_path / "outside.txt", folder / "sub" / "inner.txt"):
        target.write_text("not part of the release\n")
    name = entry.format(abs=tmp_path / "outside.txt")
    digest = sha256_file(tmp_path / "outside.txt")
    with open(folder / "SHA256SUMS", "a") as f:
        f.write(f"{digest}  {name}\n")
    with pytest.raises(ReleaseError, match="is not a file of the release folder"):
        check_sums(folder)
