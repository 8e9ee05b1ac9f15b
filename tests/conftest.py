"""Shared fixtures: tiny real raw data written by our generator, one local Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs, shared by every test of the session (startup costs ~4 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def raw_root(tmp_path_factory) -> Path:
    """Raw inputs in three formats and two fidelities, EMT-labelled (built once)."""
    from tests.synthetic import labelled_frames, with_calculator, write_frames

    root = tmp_path_factory.mktemp("raw")
    frames = labelled_frames(60, seed=1, method="emt", clusters=0.2, max_atoms=32)
    for k in range(3):
        write_frames(root / "pbe" / f"part{k}.extxyz", frames[k * 20:(k + 1) * 20])
    write_frames(root / "asap" / "set.db", with_calculator(labelled_frames(25, 2, "emt-asap", max_atoms=32)))
    write_frames(root / "lmdb" / "set.aselmdb", with_calculator(labelled_frames(25, 3, "emt", max_atoms=32)))
    return root


def write_recipe(path: Path, root: Path, shards: int = 4, **extra) -> Path:
    """The three-format recipe over ``raw_root`` (sources' paths relative to ``root``)."""
    recipe = {
        "root": str(root),
        "sources": [
            {"path": "pbe/*.extxyz", "dataset": "alloys", "fidelity": "EMT", "energy_key": "REF_energy",
             "forces_key": "REF_forces", "stress_key": "REF_stress"},
            {"path": "asap/set.db", "dataset": "alloys", "fidelity": "EMT-asap"},
            {"path": "lmdb/*.aselmdb", "dataset": "more", "fidelity": "EMT"},
        ],
        "shards": shards,
        "validation": {"max_atoms": 500, "min_distance": 0.5},
        **extra,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="session")
def built(ray_local, raw_root, tmp_path_factory):
    """(recipe, folder, manifest) of the three-format recipe built once with 2 workers."""
    from data_pipeline.build import build
    from data_pipeline.build.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("built")
    recipe = load_recipe(write_recipe(tmp / "recipe.yaml", raw_root))
    out = tmp / "out"
    manifest = build(recipe, out, workers=2, progress=False)
    return recipe, out, manifest
