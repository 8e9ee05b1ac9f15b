"""What a manifest's ``coverage`` says a model trained on the data can be trusted for.

The build records per fidelity the elements, element pairs and ranges of geometry and
labels its structures span (:mod:`data_pipeline.build.coverage`). This module reads that
back for people: :func:`known_limits` (the rare elements and pairs, and the ranges seen)
feeds both ``data inspect`` (:func:`summary_lines`) and a release's model card, so the two
never disagree on what "rare" means.
"""

from __future__ import annotations

from common.errors import UserError

RARE_STRUCTURES = 10  # an element or pair in fewer structures than this is "rare"
RANGES = ("nearest_distance", "pressure", "volume_per_atom", "force")
LABELS = {"nearest_distance": "nearest-neighbour distance", "volume_per_atom": "volume per atom",
          "pressure": "pressure", "force": "force |F|"}
_SHOWN = 5  # rarest elements and pairs a summary line names


class CoverageMissing(UserError, RuntimeError):
    """A manifest from a build that predates coverage statistics."""


def coverage_of(manifest: dict, where: str = "the manifest") -> dict:
    """The manifest's ``coverage``, or a CoverageMissing that says to rebuild."""
    coverage = manifest.get("coverage")
    if not coverage:
        raise CoverageMissing(f"{where} has no coverage statistics (built by an older mlip-pretrain); "
                              "rebuild the data with `mlip-pretrain data build` to get them")
    return coverage


def known_limits(coverage: dict, rare: int = RARE_STRUCTURES) -> dict[str, dict]:
    """Per fidelity: ``elements`` (all seen), ``rare_elements`` and ``rare_pairs`` ({name:
    structures} for those in fewer than ``rare`` structures, rarest first), ``unseen_pairs``
    (how many pairs of its elements never share a structure) and per quantity of
    :data:`RANGES` its ``[min, max]`` (None when no structure had it)."""
    out = {}
    for fid, cov in coverage["fidelities"].items():
        elements = cov["elements"]
        pairs = cov["pairs"]
        n = len(elements)
        out[fid] = {
            "structures": cov["structures"],
            "elements": list(elements),
            "rare_elements": _rarest({e: c["structures"] for e, c in elements.items()}, rare),
            "rare_pairs": _rarest(pairs, rare),
            "unseen_pairs": n * (n - 1) // 2 - len(pairs),
            **{q: None if cov[q]["count"] == 0 else [cov[q]["min"], cov[q]["max"]] for q in RANGES},
        }
    return out


def _rarest(counts: dict[str, int], rare: int) -> dict[str, int]:
    return dict(sorted(((k, v) for k, v in counts.items() if v < rare), key=lambda kv: (kv[1], kv[0])))


def range_text(limits: dict, q: str, units: dict) -> str:
    """``"2.31-3.05 A"`` or ``"none"``."""
    r = limits[q]
    return "none" if r is None else f"{r[0]:.4g} to {r[1]:.4g} {units[q]}"


def counts_text(counts: dict[str, int], shown: int | None = None) -> str:
    """``"Au (2), O-Au (3)"``; with ``shown``, the first ``shown`` and how many more."""
    items = list(counts.items())
    text = ", ".join(f"{k} ({v})" for k, v in items[:shown])
    more = len(items) - len(items[:shown])
    return (text + (f" and {more} more" if more else "")) or "none"


def summary_lines(manifest: dict) -> list[str]:
    """The ``data inspect`` coverage summary: per fidelity its elements, rarest elements
    and pairs, and the ranges of the four quantities (one line saying to rebuild when the
    manifest has no coverage)."""
    try:
        coverage = coverage_of(manifest)
    except CoverageMissing as err:
        return [f"coverage: {err}"]
    units = coverage["units"]
    lines = [f"coverage (rare: in fewer than {RARE_STRUCTURES} structures; pairs: structures holding both):"]
    for fid, lim in known_limits(coverage).items():
        lines.append(f"  [{fid}] {lim['structures']} structures, {len(lim['elements'])} elements: "
                     + " ".join(lim["elements"]))
        lines.append(f"    rare elements: {counts_text(lim['rare_elements'], _SHOWN)}")
        lines.append(f"    rare pairs: {counts_text(lim['rare_pairs'], _SHOWN)}; "
                     f"{lim['unseen_pairs']} pairs of its elements never together")
        lines.append("    " + "; ".join(f"{LABELS[q]} {range_text(lim, q, units)}" for q in RANGES))
    return lines
