"""Power-law fits of a study's losses, with bootstrap intervals and the compute frontier.

Per fidelity, on the study's finished points:

* ``L(N) = a N^-alpha + c`` on the points with the most data and the largest budget;
* ``L(D) = a D^-alpha + c`` on the points with the largest model and budget;
* ``L(C) = a C^-alpha + c`` on the compute frontier (each point whose loss is below that
  of every point with less compute);
* ``L(N, D) = E + A N^-alpha + B D^-beta`` on every point of the largest budget.

Fits are robust nonlinear least squares (``scipy.optimize.least_squares``,
``loss="soft_l1"``) on log-space residuals ``log L_fit - log L`` (every point counts by
its relative error, whatever its scale), with exponents bounded to (0, 2] and offsets to
>= 0, from several starts. Inputs are divided by their geometric means first, so the
problem is well scaled whatever the units. Intervals are 95% percentile bootstraps:
points resampled with replacement, refitted from the best fit.

Compute-optimal allocation: with the training cost ``C = k N D`` (``k`` the median over
the points of measured FLOPs per atom per parameter) and one pass over the data (atoms
seen = D), minimising ``L(N, D)`` at fixed C gives
``N*(C) = G (C/k)^(beta/(alpha+beta))`` with ``G = (alpha A / (beta B))^(1/(alpha+beta))``
and ``D*(C) = C / (k N*)``. Both assumptions are approximate for MLIPs: FLOPs per atom
grow with the neighbour count and angular order as well as with N, and small datasets are
trained for many epochs.
"""

from __future__ import annotations

import dataclasses
import warnings as _warnings

import numpy as np

BOUNDS = (1e-3, 2.0)  # exponents
LEVEL = (2.5, 97.5)  # percentiles of the 95% intervals


