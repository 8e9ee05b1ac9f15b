"""The data recipe: which raw files become which shards, and the validation limits.

A recipe is YAML (README.md, "Data recipes"); ``paths`` in it are relative to the recipe
file. It is loaded through :mod:`common.config`, so unknown keys and bad values
fail at start-up, and it is saved resolved as ``<out>/recipe.resolved.yaml``.
"""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Literal

from common.config import ConfigError, load_config

SourceFormat = Literal["auto", "extxyz", "ase", "db", "aselmdb"]
EnergyUnit = Literal["eV", "hartree", "kcal/mol", "kJ/mol"]
StressUnit = Literal["eV/A^3", "GPa", "kbar"]
ExtraPer = Literal["auto", "atom", "structure"]


@dataclasses.dataclass
class ExtraConfig:
    """A further target a source keeps (``extras:``): charges, dipoles, magnetic moments, ...

    A plain string in the recipe is ``{key: <it>}``. Construction fills the defaults (the
    name, and for a known quantity of :data:`data_pipeline.build.units.EXTRA_QUANTITIES`
    its ``per``, ``shape`` and canonical ``unit``), so the resolved recipe says what the
    build applied; :meth:`validate` rejects what contradicts them.
    """

    key: str
    """``info`` or ``arrays`` key (or calculator result) in the files."""
    name: str | None = None
    """Name in ``record.extras`` and the manifest; null: ``key``."""
    per: ExtraPer = "auto"
    """``atom``: an array ``[n_atoms, *shape]``; ``structure``: an array ``shape``; ``auto``:
    a known quantity's, else per record from the array (leading dimension n_atoms: atom)."""
    shape: list[int] | None = None
    """Trailing shape (``[]`` scalar, ``[3]`` vector); null: a known quantity's, else not
    checked beyond a per-atom extra's leading dimension."""
    unit: str | None = None
    """Unit as stored in the files, converted once to the canonical one; only for known
    quantities (null there: already canonical; elsewhere: kept as stored)."""

    def __post_init__(self) -> None:
        from data_pipeline.build.units import EXTRA_QUANTITIES  # noqa: PLC0415

        if self.name is None:
            self.name = self.key
        if self.shape is not None:
            self.shape = list(self.shape)
        known = EXTRA_QUANTITIES.get(self.name)
        if known is not None:
            self.per = known.per if self.per == "auto" else self.per
            self.shape = list(known.shape) if self.shape is None else self.shape
            self.unit = known.unit if self.unit is None else self.unit

    def validate(self) -> None:
        """A usable name, a layout that agrees with a known quantity's, an accepted unit."""
        from data_pipeline.build.units import EXTRA_QUANTITIES, extra_factor  # noqa: PLC0415

        if not self.key.strip():
            raise ConfigError("key: must not be empty")
        if not self.name.strip() or "." in self.name or self.name != self.name.strip():
            raise ConfigError(f"name: got {self.name!r} (key {self.key!r}), expected a name without "
                              "dots or surrounding spaces (it becomes the stored array extras.<name>); "
                              "give the extra a name")
        if self.shape is not None and any(d < 0 for d in self.shape):
            raise ConfigError(f"shape: got {self.shape} (key {self.key!r}), expected sizes >= 0")
        known = EXTRA_QUANTITIES.get(self.name)
        if known is not None:
            for field, got, want in (("per", self.per, known.per), ("shape", self.shape, list(known.shape))):
                if got != want:
                    raise ConfigError(f"{field}: got {got} for key {self.key!r}, but {self.name} is a known "
                                      f"quantity, per {known.per} with shape {list(known.shape)}; drop "
                                      f"{field}, or give the extra another name")
        try:
            extra_factor(self.name, self.unit)
        except ValueError as err:
            raise ConfigError(f"unit: key {self.key!r}: {err}") from None

    def layout_of(self, shape: tuple[int, ...], n_atoms: int) -> tuple[str, tuple[int, ...]] | None:
        """``(per, trailing shape)`` of an array of ``shape`` in a structure of ``n_atoms``
        under this declaration, or None when it fits none."""
        want = None if self.shape is None else tuple(self.shape)
        per = self.per
        if per == "auto":
            fits_atom = len(shape) >= 1 and shape[0] == n_atoms
            per = "atom" if fits_atom and (want is None or shape[1:] == want) else "structure"
        if per == "atom":
            ok = len(shape) >= 1 and shape[0] == n_atoms and (want is None or shape[1:] == want)
            return (per, shape[1:]) if ok else None
        return (per, shape) if want is None or shape == want else None

    def expected(self, n_atoms: int) -> str:
        """The shapes :meth:`layout_of` accepts, in words (for a rejection's detail)."""
        atom = f"({n_atoms}, ...)" if self.shape is None else str((n_atoms, *self.shape))
        structure = "any shape" if self.shape is None else str(tuple(self.shape))
        return {"atom": atom, "structure": structure}.get(self.per, f"{atom} or {structure}")


