"""Shared fixtures: tiny real raw data written by our generator, one local Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
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


def coverage_frames() -> dict[str, list]:
    """Per input file, EMT-labelled frames with the cases coverage statistics must get
    right: a one-atom cell (its nearest neighbour is its own image), a cell over the
    screen's 128 atoms, a slab, a lone free atom, one structure with a rare element (O),
    and an energy outlier the reference audit drops."""
    from ase import Atoms
    from ase.build import bulk, fcc111

    from tests.synthetic import label, labelled_frames

    special = [bulk("Cu", "fcc", a=3.61), bulk("Cu", "fcc", a=3.61, cubic=True).repeat((3, 3, 4)),
               fcc111("Cu", size=(2, 2, 3), vacuum=5.0), Atoms("Au", positions=[[0.0, 0.0, 0.0]]),
               bulk("Cu", "fcc", a=3.8, cubic=True)]
    special[1].rattle(0.05, seed=1)
    special[4].symbols[0] = "O"
    for atoms in special:
        labels = label(atoms, "emt")
        atoms.info["REF_energy"] = labels["energy"]
        atoms.arrays["REF_forces"] = np.asarray(labels["forces"])
        if "stress" in labels:
            atoms.info["REF_stress"] = np.asarray(labels["stress"])
    frames = labelled_frames(30, seed=5, method="emt", clusters=0.3, max_atoms=24)
    outlier = frames[0].copy()
    outlier.info["REF_energy"] = 1e7  # a corrupted total energy
    return {"a.extxyz": frames[:10] + special + [outlier] + frames[10:],
            "b.extxyz": labelled_frames(8, seed=6, method="emt", clusters=0.3, max_atoms=24)}


def coverage_recipe(root: Path, shards: int = 2):
    """Fidelity ``EMT`` from ``a.extxyz``, ``EMT-b`` from ``b.extxyz``."""
    from data_pipeline.build.recipe import Recipe, SourceConfig

    keys = {"energy_key": "REF_energy", "forces_key": "REF_forces", "stress_key": "REF_stress"}
    return Recipe(sources=[SourceConfig(path="a.extxyz", dataset="cov", fidelity="EMT", **keys),
                           SourceConfig(path="b.extxyz", dataset="cov", fidelity="EMT-b", **keys)],
                  shards=shards, root=str(root))


@pytest.fixture(scope="session")
def coverage_built(ray_local, tmp_path_factory):
    """(input root, folder, manifest) of :func:`coverage_frames` built with 2 workers."""
    from data_pipeline.build import build
    from tests.synthetic import write_frames

    root = tmp_path_factory.mktemp("coverage")
    for name, frames in coverage_frames().items():
        write_frames(root / "raw" / name, frames)
    manifest = build(coverage_recipe(root / "raw"), root / "out", workers=2, progress=False)
    return root / "raw", root / "out", manifest
