"""``eval`` of a release: fidelities matched by name (a folder listing them in another order
gives the same numbers, an unknown one is an error), 2 ranks equal 1, errors by stratum
included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_recipe
from tests.distributed import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


def test_eval_folder_in_reverse_order_gives_same_metrics(release, folder, reversed_folder):
    from pretrain.evaluate import evaluate
    from pretrain.release.loader import load_model

    manifest = json.loads((reversed_folder / "manifest.json").read_text())
    assert manifest["fidelities"] == ["EMT", "EMT-asap"][::-1]
    model = load_model(release).potential
    a, b = evaluate(model, folder, progress=False), evaluate(model, reversed_folder, progress=False)
    assert a["fidelities"].keys() == b["fidelities"].keys()
    for fid, m in a["fidelities"].items():
        for key, value in m.items():
            assert b["fidelities"][fid][key] == pytest.approx(value, rel=1e-6), (fid, key)


def test_unknown_fidelity_in_data_is_an_error(release, tmp_path, ray_local, raw_root, capsys):
    import yaml

    from data_pipeline.build import build
    from data_pipeline.build.recipe import load_recipe
    from launch.cli import main

    path = write_recipe(tmp_path / "recipe.yaml", raw_root, shards=1)
    recipe = yaml.safe_load(path.read_text())
    recipe["sources"] = [dict(recipe["sources"][1], fidelity="r2SCAN")]
    path.write_text(yaml.safe_dump(recipe))
    build(load_recipe(path), tmp_path / "out", workers=1, progress=False)
    assert main(["eval", str(release), str(tmp_path / "out"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "'r2SCAN' not in the model, which has ['EMT', 'EMT-asap']" in err


def _eval_rank(rank, world, model, data, out, *extra):
    from launch.cli import main

    assert main(["eval", model, data, "--out", out, *extra]) == 0
    return json.loads(Path(out, "metrics.json").read_text()) if rank == 0 else None


def _numbers(tree, path: str = "") -> dict:
    """Every number of a nested metrics tree by its path (bin edges included)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _numbers(sub, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _numbers(sub, f"{path}/{i}").items()}
    return {path: tree} if tree is not None else {}


def test_eval_cli_on_two_ranks_equals_one(release, folder, tmp_path):
    extra = ("--train-data", str(folder))
    (one,) = run_distributed(_eval_rank, 1, str(release), str(folder), str(tmp_path / "one"), *extra)
    two, _ = run_distributed(_eval_rank, 2, str(release), str(folder), str(tmp_path / "two"), *extra)
    assert one["leakage"] == two["leakage"]  # each rank scans half the training shards
    for fid, m in one["fidelities"].items():
        for key, value in m.items():
            assert two["fidelities"][fid][key] == pytest.approx(value, rel=1e-9), (fid, key)
    # strata: counts and bin edges exactly; errors to 1e-6, since the float32 model's forces
    # shift ~1e-8 with how records pack into batches, and a stratum averages over few atoms
    a, b = _numbers(one["strata"]), _numbers(two["strata"])
    assert {k: v for k, v in b.items() if isinstance(v, int)} == {k: v for k, v in a.items() if isinstance(v, int)}
    assert b == pytest.approx(a, rel=1e-6)
    assert sum(r["atoms"] for r in one["strata"]["EMT"]["force_bins"]) > 0
    assert (tmp_path / "one" / "parity-EMT.png").stat().st_size > 1000


def test_eval_counts_training_structures_and_excludes_them_on_request(release, folder, reversed_folder,
                                                                      tmp_path, capsys):
    """The release was trained on ``folder``: evaluated on it, every record is a leak."""
    from launch.cli import main

    assert main(["eval", str(release), str(folder), "--train-data", str(folder), "--out", str(tmp_path / "a")]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    n = m["data"]["records"]
    assert m["leakage"]["leaked_same_fidelity"] == n and m["data"]["excluded"] == 0
    assert "train/test overlap" in capsys.readouterr().out
    assert main(["eval", str(release), str(folder), "--train-data", str(folder), "--exclude-leaked",
                 "--out", str(tmp_path / "b")]) == 0
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["data"]["excluded"] == n and m["fidelities"] == {} and m["leakage"]["excluded"]
    # the same structures built in another order are another content hash: not the training data
    assert main(["eval", str(release), str(folder), "--train-data", str(reversed_folder)]) == 2
    assert "is not the training data" in capsys.readouterr().err
