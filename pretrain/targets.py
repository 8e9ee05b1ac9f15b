"""Extra targets against the training data: which fidelities carry each, in what layout.

A training config names its extra targets by record extras name (``model.targets``,
``models/properties.py``); the data build records, per fidelity, which extras its records
carry and their layout (the manifest's ``extras`` section, ``data_pipeline/build``).
:func:`resolve_targets` checks one against the other before a weight is built, and fixes
each target's fidelities (those of the data that carry it, where the config names none),
so the model record and the release say exactly where each head was trained.
"""

from __future__ import annotations

import dataclasses

from common.config import ConfigError
from models.properties import LAYOUT, TargetConfig


def data_extras(manifest: dict) -> dict[str, dict[str, dict]]:
    """``{fidelity: {name: stats}}`` of the extras the folder's records carry (records > 0)."""
    return {f: {n: s for n, s in names.items() if s.get("records", 0) > 0}
            for f, names in (manifest.get("extras") or {}).items()}


def resolve_targets(targets: list[TargetConfig], manifest: dict, folder: str,
                    fidelities: list[str] | None = None) -> list[TargetConfig]:
    """``targets`` with their fidelities fixed from the training data's manifest.

    Raises :class:`ConfigError` for a target no training record carries, one declared at
    a fidelity whose records lack it or not in the model's ``fidelities``, and one whose
    data layout (per atom or per structure, trailing shape) is not its kind's."""
    have = data_extras(manifest)
    out = []
    for t in targets:
        carrying = sorted(f for f, names in have.items() if t.name in names)
        if not carrying:
            known = sorted({n for names in have.values() for n in names})
            raise ConfigError(f"model.targets: no training record of {folder} has the extra {t.name!r} "
                              f"(its records carry {known or 'no extras'}); map it in the data recipe's "
                              "extras and rebuild, or remove the target")
        chosen = list(t.fidelities) or carrying
        for f in chosen:
            if fidelities is not None and f not in fidelities:
                raise ConfigError(f"model.targets.{t.name}.fidelities: {f!r} is not a fidelity of the "
                                  f"model ({fidelities})")
            if f not in carrying:
                raise ConfigError(f"model.targets.{t.name}: no record of {folder} at fidelity {f!r} carries "
                                  f"it (those that do: {carrying})")
            stats = have[f][t.name]
            per, shape = LAYOUT[t.kind]
            if stats.get("per", per) != per or list(stats.get("shape", shape)) != shape:
                raise ConfigError(f"model.targets.{t.name}: kind {t.kind} needs a per-{per} label of "
                                  f"shape {shape}, but {folder} has it per {stats.get('per')} with shape "
                                  f"{stats.get('shape')} at {f}; pick the kind that fits")
        out.append(dataclasses.replace(t, fidelities=chosen))
    return out


def batch_extras(targets: list[TargetConfig]) -> dict[str, tuple[str, list[int]]]:
    """``{name: (per, shape)}``: the record extras a batch carries for ``targets``."""
    return {t.name: LAYOUT[t.kind] for t in targets}
