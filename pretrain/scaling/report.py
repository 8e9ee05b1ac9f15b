"""From a study's finished points to fits per fidelity, the table, ``fit.json`` and the
model card's section.

A point (row) is ``{point, N, D, C, budget, metrics}``, read back from the study's MLflow
runs (tags ``scale.*`` and the runs' latest metrics). Which points each law is fitted on
is written in ``pretrain/scaling/fit.py``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from pretrain.scaling.fit import Fit, fit_law, frontier, pareto

MIN_POINTS = {"L(N)": 3, "L(D)": 3, "L(C)": 3, "L(N,D)": 5}


def rows_from_runs(runs: list[dict]) -> list[dict]:
    """Study points from MLflow runs tagged by ``scale run`` (finished ones only)."""
    rows = []
    for r in runs:
        t = r["tags"]
        if t.get("scale.status") != "finished":
            continue
        rows.append({"point": t["scale.point"], "N": float(t["scale.N"]), "D": float(t["scale.D"]),
                     "C": float(t["scale.C"]), "flops_per_atom": float(t["scale.flops_per_atom"]),
                     "budget": float(t["scale.budget"].split()[0]), "study": t.get("scale.study"),
                     "metrics": r["metrics"]})
    return rows


def fidelities_of(rows: list[dict], metric: str) -> dict[str, str]:
    """``{fidelity: metric name}``: ``metric`` with ``{fidelity}`` (or ``<fidelity>``) filled in
    from the metrics the points logged, or ``metric`` itself when it names one fidelity."""
    metric = metric.replace("<fidelity>", "{fidelity}")
    if "{fidelity}" not in metric:
        parts = metric.split("/")  # val/<fidelity>/forces_mae; a fidelity may hold a "/"
        return {"/".join(parts[1:-1]) if len(parts) >= 3 else metric: metric}
    head, tail = metric.split("{fidelity}")
    names = sorted({k[len(head):len(k) - len(tail)] for r in rows for k in r["metrics"]
                    if k.startswith(head) and k.endswith(tail) and len(k) > len(head) + len(tail)})
    return {f: metric.format(fidelity=f) for f in names}


def analyse(rows: list[dict], metric: str, reps: int = 300, seed: int = 0) -> dict:
    """Per fidelity: every law fitted on its points (or the reason it was not), the
    frontier, and all points for plotting."""
    if not rows:
        raise ValueError("no finished points to fit: run the study first (mlip-pretrain scale run)")
    names = fidelities_of(rows, metric)
    if not names:
        raise ValueError(f"no point logged a metric matching {metric!r}; "
                         f"logged: {sorted(rows[0]['metrics'])[:12]}")
    return {fid: _analyse_one([r for r in rows if math.isfinite(r["metrics"].get(m, float("nan")))], m, reps, seed)
            for fid, m in names.items()}


def _analyse_one(rows: list[dict], metric: str, reps: int, seed: int) -> dict:
    col = {k: np.array([r[k] for r in rows]) for k in ("N", "D", "C", "budget", "flops_per_atom")}
    y = np.array([r["metrics"][metric] for r in rows])
    top = col["budget"] == col["budget"].max()
    chosen = {"L(N)": top & (col["D"] == col["D"][top].max()),
              "L(D)": top & (col["N"] == col["N"][top].max()),
              "L(N,D)": top}
    frontier_idx = pareto(col["C"], y)
    fits, skipped = {}, {}
    for kind, x in (("L(N)", col["N"]), ("L(D)", col["D"]), ("L(C)", col["C"]), ("L(N,D)", None)):
        idx = frontier_idx if kind == "L(C)" else np.flatnonzero(chosen[kind])
        xs = np.stack([col["N"], col["D"]], 1)[idx] if x is None else x[idx]
        distinct = len(np.unique(xs, axis=0))
        if distinct < MIN_POINTS[kind]:
            skipped[kind] = (f"{kind}: {distinct} distinct point(s), at least {MIN_POINTS[kind]} needed; "
                             "add sizes, fractions or budgets to the grid")
            continue
        fits[kind] = fit_law(kind, xs, y[idx], reps, seed)
    out = {"metric": metric, "fits": fits, "skipped": skipped,
           "all": {"N": col["N"], "D": col["D"], "C": col["C"], "y": y, "points": [r["point"] for r in rows]}}
    if "L(N,D)" in fits:
        k = float(np.median(col["flops_per_atom"] / col["N"]))
        out["frontier"] = frontier(fits["L(N,D)"], k, np.geomspace(col["C"].min(), 100 * col["C"].max(), 30))
    return out


def to_json(results: dict, source: dict) -> dict:
    """``fit.json``: the source, and per fidelity each law, skipped laws, warnings, frontier."""
    out = {"source": source, "fidelities": {}}
    for fid, r in results.items():
        out["fidelities"][fid] = {
            "metric": r["metric"], "fits": {k: f.to_json() for k, f in r["fits"].items()},
            "skipped": r["skipped"], "frontier": r.get("frontier"),
            "points": [{"point": p, "N": float(n), "D": float(d), "C": float(c), "value": float(v)}
                       for p, n, d, c, v in zip(r["all"]["points"], r["all"]["N"], r["all"]["D"],
                                                r["all"]["C"], r["all"]["y"])]}
    return out


def _ci(fit: Fit, key: str) -> str:
    lo, hi = fit.ci[key]
    return f"{fit.params[key]:.3g} [{lo:.3g}, {hi:.3g}]"


def table(results: dict) -> str:
    """The fits as a text table (exponents with 95% intervals), then every warning."""
    lines = [f"{'fidelity':<12} {'law':<8} {'pts':>3}  {'exponent(s), 95% CI':<44} offset",
             "-" * 84]
    notes = []
    for fid, r in results.items():
        for kind, f in r["fits"].items():
            if kind == "L(N,D)":
                exps, off = f"alpha {_ci(f, 'alpha')}  beta {_ci(f, 'beta')}", _ci(f, "E")
            else:
                exps, off = f"alpha {_ci(f, 'alpha')}", _ci(f, "c")
            lines.append(f"{fid:<12} {kind:<8} {len(f.y):>3}  {exps:<44} {off}")
            notes += [f"warning [{fid}] {w}" for w in f.warnings]
        notes += [f"skipped [{fid}] {s}" for s in r["skipped"].values()]
        fr = r.get("frontier")
        if fr:
            lines.append(f"{fid:<12} optimal  N* ~ C^{fr['N_exponent']:.2f}, D* ~ C^{fr['D_exponent']:.2f} "
                         f"(C = k N D, k = {fr['k_flops_per_atom_per_parameter']:.3g} FLOP/atom/param)")
    return "\n".join(lines + notes)


def metrics_of(results: dict) -> dict[str, float]:
    """Flat MLflow metrics: ``fit/<fidelity>/<law>/<param>`` and the frontier exponents."""
    out = {}
    for fid, r in results.items():
        for kind, f in r["fits"].items():
            law = kind.replace("(", "_").replace(")", "").replace(",", "")
            for k, v in f.params.items():
                out[f"fit/{fid}/{law}/{k}"] = v
        if r.get("frontier"):
            out[f"fit/{fid}/N_opt_exponent"] = r["frontier"]["N_exponent"]
            out[f"fit/{fid}/D_opt_exponent"] = r["frontier"]["D_exponent"]
    # MLflow metric names allow letters, digits and _-./ :, fidelity names may hold more
    return {re.sub(r"[^\w./\- :]", "_", k): v for k, v in out.items()}


def card_lines(train_config: dict) -> list[str]:
    """The model card's ``Scaling study`` section for a run that was a study's point
    (tags ``scale.*`` in its config), from the study's ``fit.json``; [] otherwise."""
    tags = (train_config.get("tracking") or {}).get("tags") or {}
    if "scale.study" not in tags:
        return []
    lines = ["## Scaling study", "",
             f"This model is point `{tags.get('scale.point')}` of scaling study `{tags['scale.study']}` "
             f"(N = {int(float(tags.get('scale.N', 0))):,} parameters, D = {int(float(tags.get('scale.D', 0))):,} "
             "distinct training atoms).", ""]
    path = Path(tags.get("scale.fit", ""))
    if not path.is_file():
        return lines + [f"The study has not been fitted yet (`mlip-pretrain scale fit`; expected {path}).", ""]
    fit = json.loads(path.read_text())
    lines += [f"Fitted exponents ({fit['source'].get('points', '?')} points, 95% bootstrap intervals; "
              f"from `{path}`):", "", "| fidelity | metric | law | exponents | warnings |", "|---|---|---|---|---:|"]
    for fid, r in fit["fidelities"].items():
        for kind, f in r["fits"].items():
            exps = ", ".join(f"{k} {f['params'][k]:.3g} [{f['ci95'][k][0]:.3g}, {f['ci95'][k][1]:.3g}]"
                             for k in ("alpha", "beta") if k in f["params"])
            lines.append(f"| {fid} | {r['metric']} | {kind} = {f['law']} | {exps} | {len(f['warnings'])} |")
        if r.get("frontier"):
            fr = r["frontier"]
            lines.append(f"| {fid} | compute-optimal | N* ~ C^a, D* ~ C^b | a {fr['N_exponent']:.3g}, "
                         f"b {fr['D_exponent']:.3g} | - |")
    return lines + [""]