@dataclasses.dataclass
class Fit:
    """One fitted law: parameters in the data's units, intervals, warnings, bootstrap draws."""

    kind: str
    names: list[str]
    params: dict[str, float]
    ci: dict[str, list[float]]
    x: np.ndarray  # [n] or [n, 2] (N, D)
    y: np.ndarray  # [n]
    warnings: list[str]
    samples: np.ndarray  # [reps, n_params] bootstrap parameters (data units)
    cond: float = 0.0

    def predict(self, x: np.ndarray, params: np.ndarray | None = None) -> np.ndarray:
        p = np.array([self.params[k] for k in self.names]) if params is None else params
        return _law(self.kind)(p, np.asarray(x, dtype=np.float64))

    def band(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise 95% band of the fitted curve at ``x`` (from the bootstrap draws)."""
        if not len(self.samples):
            y = self.predict(x)
            return y, y
        curves = np.stack([self.predict(x, s) for s in self.samples])
        return tuple(np.percentile(curves, LEVEL, axis=0))

    def to_json(self) -> dict:
        return {"law": LAWS[self.kind], "params": self.params, "ci95": self.ci, "points": len(self.y),
                "bootstrap": len(self.samples), "jacobian_condition": self.cond, "warnings": self.warnings,
                "x": self.x.tolist(), "y": self.y.tolist()}


LAWS = {"L(N)": "a N^-alpha + c", "L(D)": "a D^-alpha + c", "L(C)": "a C^-alpha + c",
        "L(N,D)": "E + A N^-alpha + B D^-beta"}


def _law(kind: str):
    if kind == "L(N,D)":
        return lambda p, x: p[0] + p[1] * x[..., 0] ** -p[2] + p[3] * x[..., 1] ** -p[4]
    return lambda p, x: p[0] * x ** -p[1] + p[2]


# --- fitting in scaled units ------------------------------------------------------------------
def _solve(fun, jac, starts: list[np.ndarray], lower, upper):
    """Best of ``least_squares`` from each start (soft_l1 on log residuals)."""
    from scipy.optimize import least_squares  # noqa: PLC0415

    best = None
    for p0 in starts:
        p0 = np.clip(p0, lower + 1e-9, upper - 1e-9)
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            r = least_squares(fun, p0, jac=jac, bounds=(lower, upper), loss="soft_l1", f_scale=0.1,
                              max_nfev=500)
        if best is None or r.cost < best.cost:
            best = r
    return best


def _single(u: np.ndarray, v: np.ndarray, starts=None):
    """``v = exp(la) u^-alpha + c`` in scaled units; params ``[la, alpha, c]``."""
    lv, lu = np.log(v), np.log(u)

    def fun(p):
        return np.log(np.maximum(np.exp(p[0]) * u ** -p[1] + p[2], 1e-300)) - lv

    def jac(p):  # d log(model) / d params
        t = np.exp(p[0]) * u ** -p[1]
        return np.stack([t, -lu * t, np.ones_like(t)], axis=1) / np.maximum(t + p[2], 1e-300)[:, None]

    lower, upper = np.array([-30.0, BOUNDS[0], 0.0]), np.array([30.0, BOUNDS[1], float(v.max())])
    if starts is None:
        starts = [np.array([np.log(max(v.max() - c, 1e-6)), a, c])
                  for a in (0.1, 0.3, 0.7, 1.2) for c in (0.0, 0.5 * float(v.min()), 0.9 * float(v.min()))]
    return _solve(fun, jac, starts, lower, upper)


def _joint(u: np.ndarray, v: np.ndarray, starts=None):
    """``v = E + exp(lA) n^-alpha + exp(lB) d^-beta`` in scaled units; ``[E, lA, alpha, lB, beta]``."""
    lv, ln, ld = np.log(v), np.log(u[:, 0]), np.log(u[:, 1])

    def terms(p):
        return np.exp(p[1]) * u[:, 0] ** -p[2], np.exp(p[3]) * u[:, 1] ** -p[4]

    def fun(p):
        tn, td = terms(p)
        return np.log(np.maximum(p[0] + tn + td, 1e-300)) - lv

    def jac(p):
        tn, td = terms(p)
        cols = [np.ones_like(tn), tn, -ln * tn, td, -ld * td]
        return np.stack(cols, axis=1) / np.maximum(p[0] + tn + td, 1e-300)[:, None]

    lower = np.array([0.0, -30.0, BOUNDS[0], -30.0, BOUNDS[0]])
    upper = np.array([float(v.max()), 30.0, BOUNDS[1], 30.0, BOUNDS[1]])
    if starts is None:
        half = np.log(0.5 * float(v.max()))
        starts = [np.array([e, half, a, half, b]) for a in (0.2, 0.5, 1.0) for b in (0.2, 0.5, 1.0)
                  for e in (0.0, 0.5 * float(v.min()))]
    return _solve(fun, jac, starts, lower, upper)


def _unscale(kind: str, q: np.ndarray, x0, y0: float) -> np.ndarray:
    """Scaled parameters -> data units."""
    if kind == "L(N,D)":
        return np.array([q[0] * y0, np.exp(q[1]) * y0 * x0[0] ** q[2], q[2],
                         np.exp(q[3]) * y0 * x0[1] ** q[4], q[4]])
    return np.array([np.exp(q[0]) * y0 * x0 ** q[1], q[1], q[2] * y0])


def fit_law(kind: str, x, y, reps: int = 300, seed: int = 0) -> Fit:
    """Fit ``kind`` (``L(N)``, ``L(D)``, ``L(C)``: ``x [n]``; ``L(N,D)``: ``x [n, 2]``) to ``y``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    joint = kind == "L(N,D)"
    names = ["E", "A", "alpha", "B", "beta"] if joint else ["a", "alpha", "c"]
    exps = ["alpha", "beta"] if joint else ["alpha"]
    x0 = np.exp(np.log(x).mean(axis=0))
    y0 = float(np.exp(np.log(y).mean()))
    u, v = x / x0, y / y0
    solve = _joint if joint else _single
    best = solve(u, v)
    params = _unscale(kind, best.x, x0, y0)
    samples = _bootstrap(solve, u, v, best.x, reps, seed, kind, x0, y0, need=len(names))
    ci = {k: np.percentile(samples[:, i], LEVEL).tolist() if len(samples) else [float("nan")] * 2
          for i, k in enumerate(names)}
    cond = float(np.linalg.cond(best.jac)) if best.jac.size else float("inf")
    fit = Fit(kind, names, dict(zip(names, params.tolist())), ci, x, y, [], samples, cond)
    fit.warnings = _diagnose(fit, exps, reps)
    return fit


def _bootstrap(solve, u, v, start, reps, seed, kind, x0, y0, need: int) -> np.ndarray:
    """Parameters refitted on ``reps`` resamples of the points (data units); resamples with
    fewer distinct points than parameters are skipped."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(reps):
        idx = rng.integers(0, len(v), len(v))
        if len(np.unique(idx)) < need:
            continue
        r = solve(u[idx], v[idx], starts=[start])
        out.append(_unscale(kind, r.x, x0, y0))
    return np.array(out).reshape(-1, len(start))


def _diagnose(fit: Fit, exponents: list[str], reps: int) -> list[str]:
    """Why a fit should not be trusted: too few points, exponents at a bound, wide bands."""
    out = []
    n, p = len(fit.y), len(fit.names)
    if n < p + 2:
        out.append(f"{fit.kind}: {n} points for {p} parameters; the fit (nearly) interpolates and "
                   "its intervals mean little; add points to the grid")
    for k in exponents:
        v = fit.params[k]
        if v <= BOUNDS[0] * 1.5 or v >= BOUNDS[1] * 0.98:
            out.append(f"{fit.kind}: exponent {k} = {v:.3g} is at its bound {BOUNDS}: the data do not "
                       "constrain it (flat or too steep over this range)")
        lo, hi = fit.ci[k]
        if not np.isfinite(hi - lo) or hi - lo > abs(v):
            out.append(f"{fit.kind}: the 95% interval of {k} [{lo:.3g}, {hi:.3g}] is wider than its value "
                       f"{v:.3g}")
    if len(fit.samples) < 0.5 * reps:
        out.append(f"{fit.kind}: only {len(fit.samples)} of {reps} bootstrap resamples were usable")
    if fit.cond > 1e8:
        out.append(f"{fit.kind}: the Jacobian is ill-conditioned (condition number {fit.cond:.2g}): "
                   "parameters trade off against each other")
    return out


# --- compute-optimal allocation -------------------------------------------------------------
def optimal_n(params: np.ndarray, compute: np.ndarray, k: float) -> np.ndarray:
    """N*(C) of the ``L(N,D)`` parameters ``[E, A, alpha, B, beta]`` under ``C = k N D``."""
    _, a, alpha, b, beta = params
    g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
    return g * (np.asarray(compute, np.float64) / k) ** (beta / (alpha + beta))


def frontier(joint: Fit, k: float, compute: np.ndarray) -> dict:
    """N*(C), D*(C) at ``compute`` with 95% bands, and the allocation exponents."""
    n = optimal_n(np.array([joint.params[q] for q in joint.names]), compute, k)
    draws = np.stack([optimal_n(s, compute, k) for s in joint.samples]) if len(joint.samples) else n[None]
    lo, hi = np.percentile(draws, LEVEL, axis=0)
    alpha, beta = joint.params["alpha"], joint.params["beta"]
    share = joint.samples[:, 4] / (joint.samples[:, 2] + joint.samples[:, 4]) if len(joint.samples) else []
    return {"k_flops_per_atom_per_parameter": k, "assumption": "C = k N D, one pass over the data",
            "N_exponent": beta / (alpha + beta), "D_exponent": alpha / (alpha + beta),
            "N_exponent_ci95": np.percentile(share, LEVEL).tolist() if len(share) else None,
            "C": np.asarray(compute).tolist(), "N_opt": n.tolist(), "N_opt_ci95": [lo.tolist(), hi.tolist()],
            "D_opt": (compute / (k * n)).tolist(),
            "D_opt_ci95": [(compute / (k * hi)).tolist(), (compute / (k * lo)).tolist()]}


def pareto(c: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the compute frontier: points with a loss below every cheaper point's."""
    order = np.argsort(c, kind="stable")
    keep, best = [], np.inf
    for i in order:
        if y[i] < best:
            keep.append(i)
            best = y[i]
    return np.array(keep, dtype=np.int64)
