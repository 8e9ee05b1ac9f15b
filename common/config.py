"""Typed configuration: dataclasses loaded from YAML, with dotted command-line overrides.

This is the project's one config mechanism and its one loader (:func:`load_config`), on
the ground floor (``common/``) so that data recipes, model configs, training configs and
scaling studies all share it.

A config class is a plain ``@dataclass`` whose fields carry type hints (``int``, ``float``,
``str``, ``bool``, ``X | None``, ``list[X]``, ``dict[str, X]``, ``Literal[...]``, a
nested config dataclass, or a union of one with plain types such as ``str | C``: a
mapping is read as ``C``) and, optionally, a ``validate()`` method that raises
:class:`ConfigError` for values that are well-typed but wrong. Every error names the
dotted key, the value found and what was expected, and is raised before any work starts.

Example::

    recipe = load_config(Recipe, "recipe.yaml", overrides=["shards=16"])
    save_config(recipe, out_dir / "recipe.resolved.yaml")
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from common.atomic import write_atomic
from common.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and what to do."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(item)}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against type ``tp`` and return it converted (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        section = _config_class(tp)
        if isinstance(value, dict) and section is not None:
            # a mapping can only be the union's config class: its own error (an unknown
            # key, a bad value) says more than "expected str or a mapping"
            return from_dict(section, value, prefix=key)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}, expected a mapping")
        return {str(k): _convert(val_tp, v, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key} has unsupported type {tp!r}")
    raise ConfigError(f"{key}: got {value!r}, expected {_type_name(tp)}")


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Build config ``cls`` from a mapping, rejecting unknown keys and ill-typed values."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: got {data!r}, expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        dotted = ", ".join(f"{prefix}.{k}" if prefix else str(k) for k in unknown)
        raise ConfigError(
            f"unknown key(s) {dotted}; {cls.__name__} accepts: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required key is missing ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as err:
            raise ConfigError(f"{prefix}.{err}" if prefix else str(err)) from None
    return obj


def to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (what YAML stores)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, list):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``3e-4`` and ``1E5`` are numbers (YAML 1.1,
    which PyYAML follows, wants a dot and a signed exponent and reads them as strings)."""


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str):
    """``text`` as YAML, safely (no Python objects), with YAML 1.2 floats (``3e-4``)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (``3e-4``, ``[1,2]``, ``null``).

    A list element is addressed by its index: ``sources.0.fidelity=PBE``.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        dotted, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from None
        node: Any = data
        parts = dotted.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            here = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {dotted}: {here} is not an index of the list")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: {here} is inside a value, not a mapping")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) plus overrides.

    A section whose field is a nested config may be given as the path of a YAML file
    instead of a mapping (``model: configs/model/mace-s.yaml``): it is read relative to
    the config file, then to the working directory, before the overrides, so dotted
    overrides still reach its keys (``model.layers=3``); an override that sets a whole
    section to a file (``model=mace-m.yaml``) is read after them.
    """
    data = load_yaml(path) if path is not None else {}
    base = Path(path).parent if path is not None else None
    data = _include_sections(cls, data, base, str(path) if path is not None else "config")
    data = apply_overrides(data, list(overrides))
    data = _include_sections(cls, data, None, "override")
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        src = f"{path}: " if path is not None else ""
        raise ConfigError(f"{src}{err}") from None


def _include_sections(cls: type, data: Any, base: Path | None, where: str, prefix: str = "") -> Any:
    """``data`` with every nested-config field given as a file name replaced by that file."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        section = _config_class(hints[f.name])
        if section is None or str in typing.get_args(hints[f.name]):  # `str | C`: a string is a str
            continue
        key = f"{prefix}{f.name}"
        value = data[f.name]
        if isinstance(value, str):
            candidates = ([base / value] if base is not None else []) + [Path(value)]
            found = next((c for c in candidates if c.is_file()), None)
            if found is None:
                raise ConfigError(f"{where}: {key}: file {value!r} not found (relative to the config "
                                  "or the working directory); give a mapping or an existing YAML file")
            value = load_yaml(found)
        data[f.name] = _include_sections(section, value, base, where, f"{key}.")
    return data


def _config_class(tp: Any) -> type | None:
    """The config dataclass a field's type names (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), next to the output it produced."""
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


