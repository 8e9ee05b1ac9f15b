"""How well predicted uncertainties match actual errors, and the reliability diagram.

For residuals ``r`` and predicted uncertainties ``sigma`` (calibrated). The central
interval at level ``p`` is ``+-w(p) sigma``: with a Gaussian reading ``w`` is the normal
quantile (1 at 68.27%, 1.96 at 95%); a calibrated model carries its own ``w`` per fidelity,
the conformal quantiles of ``|r| / sigma`` on its calibration data at :data:`LEVELS`
(``pretrain/uncertainty/fit.py``: errors of MLIPs are heavy-tailed, so ``w(68%)`` is
below 1 while ``w(95%)`` stays 1.96):

* ``spearman``: rank correlation of ``sigma`` with ``|r|`` (per structure for energies;
  per atom with ``|r|`` the force error's norm, and per structure with the structure's
  force RMSE against its RMS ``sigma``);
* ``coverage_68`` / ``coverage_95``: the fraction of residual components inside the
  central 68.27% / 95% interval; ``gaussian_coverage_68`` the same with ``w = 1``;
* ``miscalibration_area``: the mean over confidence levels ``p`` in (0, 1) of
  ``|observed fraction inside the central p interval - p|`` (0: perfect, 0.5: worst);
* ``nll``: the mean Gaussian negative log-likelihood per component (nats).
"""

from __future__ import annotations

from pathlib import Path
from statistics import NormalDist

import numpy as np

LEVELS = np.linspace(0.01, 0.99, 99)  # confidence levels of the miscalibration area and diagram
Z = np.array([NormalDist().inv_cdf(0.5 + p / 2) for p in LEVELS])  # half-width of each central interval
Z68, Z95 = NormalDist().inv_cdf(0.5 + 0.6827 / 2), NormalDist().inv_cdf(0.975)


def width(widths: np.ndarray | None, level: float) -> float:
    """``w(level)``: from a calibrated table at :data:`LEVELS`, else the normal quantile."""
    if widths is None or not np.any(widths > 0):
        return NormalDist().inv_cdf(0.5 + level / 2)
    return float(np.interp(level, LEVELS, widths))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (ties share their mean rank); NaN with fewer than 3 items."""
    from scipy.stats import rankdata  # noqa: PLC0415

    if len(a) < 3:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def observed_coverage(res: np.ndarray, sigma: np.ndarray, widths: np.ndarray | None = None) -> np.ndarray:
    """Fraction of residual components inside each central interval of :data:`LEVELS`
    (half-widths ``widths`` in units of sigma, else the normal quantiles)."""
    w = Z if widths is None or not np.any(widths > 0) else widths
    z = np.abs(res / sigma.reshape(-1, *([1] * (res.ndim - 1)))).reshape(-1)
    return (z[:, None] <= w[None, :]).mean(axis=0)


def score(res: np.ndarray, sigma: np.ndarray, widths: np.ndarray | None = None) -> dict:
    """The metrics of residuals ``res [n]`` or ``[n, 3]`` under ``sigma [n]`` (per
    component), intervals of half-width ``widths`` (see :func:`width`)."""
    if len(res) == 0:
        return {}
    s = np.clip(sigma, 1e-30, None)
    s_b = s.reshape(-1, *([1] * (res.ndim - 1)))
    z = np.abs(res / s_b)
    err = np.abs(res) if res.ndim == 1 else np.linalg.norm(res, axis=1)
    nll = 0.5 * np.log(2 * np.pi * np.broadcast_to(s_b, res.shape) ** 2) + 0.5 * z**2
    return {"items": int(len(res)), "spearman": spearman(s, err),
            "coverage_68": float((z <= width(widths, 0.6827)).mean()),
            "coverage_95": float((z <= width(widths, 0.95)).mean()),
            "gaussian_coverage_68": float((z <= Z68).mean()), "width_68": width(widths, 0.6827),
            "miscalibration_area": float(np.abs(observed_coverage(res, s, widths) - LEVELS).mean()),
            "nll": float(nll.mean()), "mean_sigma": float(s.mean()), "rmse": float(np.sqrt(np.mean(res**2)))}


def per_structure_forces(f_res: np.ndarray, f_sigma: np.ndarray, f_graph: np.ndarray) -> tuple:
    """(force RMSE, RMS sigma) per structure, from per-atom residuals ``[A, 3]``, sigmas
    ``[A]`` and each atom's structure key ``[A]``."""
    keys, inv = np.unique(f_graph, return_inverse=True)
    n = np.bincount(inv, minlength=len(keys)).astype(float)
    mse = np.bincount(inv, weights=(f_res**2).mean(axis=1), minlength=len(keys)) / n
    msig = np.bincount(inv, weights=f_sigma**2, minlength=len(keys)) / n
    return np.sqrt(mse), np.sqrt(msig)


def uncertainty_report(e_res, e_sigma, f_res, f_sigma, f_graph, widths=(None, None)) -> dict:
    """``{"energy": score, "forces": score + spearman_structure}`` of one group's items;
    ``widths``: the fidelity's calibrated interval tables (energy, forces) or None."""
    out = {"energy": score(np.asarray(e_res), np.asarray(e_sigma), widths[0])}
    forces = score(np.asarray(f_res), np.asarray(f_sigma), widths[1])
    if forces:
        rmse, sig = per_structure_forces(np.asarray(f_res), np.asarray(f_sigma), np.asarray(f_graph))
        forces["spearman_structure"] = spearman(sig, rmse)
    out["forces"] = forces
    return out


def reliability_plot(curves: dict, out: Path) -> Path:
    """One PNG: per fidelity, observed vs expected coverage of energies and forces.

    ``curves``: ``{fidelity: {"energy": (res, sigma, widths), "forces": (res, sigma, widths)}}``."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, what in zip(axes, ("energy", "forces")):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, label="calibrated")
        for fid, parts in curves.items():
            res, sigma, widths = parts.get(what, (np.zeros(0), np.zeros(0), None))
            if len(res):
                observed = observed_coverage(res, sigma, widths)
                area = np.abs(observed - LEVELS).mean()
                ax.plot(LEVELS, observed, lw=1.5, label=f"{fid} (area {area:.3f})")
        ax.set(xlabel="expected fraction inside the interval", ylabel="observed fraction",
               title=f"{what}: reliability", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
