"""The study's figures: log-log loss against N, D and C with fits and 95% bands (one row
per fidelity), and the compute-optimal frontier N*(C), D*(C)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from pretrain.scaling.fit import Fit

AXES = (("L(N)", "parameters N"), ("L(D)", "distinct training atoms D"), ("L(C)", "training FLOPs C"))


def _pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def NullFormatter():  # noqa: N802 - matplotlib's class, imported late
    from matplotlib.ticker import NullFormatter as null  # noqa: PLC0415

    return null()


def _label(fit: Fit) -> str:
    a, (lo, hi) = fit.params["alpha"], fit.ci["alpha"]
    return f"alpha = {a:.2f} [{lo:.2f}, {hi:.2f}]" + (" (!)" if fit.warnings else "")


def plot_fits(results: dict, out: Path) -> Path:
    """``scaling.png``: for each fidelity (a row) the loss against N, D and C: every point
    (grey), the points a fit used (colour), the fitted curve and its 95% band."""
    plt = _pyplot()
    fids = list(results)
    fig, axes = plt.subplots(len(fids), 3, figsize=(13, 3.6 * len(fids)), squeeze=False)
    for row, fid in enumerate(fids):
        r = results[fid]
        for col, (kind, xlabel) in enumerate(AXES):
            ax = axes[row, col]
            key = {"L(N)": "N", "L(D)": "D", "L(C)": "C"}[kind]
            ax.scatter(r["all"][key], r["all"]["y"], s=18, color="0.75", label="all points", zorder=2)
            fit = r["fits"].get(kind)
            if fit is not None:
                x = np.geomspace(fit.x.min() / 1.5, fit.x.max() * 1.5, 100)
                lo, hi = fit.band(x)
                ax.fill_between(x, lo, hi, color=f"C{col}", alpha=0.2, label="95% band")
                ax.plot(x, fit.predict(x), color=f"C{col}", label=_label(fit))
                ax.scatter(fit.x, fit.y, s=26, color=f"C{col}", edgecolor="k", zorder=3, label="fitted points")
            else:
                ax.text(0.5, 0.5, textwrap.fill(r["skipped"].get(kind, "no fit"), 38),
                        transform=ax.transAxes, ha="center", va="center", fontsize=8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide over a decade
            ax.set_xlabel(xlabel)
            ax.set_ylabel(r["metric"])
            ax.set_title(f"{fid}: {kind}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = out / "scaling.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frontier(results: dict, out: Path) -> Path:
    """``frontier.png``: compute-optimal N*(C) and D*(C) of each fidelity's L(N, D) fit
    with 95% bands, and the study's points at their (C, N) and (C, D)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (fid, r) in enumerate(results.items()):
        f = r.get("frontier")
        if f is None:
            continue
        c = np.array(f["C"])
        for ax, key in zip(axes, ("N", "D")):
            lo, hi = (np.array(v) for v in f[f"{key}_opt_ci95"])
            ax.fill_between(c, lo, hi, color=f"C{i}", alpha=0.15)
            exp = f[f"{key}_exponent"]
            ax.plot(c, f[f"{key}_opt"], color=f"C{i}", label=f"{fid}: {key}* ~ C^{exp:.2f}")
    first = next(iter(results.values()))
    for ax, key, name in zip(axes, ("N", "D"), ("parameters", "training atoms")):
        ax.scatter(first["all"]["C"], first["all"][key], s=18, color="0.5", label="study points", zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(f"compute-optimal {name} {key}*")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("N*(C) from L(N, D), C = k N D", fontsize=10)
    axes[1].set_title("D*(C) = C / (k N*)", fontsize=10)
    fig.tight_layout()
    path = out / "frontier.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
