"""What the release tests share (package scope: built once for every module here): the
session's shards, the same raw data built with its fidelities in reverse order, a tiny
ZeRO-1 run with EMA, MLflow and held-out data, and its release."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_recipe
from tests.distributed import run_distributed
from tests.pretrain.test_train import TINY_MODEL, _train, write_config


@pytest.fixture(scope="package")
def folder(built) -> Path:
    return built[1]


@pytest.fixture(scope="package")
def reversed_folder(ray_local, raw_root, tmp_path_factory) -> Path:
    """The session's raw data built with its sources (so its fidelities) in reverse order."""
    import yaml

    from data_pipeline.build import build
    from data_pipeline.build.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("reversed")
    path = write_recipe(tmp / "recipe.yaml", raw_root, shards=3)
    recipe = yaml.safe_load(path.read_text())
    first, second, third = recipe["sources"]  # EMT, EMT-asap, EMT
    recipe["sources"] = [second, first, third]
    path.write_text(yaml.safe_dump(recipe))
    build(load_recipe(path), tmp / "out", workers=2, progress=False)
    return tmp / "out"


@pytest.fixture(scope="package")
def run(folder, tmp_path_factory) -> Path:
    """A tiny ZeRO-1 run with EMA, the ZBL prior, MLflow on (SQLite) and held-out eval data."""
    tmp = tmp_path_factory.mktemp("run")
    cfg = write_config(tmp / "run.yaml", folder, tmp / "run", steps=6, eval={"folder": str(folder)},
                       model=dict(TINY_MODEL, zbl=True), tracking={"enabled": True, "experiment": "release-test"})
    run_distributed(_train, 1, str(cfg), [], timeout=300)
    return tmp / "run"


@pytest.fixture(scope="package")
def release(run, tmp_path_factory) -> Path:
    from pretrain.release.create import create

    return create(run, tmp_path_factory.mktemp("rel") / "tiny", name="tiny-test", progress=False)
