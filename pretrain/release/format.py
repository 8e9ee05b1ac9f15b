"""The on-disk format of a release folder, read and written without pickle.

A release is what leaves the training cluster::

    <release>/
        model.safetensors   weights (EMA weights when the run had EMA): tensors only; fp32,
                            the elemental references float64
        config.json         format version, model config, fidelity table, how forces are
                            served, units, provenance
        MODEL_CARD.md       generated from the run (pretrain/release/card.py)
        metrics.json        held-out metrics the card shows (when the run had eval data)
        robustness.json     the robustness report the card shows (robustness.py), and
        robustness.png      its curves
        reliability.png     predicted vs actual error coverage per fidelity (with uncertainty)
        SHA256SUMS          ``<sha256>  <file>`` of every other file

It loads from JSON and safetensors alone: no pickle is read and no code from the folder
is run. ``format_version`` is :data:`FORMAT_VERSION`; an older version goes through the
registry of migrations (:data:`MIGRATIONS`, one function per version step, applied in
turn); a newer one is refused with both versions named.

``forces`` (version 2) says how the release serves forces: ``conservative`` (``-dE/dr``
by autograd) or ``direct`` (the direct force head the run trained; stress from the
direct stress head where the model has one).

``uncertainty`` (version 3): how the release says how sure it is, or null: the method
(``llpr`` or ``ensemble``, ``models/uncertainty.py``), the data it was fitted and
calibrated on, and the calibration scale per fidelity; the parameters themselves
(precisions, ensemble members, scales) are tensors of ``model.safetensors``.

``targets`` (version 4): the extra targets the release serves beside the energy (partial
charges, dipoles, ...; ``models/properties.py``): per target its name, kind, the ASE
property it is served as, its unit and the fidelities it was trained at. The heads are
rebuilt from ``model.targets`` and their tensors are in ``model.safetensors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch

from common.errors import UserError

FORMAT = "mlip-pretrain-release"
FORMAT_VERSION = 4
WEIGHTS, CONFIG, CARD, METRICS, SUMS = ("model.safetensors", "config.json", "MODEL_CARD.md",
                                        "metrics.json", "SHA256SUMS")
ROBUSTNESS, ROBUSTNESS_PLOT = "robustness.json", "robustness.png"  # pretrain/release/robustness.py
RELIABILITY = "reliability.png"  # pretrain/uncertainty/metrics.py
UNITS = {"energy": "eV", "forces": "eV/A", "stress": "eV/A^3", "length": "A",
         "stress_sign": "ASE (positive under tension)"}
REQUIRED = ("format", "format_version", "model", "cutoff", "fidelities", "units", "forces", "uncertainty",
            "targets")
#: how a release serves forces: the gradient of its energy, or its trained direct head
FORCE_MODES = ("conservative", "direct")


class ReleaseError(UserError, RuntimeError):
    """A release folder that cannot be used; the message names the file and what to do."""


#: ``{version v: f(config) -> config of version v + 1}``; a format change adds one entry
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


def migration(version: int):
    """Register the function that turns a version-``version`` config into the next one."""
    def register(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        MIGRATIONS[version] = fn
        return fn
    return register


@migration(0)
def _from_v0(config: dict) -> dict:
    """Version 0 (pre-release drafts) kept fidelity names and references side by side:
    ``fidelity_names: [..]``, ``element_references: {name: {el: eV}}``, no coverage."""
    out = {k: v for k, v in config.items() if k not in ("fidelity_names", "element_references")}
    refs = config.get("element_references", {})
    out["fidelities"] = [{"name": n, "index": i, "element_references": refs.get(n, {}), "elements": []}
                         for i, n in enumerate(config["fidelity_names"])]
    out["units"] = config.get("units", UNITS)
    out["format_version"] = 1
    return out


@migration(1)
def _from_v1(config: dict) -> dict:
    """Version 1 did not record how forces are served; its releases served conservative
    forces, whatever the run trained (a direct-force run should be released again)."""
    return {**config, "forces": "conservative", "format_version": 2}


@migration(2)
def _from_v2(config: dict) -> dict:
    """Version 2 releases carry no uncertainty: they load and say so when asked."""
    return {**config, "uncertainty": None, "format_version": 3}


@migration(3)
def _from_v3(config: dict) -> dict:
    """Version 3 releases serve no extra targets."""
    return {**config, "targets": [], "format_version": 4}


def migrate(config: dict, where: str) -> dict:
    """``config`` brought to :data:`FORMAT_VERSION` through the registered migrations."""
    version = config.get("format_version")
    if not isinstance(version, int):
        raise ReleaseError(f"{where}: no integer format_version; not a release config.json")
    if version > FORMAT_VERSION:
        raise ReleaseError(f"{where}: format_version {version} is newer than this code reads "
                           f"({FORMAT_VERSION}); upgrade mlip-pretrain to load it")
    while version < FORMAT_VERSION:
        if version not in MIGRATIONS:
            raise ReleaseError(f"{where}: format_version {version} has no migration to "
                               f"{version + 1}; this release cannot be read by this code")
        config = MIGRATIONS[version](config)
        if config.get("format_version") != version + 1:
            raise ReleaseError(f"{where}: migration from version {version} did not produce {version + 1}")
        version += 1
    return config


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sums(folder: Path) -> list[str]:
    """Compare every file listed in ``SHA256SUMS`` with its bytes; returns the files
    checked. A missing, changed or unlisted file, or an entry that is not a plain file
    name of the folder (``../x``, ``/etc/x``, ``sub/x``), raises :class:`ReleaseError`
    naming it: nothing outside the release folder is ever read."""
    sums = folder / SUMS
    if not sums.is_file():
        raise ReleaseError(f"{sums}: missing; a release lists the SHA-256 of each of its files")
    listed = {}
    for n, line in enumerate(sums.read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ReleaseError(f"{sums}:{n}: not '<sha256>  <file>': {line[:80]!r}")
        name = parts[1].lstrip("*")
        if name in ("", ".", "..", SUMS) or name != Path(name).name or "\\" in name:
            raise ReleaseError(f"{sums}:{n}: {name!r} is not a file of the release folder; a "
                               "release lists only its own files (no paths): copy it again from its source")
        listed[name] = parts[0]
    for required in (WEIGHTS, CONFIG):
        if required not in listed:
            raise ReleaseError(f"{sums}: {required} is not listed; the release is incomplete")
    for name, digest in listed.items():
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise ReleaseError(f"{path}: listed in {SUMS} but missing (or a link); copy the release again")
        if sha256_file(path) != digest:
            raise ReleaseError(f"{path}: SHA-256 does not match {SUMS}: the file was changed "
                               "or damaged; copy the release again from its source")
    extra = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != SUMS
                   and p.name not in listed)
    if extra:
        raise ReleaseError(f"{folder}: files not listed in {SUMS}: {extra}; a release folder holds "
                           "only its own files")
    return sorted(listed)


def write_sums(folder: Path) -> None:
    """``SHA256SUMS`` over every other file of ``folder`` (written last)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != SUMS)
    (folder / SUMS).write_text("".join(f"{sha256_file(p)}  {p.name}\n" for p in files))


