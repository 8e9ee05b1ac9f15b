"""``data inspect --plots``: figures of a manifest's ``coverage``.

Per fidelity an element-pair heatmap (structures holding both elements, log colour scale;
the diagonal is the structures holding the element) and a bar chart of atoms and
structures per element; per quantity (nearest-neighbour distance, volume per atom,
pressure, force magnitude) one histogram with a line per fidelity, so fidelities compare
at a glance. Counts outside the fixed bin edges are named in the legend, not drawn.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np

from data_pipeline.coverage_report import LABELS


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _slug(name: str) -> str:
    """A fidelity name as a file name part (``wB97M-V/def2-TZVPD`` -> ``wB97M-V_def2-TZVPD``)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "fidelity"


def write_plots(coverage: dict, out: str | Path) -> list[Path]:
    """Write every coverage figure into ``out`` (created); return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fid, cov in coverage["fidelities"].items():
        paths.append(_pairs_heatmap(fid, cov, out / f"pairs-{_slug(fid)}.png"))
        paths.append(_element_bars(fid, cov, out / f"elements-{_slug(fid)}.png"))
    for q in coverage["edges"]:
        paths.append(_histogram(coverage, q, out / f"{q}.png"))
    return paths


def _ordered_elements(cov: dict) -> list[str]:
    from ase.data import atomic_numbers  # noqa: PLC0415

    return sorted(cov["elements"], key=atomic_numbers.__getitem__)


def _pairs_heatmap(fid: str, cov: dict, path: Path) -> Path:
    from matplotlib.colors import LogNorm  # noqa: PLC0415

    plt = _pyplot()
    elements = _ordered_elements(cov)
    k = len(elements)
    where = {e: i for i, e in enumerate(elements)}
    grid = np.zeros((k, k))
    for e, c in cov["elements"].items():
        grid[where[e], where[e]] = c["structures"]
    for pair, n in cov["pairs"].items():
        a, b = pair.split("-")
        grid[where[a], where[b]] = grid[where[b], where[a]] = n
    size = min(4 + 0.3 * k, 24)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    shown = np.ma.masked_equal(grid, 0)  # never together: blank, not the lowest colour
    image = ax.imshow(shown, norm=LogNorm(vmin=1, vmax=max(grid.max(), 2)), cmap="viridis")
    ax.set_xticks(range(k), elements, rotation=90, fontsize=7)
    ax.set_yticks(range(k), elements, fontsize=7)
    ax.set_title(f"{fid}: structures holding both elements (blank: never together)", fontsize=10)
    fig.colorbar(image, ax=ax, label="structures")
    return _save(fig, path)


def _element_bars(fid: str, cov: dict, path: Path) -> Path:
    plt = _pyplot()
    elements = _ordered_elements(cov)
    x = np.arange(len(elements))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(elements) + 2), 4))
    ax.bar(x - 0.2, [cov["elements"][e]["atoms"] for e in elements], 0.4, label="atoms")
    ax.bar(x + 0.2, [cov["elements"][e]["structures"] for e in elements], 0.4, label="structures")
    ax.set_yscale("log")
    ax.set_xticks(x, elements, rotation=90, fontsize=7)
    ax.set_title(f"{fid}: {cov['structures']} structures, {cov['atoms']} atoms", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _histogram(coverage: dict, q: str, path: Path) -> Path:
    plt = _pyplot()
    edges = np.asarray(coverage["edges"][q])
    fig, ax = plt.subplots(figsize=(7, 4))
    for fid, cov in coverage["fidelities"].items():
        h = cov[q]
        if not h["count"]:
            continue
        outside = f"; {h['below']} below, {h['above']} above the axis" if h["below"] or h["above"] else ""
        ax.stairs(h["counts"], edges, label=f"{fid} ({h['count']}{outside})")
    if q == "force":
        ax.set_xscale("log")
    ax.set_yscale("log")
    unit = coverage["units"][q]
    per = "atoms" if q == "force" else "structures"
    ax.set_xlabel(f"{LABELS[q]} ({unit})")
    ax.set_ylabel(per)
    ax.set_title(textwrap.fill(coverage["definitions"][q], 110), fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
