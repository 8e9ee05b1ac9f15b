"""``manifest.json``: what a shard folder holds, in one file a sampler, a model and a person read.

Contents: schema version; per-shard record count, atom count, size and SHA-256; per
dataset x fidelity group: structures, atoms, element counts, energy per atom mean/std,
force RMS and the distribution of the residual energy per atom after references (with
flags for clusters and offsets, :mod:`data_pipeline.build.audit`); elemental reference
energies per fidelity (robust ridge least squares) with the fit's residual and outlier
rule; per fidelity the coverage (elements, element pairs, histograms of nearest-neighbour
distance, volume per atom, pressure and force; :mod:`data_pipeline.coverage_report` reads
it); per fidelity the declared extras (``extras``: ``{fidelity: {name: {"records",
"absent", "per", "shape", "unit", "mean", "rms", "std"}}}``, values in the canonical unit;
unit null where not a known quantity); the stored units and each source's declared label
units with the factors the build applied; rejects by reason; inputs that yielded no frame; ``warnings`` (those inputs and
the audit's flags); and ``content_hash``, one hash of all shard bytes that names the
dataset (training runs log it).

This module is the shared half, the format and its reader (the stream stage, the models
and the CLI read manifests); the build stage assembles and writes one
(:mod:`data_pipeline.build.assemble`).
"""

from __future__ import annotations

import json
from pathlib import Path

from common.errors import UserError
from data_pipeline.coverage_report import summary_lines
from data_pipeline.schema import SCHEMA_VERSION

FORMAT = "mlip-pretrain-shards"


class ManifestError(UserError, RuntimeError):
    """A manifest that is missing or unreadable."""


def read_manifest(folder: str | Path) -> dict:
    """Load ``folder/manifest.json`` with errors that say what to do."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        hint = " (a build is unfinished there: rerun it)" if (Path(folder) / ".build").exists() else ""
        raise ManifestError(f"{path}: no manifest; is {folder} the --out of a data build?{hint}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err}); rebuild the shards") from None
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not an mlip-pretrain shard manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(
            f"{path}: schema version {manifest.get('schema_version')}, this code reads "
            f"{SCHEMA_VERSION}; rebuild the shards or upgrade mlip-pretrain"
        )
    return manifest


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def summary_table(manifest: dict) -> str:
    """The ``data inspect`` table: groups, counts, elements, references, rejects, coverage."""
    rows = [("dataset", "fidelity", "structures", "atoms", "E/atom mean", "E/atom std",
             "F rms", "elements")]
    for g in manifest["groups"]:
        elems = " ".join(sorted(g["elements"], key=lambda e: -g["elements"][e]))
        rows.append((g["dataset"], g["fidelity"], str(g["structures"]), str(g["atoms"]),
                     _fmt(g["energy_per_atom_mean"], ".4f"), _fmt(g["energy_per_atom_std"], ".4f"),
                     _fmt(g["force_rms"], ".4f"), elems))
    lines = _aligned(rows)
    lines.append("")
    lines.append(f"{manifest['records']} records, {manifest['atoms']} atoms in "
                 f"{len(manifest['shards'])} shards; content hash {manifest['content_hash'][:16]}")
    for fid, ref in manifest["element_references"].items():
        lines.append(f"element references [{fid}]: {len(ref['energies'])} elements from "
                     f"{ref['structures']} structures, rms residual "
                     f"{_fmt(ref['rms_residual'], '.4f')} eV")
        lines.append("  " + _outlier_line(ref.get("outliers", {})))
    lines.append("residual energy per atom after references (eV):")
    for g in manifest["groups"]:
        r = g.get("residual_per_atom", {})
        if r.get("structures"):
            flags = f"  FLAGGED: {', '.join(r['flags'])}" if r.get("flags") else ""
            lines.append(f"  {g['dataset']}/{g['fidelity']}: median {r['median']:.4g}, MAD "
                         f"{r['mad']:.3g}, mean {r['mean']:.4g}, std {r['std']:.3g}, 1-99% "
                         f"[{r['p01']:.4g}, {r['p99']:.4g}]{flags}")
    lines += extras_table(manifest.get("extras", {}))
    rej = manifest["rejects"]
    detail = ", ".join(f"{k}={v}" for k, v in rej["by_reason"].items())
    lines.append(f"rejected: {rej['total']}" + (f" ({detail}); see rejects.jsonl" if detail else ""))
    if manifest.get("duplicates"):
        lines.append(duplicates_table(manifest["duplicates"]))
    else:
        lines.append("duplicates: not recorded (a build from before fingerprints; rebuild to find them)")
    lines += summary_lines(manifest)
    lines += [f"WARNING: {w}" for w in manifest.get("warnings", [])]
    return "\n".join(lines)


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as lines of left-aligned columns (the last one unpadded), a rule under the first."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def extras_table(extras: dict) -> list[str]:
    """The ``data inspect`` lines of a manifest's ``extras`` section: a table per fidelity."""
    lines = []
    for fid, by_name in extras.items():
        if not by_name:
            continue
        rows = [("name", "per", "shape", "unit", "records", "absent", "mean", "rms", "std")]
        rows += [(name, str(e["per"]), "-" if e["shape"] is None else str(e["shape"]), e["unit"] or "-",
                  str(e["records"]), str(e["absent"]), _fmt(e["mean"], ".4g"), _fmt(e["rms"], ".4g"),
                  _fmt(e["std"], ".4g")) for name, e in by_name.items()]
        lines.append(f"extras [{fid}] (values in the unit shown; -: kept as stored):")
        lines += ["  " + line for line in _aligned(rows)]
    return lines


def _outlier_line(rule: dict) -> str:
    if rule.get("mads") is None:
        return "outlier rejection off (reference_outlier_mads: null)"
    if "skipped" in rule:
        return f"outlier rejection skipped: {rule['skipped']}"
    bound = rule.get("bound")
    return (f"outliers: {rule['rejected']} rejected beyond {rule['mads']:g} scaled MADs "
            + (f"and {bound:g} eV/atom, {rule.get('unusual', 0)} kept out of the fit " if bound else "")
            + f"(median {rule['median']:.4g}, MAD {rule['mad']:.3g}, threshold "
            f"{rule['threshold']:.3g} eV/atom, {rule['iterations']} fits"
            + ("" if rule["converged"] else ", not converged") + ")")


def duplicates_table(report: dict) -> str:
    """The ``data inspect`` lines of a manifest's ``duplicates`` section."""
    lines = ["duplicates (exact: same structure; near: rotation-invariant geometry to 1e-3 A):"]
    for f, c in report["fidelities"].items():
        lines.append(f"  [{f}] exact copies {c['exact_duplicates_within_dataset']} within datasets, "
                     f"{c['exact_duplicates_across_datasets']} across; near {c['near_duplicates']}; "
                     f"conflicting structures {c['conflicting_structures']} ({c['conflicting_records']} records)")
    a = report["across_fidelities"]
    pairs = ", ".join(f"{k}: {v}" for k, v in a["pairs"].items()) or "none"
    lines.append(f"  structures labelled at several fidelities: {a['structures_at_several']} ({pairs})")
    c = report["conflicts"]
    if c["structures"]:
        lines.append(f"  label conflicts: {c['structures']} structures, energy spread up to "
                     f"{c['energy_spread_max']:.4g} eV/atom, forces up to {c['force_spread_max']:.4g} eV/A "
                     f"(conflicts.jsonl; policy {report['policy']['conflicts']})")
    if report["dropped"]:
        lines.append(f"  dropped {report['dropped']} records (rejects.jsonl)")
    return "\n".join(lines)
