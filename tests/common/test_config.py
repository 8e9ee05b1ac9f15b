"""Typed config: unknown keys and bad values fail naming the key; overrides apply."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import ConfigError, apply_overrides, from_dict, load_config, save_config
from data_pipeline.build.recipe import Recipe, load_recipe

SOURCE = {"path": "a.xyz", "dataset": "d", "fidelity": "PBE"}


def test_defaults_and_nested_types():
    r = from_dict(Recipe, {"sources": [SOURCE], "validation": {"min_distance": 1}})
    assert r.shards == 8 and r.validation.min_distance == 1.0
    assert isinstance(r.validation.min_distance, float)


@pytest.mark.parametrize("data, words", [
    ({"sources": [SOURCE], "shard": 3}, ["shard", "shards"]),
    ({"sources": [{**SOURCE, "energy_kye": "E"}]}, ["sources[0].energy_kye"]),
    ({"sources": [SOURCE], "shards": "many"}, ["shards", "'many'", "int"]),
    ({"sources": [SOURCE], "shards": 0}, ["shards", "expected >= 1"]),
    ({"sources": [SOURCE], "validation": {"max_force": -1}}, ["validation.max_force", "positive"]),
    ({"sources": [{**SOURCE, "format": "cif"}]}, ["sources[0].format", "'cif'", "'extxyz'"]),
    ({"sources": [{"path": "x", "dataset": "d"}]}, ["sources[0].fidelity", "missing"]),
    ({"sources": []}, ["sources", "no sources"]),
    ({"sources": [SOURCE], "shards": True}, ["shards", "True"]),
])
def test_bad_config_names_key_and_value(data, words):
    with pytest.raises(ConfigError) as err:
        from_dict(Recipe, data)
    for w in words:
        assert w in str(err.value)


def test_overrides_dotted_and_indexed():
    data = {"sources": [dict(SOURCE)], "validation": {}}
    apply_overrides(data, ["shards=16", "validation.max_force=null", "sources.0.fidelity=r2SCAN"])
    r = from_dict(Recipe, data)
    assert r.shards == 16 and r.validation.max_force is None and r.sources[0].fidelity == "r2SCAN"
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(data, ["sources.5.fidelity=x"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(data, ["shards"])


def test_load_names_file_and_round_trips(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("sources:\n  - {path: a.xyz, dataset: d, fidelity: PBE}\nshardz: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(Recipe, path)
    assert str(path) in str(err.value) and "shardz" in str(err.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Recipe, tmp_path / "missing.yaml")
    path.write_text("sources:\n  - {path: a.xyz, dataset: d, fidelity: PBE}\n")
    r = load_recipe(path, ["shards=3"])
    assert r.root == str(tmp_path)
    save_config(r, tmp_path / "resolved.yaml")
    again = load_config(Recipe, tmp_path / "resolved.yaml")
    assert again == r


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """``3e-4`` reads as a float in files and overrides (YAML 1.1 would give a string)."""
    from pretrain.config import TrainConfig

    path = tmp_path / "t.yaml"
    path.write_text("data: {folder: shards}\noptim: {lr: 3e-4, weight_decay: 1E-2}\n")
    with pytest.raises(ConfigError, match="model: required key is missing"):
        load_config(TrainConfig, path)
    path.write_text("data: {folder: shards}\nmodel: {family: mace}\noptim: {lr: 3e-4, weight_decay: 1E-2}\n")
    cfg = load_config(TrainConfig, path, ["optim.min_lr_ratio=5e-2"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.min_lr_ratio) == (3e-4, 1e-2, 5e-2)
    data = apply_overrides({}, ["a=1e", "b=10", "c=.5", "d=-1e3", "e=v1e3"])
    assert data == {"a": "1e", "b": 10, "c": 0.5, "d": -1000.0, "e": "v1e3"}


@dataclasses.dataclass
class Item:
    key: str
    size: int = 1


@dataclasses.dataclass
class Holder:
    items: list[str | Item] = dataclasses.field(default_factory=list)


def test_a_mapping_in_a_union_with_str_is_its_config_class():
    """``list[str | C]`` takes strings and mappings; a bad mapping fails with C's own
    error (the key at fault), not a generic "expected str or a mapping"."""
    h = from_dict(Holder, {"items": ["a", {"key": "b", "size": 2}]})
    assert h.items == ["a", Item("b", 2)]
    with pytest.raises(ConfigError, match=r"items\[1\].size: got 'x', expected int"):
        from_dict(Holder, {"items": ["a", {"key": "b", "size": "x"}]})
    with pytest.raises(ConfigError, match=r"items\[0\]: got 3, expected str or a mapping \(Item\)"):
        from_dict(Holder, {"items": [3]})