@dataclasses.dataclass
class SourceConfig:
    """One group of raw files sharing a dataset name and a level of theory."""

    path: str
    """File or glob (``**`` allowed), relative to the recipe file."""
    dataset: str
    """Dataset name, e.g. ``mptrj``; with ``fidelity`` it defines a mixing group."""
    fidelity: str
    """Level-of-theory label, e.g. ``PBE``, ``r2SCAN``, ``wB97M-V/def2-TZVPD``."""
    format: SourceFormat = "auto"
    """``auto`` picks by file name: ``.db`` ASE database, ``.aselmdb``/``.lmdb`` ASE-LMDB,
    ``.xyz``/``.extxyz`` (optionally compressed) extended XYZ, anything else ``ase.io``."""
    energy_key: str | None = None
    """``info`` key of the total energy (in ``energy_unit``); null: the calculator results
    (``energy``)."""
    forces_key: str | None = None
    """``arrays`` key of the forces (in ``forces_unit``); null: the calculator results."""
    stress_key: str | None = None
    """``info`` key of the stress (Voigt 6, or 3x3/9; in ``stress_unit`` and
    ``stress_sign``); null: the calculator results (``stress``)."""
    energy_unit: EnergyUnit = "eV"
    """Unit of the energies as stored in the files; converted to eV once, at build time."""
    forces_unit: str = "matching"
    """Unit of the forces: ``matching`` (``energy_unit`` per Angstrom) or
    ``<energy unit>/<A|bohr>``, e.g. ``hartree/bohr``; converted to eV/A."""
    stress_unit: StressUnit = "eV/A^3"
    """Unit of the stress; converted to eV/A^3."""
    stress_sign: Literal["ase", "vasp"] = "ase"
    """``ase``: positive under tension (ASE's ``get_stress``); ``vasp``: compression
    positive (VASP's OUTCAR/vasprun, a pressure); ``vasp`` values are negated."""
    charge_key: str = "charge"
    """``info`` key of the total charge; absent means 0."""
    spin_key: str = "spin"
    """``info`` key of the spin multiplicity; absent means 0 (unknown)."""
    extras: list[str | ExtraConfig] = dataclasses.field(default_factory=list)
    """Further targets to keep (charges, dipoles, ...): a key, or a mapping that renames,
    checks the layout of and converts one (:class:`ExtraConfig`); strings become
    ExtraConfigs on construction."""
    allow_missing_energy: bool = False
    """Keep structures with forces but no energy (force-only data)."""

    def __post_init__(self) -> None:
        self.extras = [ExtraConfig(key=e) if isinstance(e, str) else e for e in self.extras]

    def validate(self) -> None:
        """Reject empty names, unknown units and two extras of one name."""
        for key in ("path", "dataset", "fidelity"):
            if not getattr(self, key).strip():
                raise ConfigError(f"{key}: must not be empty")
        seen: dict[str, int] = {}
        for i, extra in enumerate(self.extras):
            try:
                extra.validate()
            except ConfigError as err:
                raise ConfigError(f"extras[{i}].{err}") from None
            if extra.name in seen:
                j = seen[extra.name]
                raise ConfigError(f"extras[{i}].name: {extra.name!r} (key {extra.key!r}) is already the "
                                  f"name of extras[{j}] (key {self.extras[j].key!r}); give each extra "
                                  "its own name")
            seen[extra.name] = i
        from data_pipeline.build.units import forces_factor  # noqa: PLC0415

        try:
            forces_factor(self.forces_unit, self.energy_unit)
        except ValueError as err:
            raise ConfigError(f"forces_unit: {err}") from None


