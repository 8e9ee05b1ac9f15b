"""The robustness report: the same trained weights fail it without the ZBL prior (the worst
pair named) and pass it with the prior; ``verify`` refuses a fragile release unless
``--allow-fragile``; ``create`` and ``eval --robustness`` write it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pretrain.release import robustness as R

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def _with_prior(release: Path, folder: Path, zbl: bool) -> Path:
    """A copy of ``release`` whose model config turns the prior on or off (same weights:
    the prior has none)."""
    from pretrain.release.format import write_sums

    shutil.copytree(release, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model"]["zbl"] = zbl
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "SHA256SUMS").unlink()
    write_sums(folder)
    return folder


@pytest.fixture(scope="module")
def fragile(release, tmp_path_factory) -> Path:
    return _with_prior(release, tmp_path_factory.mktemp("fragile") / "rel", zbl=False)


def test_same_weights_fail_without_the_prior_and_pass_with_it(release, fragile):
    from pretrain.release.loader import load_release

    without, _ = R.robustness_report(load_release(fragile))
    assert not without["passed"]
    dimers = without["fidelities"]["EMT"]["dimers"]
    assert dimers["failures"] > 0 and dimers["worst"].split(":")[0].count("-") == 1, dimers  # "Pd-Pd: ..."
    with_prior, curves = R.robustness_report(load_release(release))
    assert with_prior["passed"], R.lines(with_prior)
    checks = with_prior["fidelities"]["EMT"]
    assert checks["dimers"]["cases"] == 28 and checks["compression"]["cases"] == 7 and checks["hot_md"]["cases"] == 1
    assert len(curves["EMT"]["dimers"]["curves"]) == 28


def test_verify_refuses_a_fragile_release_unless_allowed(fragile, capsys):
    from launch.cli import main

    assert main(["release", "verify", str(fragile)]) == 1
    err = capsys.readouterr().err
    assert "the release is fragile" in err and "model.zbl=true" in err and "--allow-fragile" in err
    assert main(["release", "verify", str(fragile), "--allow-fragile"]) == 0
    assert "robustness: EMT dimers" in capsys.readouterr().out


def test_create_and_eval_write_the_report(release, folder, tmp_path):
    from launch.cli import main

    report = json.loads((release / "robustness.json").read_text())
    assert report["passed"] and (release / "robustness.png").stat().st_size > 20_000
    card = (release / "MODEL_CARD.md").read_text()
    assert "## Robustness" in card and "The release **passes**" in card and "| EMT | dimers | 28/28 pairs |" in card
    assert main(["eval", str(release), str(folder), "--out", str(tmp_path / "e"), "--robustness"]) == 0
    assert json.loads((tmp_path / "e" / "robustness.json").read_text())["passed"]
    assert (tmp_path / "e" / "robustness.png").is_file()


def test_a_curve_that_falls_inside_its_minimum_is_named():
    x = np.array([2.0, 1.5, 1.0, 0.5, 0.25])
    assert R._inner_problem(np.array([0.0, -1.0, 2.0, 10.0, 50.0]), x, "A", 0.6) is None
    severity, words = R._inner_problem(np.array([0.0, -1.0, 2.0, 0.5, 50.0]), x, "A", 0.6)
    assert severity == pytest.approx(1.5) and "falls by 1.5 eV from 1 to 0.5 A inside its minimum at 1.5 A" in words
    assert R._inner_problem(np.array([0.0, np.nan, 1.0, 2.0, 3.0]), x, "A", 0.6)[0] == np.inf
    # a wiggle at the top of a wall of many eV gives back too little to trap anything
    x6 = np.array([2.0, 1.5, 1.0, 0.75, 0.5, 0.25])
    assert R._inner_problem(np.array([0.0, -1.0, 2.0, 20.0, 19.9, 50.0]), x6, "A", 0.6) is None
    assert R._inner_problem(np.array([0.0, -1.0, 2.0, 20.0, 15.0, 50.0]), x6, "A", 0.6) is not None


def test_pairs_are_all_up_to_the_bound_then_sampled():
    assert len(R.pairs_of(["H", "C", "O"])) == 6
    many = [f"E{k}" for k in range(20)]
    pairs = R.pairs_of(many, seed=1)
    assert len(pairs) == R.MAX_PAIRS and all((e, e) in pairs for e in many)
    assert pairs == R.pairs_of(many, seed=1) and pairs != R.pairs_of(many, seed=2)


def test_structures_are_made_of_covered_elements_only():
    box = R.molecular_box(["H", "C", "N", "O"])
    assert set(box.get_chemical_symbols()) == {"H", "C", "N", "O"} and box.pbc.all()
    assert R.molecular_box(["Cu", "Ni"]) is None and R.metals_of(["H", "Cu", "Ne", "Fe", "C"]) == ["Cu", "Fe"]
