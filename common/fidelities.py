"""A model's fidelity table: which levels of theory it has heads for, by name, in order.

The table is fixed when training starts and travels with every checkpoint (``model.json``)
and release (``config.json``). Shard folders number their fidelities by their own
manifests, so every consumer maps a record's fidelity *name* to the model's head with
:meth:`FidelityTable.index`; a name the model does not have is an error listing the ones
it has, never a fallback to some default head.

Each entry carries the elemental reference energies of that fidelity (added to the head's
output, from the training data's manifest) and the elements its training data covered (an
element outside them is an extrapolation the calculator warns about).
"""

from __future__ import annotations

import dataclasses

from common.errors import UserError


class FidelityError(UserError, KeyError, ValueError):
    """A fidelity name a model does not have (the message lists the ones it has); a
    KeyError for lookups by name, a ValueError for data that does not fit a model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass
class FidelityTable:
    """Fidelity names in head order, with references and covered elements per name."""

    names: list[str]
    #: ``{fidelity: {element symbol: eV}}`` elemental reference energies
    references: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    #: ``{fidelity: [element symbols]}`` present in that fidelity's training data
    elements: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names):
            raise FidelityError(f"fidelity table has repeated names: {self.names}")

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str, where: str = "") -> int:
        """The head index of fidelity ``name``; unknown names raise :class:`FidelityError`."""
        try:
            return self.names.index(name)
        except ValueError:
            at = f"{where}: " if where else ""
            raise FidelityError(f"{at}fidelity {name!r} is not one this model has; it has "
                                f"{self.names}") from None

    def indices(self, names: list[str], where: str) -> list[int]:
        """The head index of each of ``names`` (a shard folder's fidelities, in its
        manifest's order), matched by name; every name this table lacks is listed in one
        :class:`FidelityError` with ``where`` and the table's names."""
        missing = [f for f in names if f not in self.names]
        if missing:
            raise FidelityError(f"{where}: fidelit{'y' if len(missing) == 1 else 'ies'} "
                                f"{', '.join(map(repr, missing))} not in the model, which has "
                                f"{self.names}; evaluate or train only data of those "
                                "fidelities (or fine-tune with init_from to add a head)")
        return [self.index(f) for f in names]

    @classmethod
    def from_manifest(cls, manifest: dict) -> "FidelityTable":
        """The table of a shard folder: its fidelities in manifest order."""
        names = list(manifest["fidelities"])
        refs = {f: dict(r["energies"]) for f, r in manifest.get("element_references", {}).items()}
        elements: dict[str, set] = {f: set() for f in names}
        for g in manifest.get("groups", []):
            elements.setdefault(g["fidelity"], set()).update(g.get("elements", {}))
        return cls(names, {f: refs.get(f, {}) for f in names},
                   {f: sorted(elements[f], key=_z) for f in names})

    def extended(self, other: "FidelityTable") -> tuple["FidelityTable", list[str]]:
        """This table plus ``other``'s fidelities it lacks (appended, new heads); the
        references of shared names stay this table's (the heads were trained on them),
        covered elements are merged. Returns ``(table, new names)``."""
        new = [n for n in other.names if n not in self.names]
        names = self.names + new
        refs = {n: dict(self.references.get(n) or other.references.get(n, {})) for n in names}
        elements = {n: sorted(set(self.elements.get(n, [])) | set(other.elements.get(n, [])), key=_z)
                    for n in names}
        return FidelityTable(names, refs, elements), new

    def to_json(self) -> list[dict]:
        """``[{"name", "index", "element_references", "elements"}, ...]`` in head order."""
        return [{"name": n, "index": i, "element_references": self.references.get(n, {}),
                 "elements": self.elements.get(n, [])} for i, n in enumerate(self.names)]

    @classmethod
    def from_json(cls, entries: list[dict], where: str = "") -> "FidelityTable":
        """Inverse of :meth:`to_json`; checks the indices are 0..F-1 in order."""
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e for e in entries):
            raise FidelityError(f"{where}: 'fidelities' must be a list of {{name, index, ...}}")
        if [e.get("index", i) for i, e in enumerate(entries)] != list(range(len(entries))):
            raise FidelityError(f"{where}: fidelity indices must be 0..{len(entries) - 1} in order")
        names = [e["name"] for e in entries]
        return cls(names, {e["name"]: dict(e.get("element_references", {})) for e in entries},
                   {e["name"]: list(e.get("elements", [])) for e in entries})


def _z(symbol: str) -> int:
    from ase.data import atomic_numbers  # noqa: PLC0415

    return atomic_numbers.get(symbol, 0)
