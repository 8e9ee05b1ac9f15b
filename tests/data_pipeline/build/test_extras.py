"""Declared extras (charges, dipoles, magnetic moments): recipe syntax, checks, unit
conversion, the records the real builder writes and the manifest's ``extras`` section."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from common.config import ConfigError, to_dict
from data_pipeline.build import build
from data_pipeline.build.recipe import ExtraConfig, load_recipe
from data_pipeline.manifest import extras_table
from data_pipeline.stream import ShardedDataset

DEBYE = 0.2081943  # e*A
EXTRAS = ["magmoms", {"key": "gfn2_charges", "name": "charges"},
          {"key": "dft_dipole", "name": "dipole", "unit": "debye"}]


def _recipe(tmp_path, extras=EXTRAS, **source) -> "Path":
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"shards": 2, "sources": [
        {"path": "raw/*.extxyz", "dataset": "d", "fidelity": "X", "energy_key": "REF_energy",
         "forces_key": "REF_forces", "extras": extras, **source}]}))
    return path


@pytest.fixture
def extras_inputs(tmp_path):
    """Two files of small EMT cells with charges, magnetic moments and a dipole in debye;
    frame 2 of the first file has no dipole, frame 4 a charges vector one value too long."""
    from tests.synthetic import labelled_frames, write_frames

    rng = np.random.default_rng(7)
    frames = labelled_frames(12, seed=7, method="emt", max_atoms=6)
    for i, atoms in enumerate(frames):
        n = len(atoms)
        if i == 4:  # as a per-structure vector: ase.io.write refuses a short per-atom column
            atoms.info["gfn2_charges"] = rng.normal(0, 0.3, n + 1)
        else:
            atoms.arrays["gfn2_charges"] = rng.normal(0, 0.3, n)
        atoms.arrays["magmoms"] = rng.uniform(0, 2, n)
        if i != 2:
            atoms.info["dft_dipole"] = rng.normal(0, 2, 3)
    write_frames(tmp_path / "raw" / "a.extxyz", frames[:6])
    write_frames(tmp_path / "raw" / "b.extxyz", frames[6:])
    return tmp_path


def _file_frames(root):
    import ase.io

    return {f"raw/{name}.extxyz#{i}": a for name in "ab"
            for i, a in enumerate(ase.io.read(root / "raw" / f"{name}.extxyz", ":"))}


def test_extras_are_checked_converted_and_summarised(ray_local, extras_inputs):
    root = extras_inputs
    recipe = load_recipe(_recipe(root))
    m2 = build(recipe, root / "out2", workers=2, progress=False)
    m1 = build(recipe, root / "out1", workers=1, progress=False)
    assert m1 == m2  # the extras section included: merged in unit order, not worker order

    # the short charges array: rejected, naming the key and both shapes; the rest is kept
    assert m2["records"] == 11 and m2["rejects"]["by_reason"] == {"bad_shape": 1}
    (reject,) = [json.loads(line) for line in (root / "out2" / "rejects.jsonl").read_text().splitlines()]
    n4 = len(_file_frames(root)["raw/a.extxyz#4"])
    assert (reject["file"], reject["index"], reject["reason"]) == ("raw/a.extxyz", 4, "bad_shape")
    assert "'gfn2_charges'" in reject["detail"] and f"expected ({n4},)" in reject["detail"]

    # records carry the renamed charges, the plain-string magmoms and the dipole in e*A
    frames, ds = _file_frames(root), ShardedDataset(root / "out2")
    values = {"charges": [], "magmoms": [], "dipole": []}
    for i in range(len(ds)):
        rec = ds[i]
        atoms = frames[rec["source_id"]]
        calc = atoms.calc.results if atoms.calc is not None else {}
        np.testing.assert_array_equal(rec["extras"]["charges"], atoms.arrays["gfn2_charges"])
        magmoms = calc.get("magmoms", atoms.arrays.get("magmoms"))  # ase.io moves it to the results
        np.testing.assert_array_equal(rec["extras"]["magmoms"], magmoms)
        if rec["source_id"] == "raw/a.extxyz#2":
            assert "dipole" not in rec["extras"]
        else:
            np.testing.assert_allclose(rec["extras"]["dipole"], atoms.info["dft_dipole"] * DEBYE, rtol=1e-6)
        for name, v in rec["extras"].items():
            assert v.dtype == np.float64
            values[name].append(v.ravel())

    # the manifest's extras section against numpy over the records' values
    section = m2["extras"]["X"]
    assert list(section) == ["magmoms", "charges", "dipole"]
    assert section["dipole"]["records"] == 10 and section["dipole"]["absent"] == 1
    assert section["charges"]["records"] == section["magmoms"]["records"] == 11
    layout = {name: (e["per"], e["shape"], e["unit"]) for name, e in section.items()}
    assert layout == {"magmoms": ("atom", [], "muB"), "charges": ("atom", [], "e"),
                      "dipole": ("structure", [3], "e*A")}
    for name, parts in values.items():
        x = np.concatenate(parts)
        figures = {k: section[name][k] for k in ("mean", "rms", "std")}
        # merged per unit with Chan's update: equal to numpy up to the order of the sums
        assert figures == pytest.approx({"mean": x.mean(), "rms": np.sqrt(np.mean(x * x)), "std": x.std()},
                                        rel=1e-12, abs=1e-15), name
    assert m2["label_units"][0]["extras"]["dipole"] == {"key": "dft_dipole", "unit": "debye",
                                                        "factor": pytest.approx(DEBYE, rel=1e-6)}

    # data inspect's table: one row per extra, its columns as in the manifest
    rows = {line.split()[0]: line.split() for line in extras_table(m2["extras"])[3:]}
    assert rows["dipole"][:6] == ["dipole", "structure", "[3]", "e*A", "10", "1"]

    # the resolved recipe loads back to the same recipe
    again = load_recipe(root / "out2" / "recipe.resolved.yaml")
    assert to_dict(again.sources) == to_dict(recipe.sources)


def test_non_finite_extra_is_rejected(ray_local, tmp_path):
    from tests.synthetic import labelled_frames, write_frames

    frames = labelled_frames(3, seed=3, method="emt", max_atoms=6)
    for atoms in frames:
        atoms.arrays["gfn2_charges"] = np.zeros(len(atoms))
    frames[1].arrays["gfn2_charges"][0] = np.nan
    write_frames(tmp_path / "raw" / "c.extxyz", frames)
    m = build(load_recipe(_recipe(tmp_path, extras=[{"key": "gfn2_charges", "name": "charges"}])),
              tmp_path / "out", workers=1, progress=False)
    assert m["records"] == 2 and m["rejects"]["by_reason"] == {"non_finite_extras": 1}
    assert m["extras"]["X"]["charges"]["records"] == 2


@pytest.mark.parametrize("extras, words", [
    ([{"key": "gfn2_charges", "name": "charges", "unit": "debye"}],
     ["sources[0].extras[0].unit", "'gfn2_charges'", "'debye'", "one of e"]),
    (["charges", {"key": "q", "unit": "debye"}],
     ["sources[0].extras[1].unit", "'q'", "not a known quantity", "dipole: e*A, debye, e*bohr, au"]),
    (["charges", {"key": "q", "name": "charges"}], ["sources[0].extras[1].name", "'charges'", "extras[0]"]),
    ([{"key": "q", "name": "dipole", "per": "atom"}], ["sources[0].extras[0].per", "per structure"]),
    ([{"key": "q", "name": "charges", "shape": [3]}], ["sources[0].extras[0].shape", "shape []"]),
    ([{"key": "q", "nmae": "charges"}], ["sources[0].extras[0].nmae", "ExtraConfig accepts"]),
    (["a.b"], ["sources[0].extras[0].name", "'a.b'", "give the extra a name"]),
])
def test_bad_extras_fail_at_recipe_load_naming_source_and_key(tmp_path, extras, words):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "x.extxyz").write_text("")
    with pytest.raises(ConfigError) as err:
        load_recipe(_recipe(tmp_path, extras=extras))
    for w in words:
        assert w in str(err.value)


def test_layout_of_declarations():
    auto = ExtraConfig(key="v")
    assert auto.layout_of((4,), 4) == ("atom", ()) and auto.layout_of((4, 3), 4) == ("atom", (3,))
    assert auto.layout_of((3,), 4) == ("structure", (3,)) and auto.layout_of((), 4) == ("structure", ())
    polar = ExtraConfig(key="p", per="structure", shape=[3, 3])
    assert polar.layout_of((3, 3), 3) == ("structure", (3, 3)) and polar.layout_of((9,), 3) is None
    vec = ExtraConfig(key="v", shape=[3])  # auto with a shape: whichever it fits
    assert vec.layout_of((3, 3), 3) == ("atom", (3,)) and vec.layout_of((3,), 3) == ("structure", (3,))
    assert vec.layout_of((3, 2), 3) is None and vec.expected(3) == "(3, 3) or (3,)"
    charges = ExtraConfig(key="gfn2_charges", name="charges")
    assert (charges.per, charges.shape, charges.unit) == ("atom", [], "e")
    assert charges.layout_of((5,), 4) is None and charges.expected(4) == "(4,)"