@dataclasses.dataclass
class ValidationConfig:
    """Limits a record must meet to enter a shard; the rest go to ``rejects.jsonl``."""

    max_atoms: int = 5000
    """Largest structure accepted."""
    min_distance: float = 0.5
    """Smallest interatomic distance in Angstrom, periodic images included."""
    max_abs_energy_per_atom: float | None = None
    """Outlier bound on |E|/N in eV (OMat24 used 50 for DFT energies); null: no bound.
    Leave null for molecular codes' total energies, which reach 1e4 eV/atom."""
    max_force: float | None = 50.0
    """Outlier bound on the largest per-atom force norm in eV/A; null: no bound."""
    max_abs_stress: float | None = None
    """Outlier bound on the largest |stress| component in eV/A^3; null: no bound."""
    max_abs_coordinate: float | None = 1.0e4
    """Bound on |x|, |y|, |z| of every atom in A (an atom at 1e30 A is a unit or parsing
    error; unwrapped MD trajectories stay far inside); null: no bound."""

    def validate(self) -> None:
        """Bounds must be positive."""
        if self.max_atoms < 1:
            raise ConfigError(f"max_atoms: got {self.max_atoms}, expected >= 1")
        if self.min_distance < 0:
            raise ConfigError(f"min_distance: got {self.min_distance}, expected >= 0")
        for key in ("max_abs_energy_per_atom", "max_force", "max_abs_stress", "max_abs_coordinate"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}: got {value}, expected a positive number or null")


