"""Assembling ``manifest.json`` at the end of a build (its format and its reader are
:mod:`data_pipeline.manifest`, at the package root, which the stream stage and the models share).

The per-unit tables staged by the conversion tasks, the reference audit
(:mod:`data_pipeline.build.audit`) and the shards' own records become the manifest's
groups, references, per-fidelity coverage (:mod:`data_pipeline.build.coverage`) and
declared extras, units, rejects, inputs and warnings; ``content_hash`` is one hash of
all shard bytes that names the dataset (training runs log it).
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import numpy as np

from common.atomic import write_atomic
from data_pipeline.build.convert import COVERAGE, load_npz, unit_file
from data_pipeline.build.coverage import FidelityCoverage, coverage_json
from data_pipeline.build.stats import ExtraStats, GroupStats, extra_stats, group_stats
from data_pipeline.build.units import EXTRA_QUANTITIES, SCHEMA_UNITS, units_record
from data_pipeline.manifest import FORMAT
from data_pipeline.schema import SCHEMA_VERSION
from data_pipeline.shards import ShardReader, sha256_file, shard_name


def shard_info(out: Path, s: int) -> dict:
    """Size, checksum and counts of a finished shard, read back from disk."""
    path = out / shard_name(s)
    header, arrays = ShardReader(path).meta()
    return {"file": path.name, "records": header["n_records"], "atoms": int(arrays["n_atoms"].sum()),
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def assemble_manifest(recipe, units, staging: Path, out: Path, plan_hash: str, audit,
                      summaries: list[dict], shards: list[dict], duplicates: dict | None = None) -> dict:
    """Combine the staged per-unit tables, the reference audit and the shards into the manifest.

    ``audit`` is the :class:`data_pipeline.build.audit.Audit` of the build; ``summaries`` the
    conversion tasks' summaries (for the inputs that yielded no frame at all); ``shards``
    each shard's file, records, atoms, bytes and SHA-256 as its write task returned them.
    """
    groups: dict[tuple[str, str], GroupStats] = {}
    coverage = {fid: FidelityCoverage() for fid in recipe.fidelities()}
    extras: dict[str, dict[str, ExtraStats]] = {fid: {} for fid in recipe.fidelities()}
    reasons: collections.Counter = collections.Counter()
    inputs, empty = [], []
    for uid, unit in enumerate(units):
        src = recipe.sources[unit.source]
        table = load_npz(unit_file(staging, uid, ".table.npz"))
        keep = np.ones(len(table["energy"]), bool)
        keep[audit.drops.get(uid, [])] = False
        part = group_stats(table, keep)
        groups.setdefault((src.dataset, src.fidelity), GroupStats()).merge(part)
        columns = {k[len(COVERAGE):]: v for k, v in table.items() if k.startswith(COVERAGE)}
        coverage[src.fidelity].add_unit(table, columns, keep)
        for spec in src.extras:
            part_extra = extra_stats(table, keep, spec.name)
            extras[src.fidelity].setdefault(spec.name, ExtraStats()).merge(part_extra)
        text = unit_file(staging, uid, ".rejects.jsonl").read_text()
        unit_rejects = [json.loads(line)["reason"] for line in text.splitlines()]
        unit_rejects += [r["reason"] for r in audit.rejects.get(uid, [])]
        reasons.update(unit_rejects)
        span = [unit.start, unit.stop] if unit.stop is not None else None
        inputs.append({"file": unit.rel, "rows": None if unit.byte_range else span,
                       "bytes": span if unit.byte_range else None,
                       "dataset": src.dataset, "fidelity": src.fidelity,
                       "records": part.structures, "rejects": len(unit_rejects)})
        if summaries[uid].get("frames", 1) == 0 and not unit_rejects:
            inputs[-1]["empty"] = True
            empty.append(unit.rel)
    warnings = [f"{rel}: no frames at all (an empty file?); nothing was read from it" for rel in empty]
    extras_json, extras_warnings = _extras_section(recipe, extras)
    warnings += extras_warnings
    warnings += audit.warnings
    warnings += (duplicates or {}).get("warnings", [])
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "records": sum(s["records"] for s in shards),
        "atoms": sum(s["atoms"] for s in shards),
        "fidelities": recipe.fidelities(),
        "datasets": recipe.datasets(),
        "shards": shards,
        "groups": [{"dataset": d, "fidelity": f, **g.to_json(),
                    "residual_per_atom": audit.residuals.get((d, f), {"structures": 0})}
                   for (d, f), g in groups.items()],
        "element_references": audit.references,
        "extras": extras_json,
        "coverage": coverage_json(coverage),
        "units": SCHEMA_UNITS,
        "label_units": units_record(recipe),
        "rejects": {"total": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))},
        "inputs": inputs,
        "empty_inputs": empty,
        "warnings": warnings,
        "duplicates": duplicates,
        "content_hash": content_hash(shards),
        "plan_hash": plan_hash,
    }


def _extras_section(recipe, merged: dict[str, dict[str, ExtraStats]]) -> tuple[dict, list[str]]:
    """The manifest's ``extras``: per fidelity, per declared name, how many records carry it
    (and lack it), its per, shape and canonical unit (null: not a known quantity, kept as
    stored), and the mean, RMS and standard deviation of its values; with the warnings."""
    section, warnings = {}, []
    for fid, by_name in merged.items():
        specs = {}  # name -> its first declaration at this fidelity
        for src in recipe.sources:
            if src.fidelity == fid:
                for spec in src.extras:
                    specs.setdefault(spec.name, spec)
        section[fid] = {}
        for name, stats in by_name.items():
            known = EXTRA_QUANTITIES.get(name)
            section[fid][name], warning = stats.to_json(specs[name], known.unit if known else None)
            if warning:
                warnings.append(f"{fid}: {warning}")
    return section, warnings


def content_hash(shards: list[dict]) -> str:
    """One SHA-256 over the schema version and every shard's checksum, in shard order."""
    h = hashlib.sha256(f"{FORMAT}:{SCHEMA_VERSION}".encode())
    for s in shards:
        h.update(f"{s['file']}:{s['sha256']}".encode())
    return h.hexdigest()


def write_manifest(manifest: dict, path: Path) -> None:
    """Write atomically (the manifest's presence marks a finished build)."""
    write_atomic(path, json.dumps(manifest, indent=1) + "\n")