def read_config(folder: str | Path) -> dict:
    """``config.json`` of a release, migrated to the current format and checked."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise ReleaseError(f"{path}: missing; is {folder} a release folder (mlip-pretrain release create)?")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReleaseError(f"{path}: not valid JSON ({err}); the file is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ReleaseError(f"{path}: 'format' is not {FORMAT!r}; not an mlip-pretrain release")
    config = migrate(config, str(path))
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ReleaseError(f"{path}: missing keys {missing}")
    if config["forces"] not in FORCE_MODES:
        raise ReleaseError(f"{path}: forces is {config['forces']!r}, expected one of {FORCE_MODES}")
    return config


def is_release(path: str | Path) -> bool:
    """Whether ``path`` is a release folder (its ``config.json`` names this format)."""
    path = Path(path) / CONFIG
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return True  # a damaged release config: let the release reader name the problem


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` (safetensors never runs code)."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise ReleaseError(f"{path}: missing; copy the release again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ReleaseError(f"{path}: unreadable safetensors ({err}); the file is damaged") from None


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to assemble a release in: renamed to ``out`` when
    the block ends, removed when it raises (a failure leaves no release behind)."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_weights(folder: Path, potential: torch.nn.Module) -> None:
    """``model.safetensors``: every tensor of the model's state, on the CPU."""
    from safetensors.torch import save_file  # noqa: PLC0415

    state = {k: v.detach().contiguous().cpu() for k, v in potential.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