@dataclasses.dataclass
class Recipe:
    """A data build: sources, shard count, validation and reference-energy fit."""

    sources: list[SourceConfig]
    shards: int = 8
    """Number of LMDB shards to write (fixed: it does not depend on the worker count)."""
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)
    reference_ridge: float = 1e-8
    """Ridge strength of the least-squares elemental reference fit, relative to each
    element's own weight (its column of the composition matrix scaled to unit norm)."""
    reference_outlier_mads: float | None = 50.0
    """Leave out of the reference fit a record whose energy per atom after references lies
    more than this many scaled median absolute deviations (1.4826 x MAD: one standard
    deviation for normal data) from its fidelity's median, and refit; such a record is
    rejected as ``reference_outlier`` only beyond ``reference_outlier_bound``; null: no rule.
    The default only catches gross errors (a corrupted or mis-scaled single value): real
    data has high-energy structures 30 MADs out. Systematic problems (a whole dataset in
    the wrong unit, mixed settings) show as the audit's cluster and offset flags instead."""
    reference_outlier_bound: float | None = 20.0
    """Of the records the MAD rule finds, reject only those farther than this from the
    median, in eV/atom: a bound no physical structure reaches (an isolated atom lies at its
    cohesive energy, under 10 eV/atom, from bulk-fitted references). The others are kept,
    left out of the reference fit and reported; null: reject all the MAD rule finds."""
    reference_outlier_floor: float = 0.01
    """Smallest rejection distance in eV/atom, whatever the MAD (a fidelity whose records
    all sit on the fit has a MAD near zero)."""
    text_unit_bytes: int | None = 64 << 20
    """Plain (uncompressed) extended-XYZ files larger than this many bytes are split, at
    frame starts, into work units of about this size, so one big file spreads over the
    workers; null: one unit per file. Frames of the units after a file's first have
    source ids ``file@byte#k`` (k counted from that byte) instead of ``file#k``."""
    duplicates: Literal["keep_all", "keep_first"] = "keep_all"
    """Exact copies of a structure at one fidelity whose labels agree (README, "Duplicates
    and conflicts"): ``keep_all`` writes every copy (they are reported); ``keep_first``
    writes the first in build order and rejects the others as ``duplicate``."""
    conflicts: Literal["keep", "drop", "fail"] = "keep"
    """Copies of a structure at one fidelity whose labels disagree (beyond the two
    tolerances below; listed in ``conflicts.jsonl``): ``keep`` writes them all, ``drop``
    rejects every copy as ``label_conflict`` (which one is right is unknowable), ``fail``
    stops the build naming them."""
    conflict_energy_tolerance: float = 1e-3
    """Copies whose energies per atom spread by more than this (eV/atom) conflict."""
    conflict_force_tolerance: float = 1e-2
    """Copies whose forces differ by more than this in any component (eV/A) conflict."""
    root: str = ""
    """Folder the source paths are relative to (itself relative to the recipe file);
    empty: the recipe file's folder."""

    def validate(self) -> None:
        """At least one source, at least one shard."""
        if not self.sources:
            raise ConfigError("sources: the recipe names no sources")
        if self.shards < 1:
            raise ConfigError(f"shards: got {self.shards}, expected >= 1")
        if self.text_unit_bytes is not None and self.text_unit_bytes < 1 << 16:
            raise ConfigError(f"text_unit_bytes: got {self.text_unit_bytes}, expected >= 65536 or null")
        if self.reference_ridge < 0:
            raise ConfigError(f"reference_ridge: got {self.reference_ridge}, expected >= 0")
        mads = self.reference_outlier_mads
        if mads is not None and not mads > 0:
            raise ConfigError(f"reference_outlier_mads: got {mads}, expected > 0 or null")
        bound = self.reference_outlier_bound
        if bound is not None and not bound > 0:
            raise ConfigError(f"reference_outlier_bound: got {bound}, expected > 0 or null")
        for key in ("conflict_energy_tolerance", "conflict_force_tolerance"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"{key}: got {getattr(self, key)}, expected >= 0")
        if not self.reference_outlier_floor >= 0:
            raise ConfigError(f"reference_outlier_floor: got {self.reference_outlier_floor}, expected >= 0")

    def fidelities(self) -> list[str]:
        """Fidelity labels in order of first appearance: a label's index is its id."""
        return list(dict.fromkeys(s.fidelity for s in self.sources))

    def datasets(self) -> list[str]:
        """Dataset names in order of first appearance: a name's index is its id."""
        return list(dict.fromkeys(s.dataset for s in self.sources))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load a recipe YAML; relative source paths resolve against the recipe's folder."""
    recipe = load_config(Recipe, path, overrides)
    recipe.root = str((Path(path).resolve().parent / recipe.root).resolve())
    return recipe


def _is_lmdb_lock(path: Path) -> bool:
    return path.name.endswith("-lock") and path.with_name(path.name[:-5]).exists()


def expand_sources(recipe: Recipe) -> list[tuple[int, Path, str]]:
    """Every input file as ``(source index, absolute path, id prefix)``, in a fixed order.

    The order (recipe order, then sorted paths) fixes record order and hence shard bytes.
    The id prefix is the path relative to ``root`` (stable when the data moves).
    Raises ConfigError naming the source when a path is missing or a glob matches nothing.
    """
    root = Path(recipe.root or ".").resolve()
    files: list[tuple[int, Path, str]] = []
    for i, src in enumerate(recipe.sources):
        pattern = src.path if Path(src.path).is_absolute() else str(root / src.path)
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
            # LMDB writers leave "<file>-lock" beside the data file: not an input
            matches = [p for p in matches if p.is_file() and not _is_lmdb_lock(p)]
            if not matches:
                raise ConfigError(
                    f"sources[{i}].path: glob {src.path!r} matches no file (looked in {root})"
                )
        else:
            if not Path(pattern).exists():
                raise ConfigError(f"sources[{i}].path: {pattern} does not exist")
            matches = [Path(pattern)]
        for p in matches:
            p = p.resolve()
            try:
                rel = str(p.relative_to(root))
            except ValueError:
                rel = str(p)
            files.append((i, p, rel))
    return files
