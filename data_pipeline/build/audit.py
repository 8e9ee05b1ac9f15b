"""Elemental reference energies per fidelity, fitted robustly, and an audit of the residuals.

For each fidelity the driver fits ``E ~ sum_Z n_Z e_Z`` over the staged record tables
(:class:`data_pipeline.build.stats.RecordTable`) and looks at the residual energy per atom
``r = (E - sum_Z n_Z e_Z) / N`` of every record:

- **Per-element scaling.** The normal equations are solved after scaling each element's
  column to unit norm, and the ridge (``recipe.reference_ridge``) is relative to that
  element's own weight, so a rare element with a large reference (an all-electron
  oxygen at -2041 eV among thousands of hydrogens) is not pulled toward zero by a ridge
  sized to the common ones.
- **Outliers.** A record whose ``r`` lies more than ``k`` scaled median absolute
  deviations from the fidelity's median (``k = recipe.reference_outlier_mads``; the
  MAD times 1.4826 is the standard deviation of a normal distribution), and more than
  ``recipe.reference_outlier_floor`` eV/atom from it, is left out of the fit, which is
  repeated until that set no longer changes. The median and MAD are of all records with
  an energy under the current fit, so one corrupted total energy cannot hide itself by
  widening them. Such a record is *unusual*, not necessarily wrong: an isolated atom
  sits at its element's cohesive energy (up to ~9 eV/atom) from bulk-fitted references,
  clusters, surfaces and hot or rattled cells far from the median of near-equilibrium
  data. It is rejected as ``reference_outlier`` only beyond
  ``recipe.reference_outlier_bound`` eV/atom, which no physical structure reaches (a
  corrupted value, a unit slip on one record); the others are kept in the shards and
  reported (count and examples in the manifest, a build warning).
- **Audit.** Each dataset x fidelity group reports its residual distribution (mean, std,
  median, MAD, 1st/99th percentile), and is flagged when its residuals form two clusters
  (e.g. +U and plain calculations under one label) or when its median sits apart from
  the other datasets of the same fidelity.

Each pass streams the tables, so memory grows with the number of elements and the
bounded residual samples (:data:`SAMPLE`), not with the records.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from data_pipeline.build.stats import N_Z, composition

MAD_SCALE = 1.4826  # sigma of a normal distribution / its median absolute deviation
SAMPLE = 1_000_000  # residuals kept per fidelity (and per group) for quantiles
MAX_ITERATIONS = 10
CLUSTER_SEPARATION = 5.0  # 2-means split: |m1 - m2| / pooled within-cluster std
CLUSTER_MIN_FRACTION = 0.05
OFFSET_SCALES = 3.0  # a group's median this many scaled MADs from the fidelity's is flagged
UNUSUAL_EXAMPLES = 10  # unusual records named in the manifest, farthest first
POOLED = "*"  # key of the whole fidelity's residual distribution among the groups


@dataclasses.dataclass
class FidelityFit:
    """Outcome of one fidelity's robust reference fit."""

    elements: np.ndarray  # atomic numbers, columns of coef
    coef: np.ndarray  # eV per atom of each element
    fitted: np.ndarray  # bool per element: in a kept record with an energy (else coef 0)
    drops: dict[int, np.ndarray]  # unit id -> rows rejected as reference_outlier
    details: dict[int, list[str]]  # unit id -> detail text of each dropped row
    unusual: dict[int, np.ndarray]  # unit id -> rows kept in the shards but left out of the fit
    unusual_residuals: dict[int, np.ndarray]  # unit id -> their residual per atom minus the median
    rule: dict  # the outlier rule with its numbers
    groups: dict[str, dict]  # dataset -> residual distribution of its kept records
    n: int  # records in the final fit
    rms: float | None  # RMS residual per structure, eV


class _Tables:
    """The staged tables of one fidelity, loaded per pass (kept in memory when small)."""

    CACHE_RECORDS = 2_000_000

    def __init__(self, units: list[tuple[int, str, object]], load: Callable):
        self.units, self.load = units, load  # (unit id, dataset, path)
        self.paths = {uid: path for uid, _, path in units}
        self.cache: dict[int, dict] | None = {}
        self.matrices: dict[int, object] = {}
        self.counts: dict[int, int] = {}
        seen, fitted = np.zeros(N_Z, bool), np.zeros(N_Z, bool)
        for uid, _, _ in units:
            t = self.table(uid)
            has = ~np.isnan(t["energy"])
            self.counts[uid] = int(has.sum())
            seen[t["z"]] = True
            fitted[t["z"][np.repeat(has, np.diff(t["ptr"]))]] = True
        self.elements = np.flatnonzero(seen)  # composition columns: every element present
        self.fitted = fitted[self.elements]  # those in a record with an energy

    def table(self, uid: int) -> dict:
        if self.cache is not None and uid in self.cache:
            return self.cache[uid]
        t = self.load(self.paths[uid])
        if self.cache is not None:
            self.cache[uid] = t
            if sum(len(c["energy"]) for c in self.cache.values()) > self.CACHE_RECORDS:
                self.cache = None  # too big to hold: stream from disk from now on
                self.matrices.clear()
        return t

    def matrix(self, uid: int, table: dict):
        """The composition matrix of unit ``uid``'s table (kept with the tables when they
        are cached: each fit pass needs it, and building it was most of the audit's time)."""
        if self.cache is None:
            return composition(table, self.elements)
        if uid not in self.matrices:
            self.matrices[uid] = composition(table, self.elements)
        return self.matrices[uid]

    def residuals(self, coef: np.ndarray):
        """``(uid, dataset, residual per atom [n], total residual [n])``; NaN: no energy."""
        for uid, dataset, _ in self.units:
            t = self.table(uid)
            total = t["energy"] - self.matrix(uid, t) @ coef
            yield uid, dataset, total / t["n_atoms"], total


def _solve(ata: np.ndarray, atb: np.ndarray, ridge: float) -> np.ndarray:
    """Ridge solution after scaling each column to unit norm (elements absent: 0)."""
    scale = np.sqrt(np.diag(ata))
    live = scale > 0
    coef = np.zeros(len(scale))
    s = scale[live]
    m = ata[np.ix_(live, live)] / np.outer(s, s) + ridge * np.eye(int(live.sum()))
    try:
        if ridge <= 0:
            raise np.linalg.LinAlgError
        y = np.linalg.solve(m, atb[live] / s)
    except np.linalg.LinAlgError:  # no ridge, or singular: the minimum-norm solution
        y = np.linalg.lstsq(m, atb[live] / s, rcond=None)[0]
    coef[live] = y / s
    return coef


def _normal_equations(tables: _Tables, drops: dict[int, np.ndarray]):
    k = len(tables.elements)
    ata, atb, n = np.zeros((k, k)), np.zeros(k), 0
    for uid, _, _ in tables.units:
        t = tables.table(uid)
        keep = ~np.isnan(t["energy"])
        keep[drops.get(uid, [])] = False
        a = tables.matrix(uid, t)[keep]
        ata += (a.T @ a).toarray()
        atb += a.T @ t["energy"][keep]
        n += int(keep.sum())
    return ata, atb, n


def _strided(values: np.ndarray, stride: int) -> np.ndarray:
    return values[::stride] if stride > 1 else values


def fit_fidelity(tables: _Tables, ridge: float, mads: float | None, floor: float,
                 bound: float | None = None) -> FidelityFit:
    """Fit, leave outliers out, refit until that set is stable; reject those beyond
    ``bound`` (all of them when None); then audit the groups."""
    coef = _solve(*_normal_equations(tables, {})[:2], ridge)
    drops: dict[int, np.ndarray] = {}
    total = sum(tables.counts.values())
    enough = total >= 10 + 2 * len(tables.elements)
    rule = {"mads": mads, "floor": floor, "iterations": 0, "converged": True}
    for it in range(MAX_ITERATIONS if (mads is not None and enough) else 0):
        sample = np.concatenate([_strided(r[~np.isnan(r)], max(1, math.ceil(total / SAMPLE)))
                                 for _, _, r, _ in tables.residuals(coef)])
        median = float(np.median(sample))
        mad = float(np.median(np.abs(sample - median)))
        threshold = max(mads * MAD_SCALE * mad, floor)
        new = {uid: np.flatnonzero(np.abs(r - median) > threshold)  # NaN compares False
               for uid, _, r, _ in tables.residuals(coef)}
        new = {uid: rows for uid, rows in new.items() if len(rows)}
        rule.update(median=median, mad=mad, threshold=threshold, iterations=it + 1)
        if new.keys() == drops.keys() and all(np.array_equal(new[u], drops[u]) for u in new):
            break
        drops = new
        coef = _solve(*_normal_equations(tables, drops)[:2], ridge)
    else:
        rule["converged"] = not (mads is not None and enough)
    if mads is not None and not enough:
        rule["skipped"] = f"too few structures ({total}) for {len(tables.elements)} elements"
    rule["bound"] = bound
    rejected, unusual, far, details = {}, {}, {}, {}
    groups, n, sq = _audit_groups(tables, coef, drops, rule, (rejected, unusual, far, details))
    rule["unusual"] = int(sum(map(len, unusual.values())))
    kept = _normal_equations(tables, drops)[0] if drops else None
    fitted = tables.fitted if kept is None else np.diag(kept) > 0
    return FidelityFit(tables.elements, coef, fitted, rejected, details, unusual, far, rule, groups, n,
                       math.sqrt(sq / n) if n else None)


def _audit_groups(tables: _Tables, coef, drops, rule, split):
    """Residual distribution per dataset of the records in the fit (not ``drops``), in the
    same pass over the tables as the split of ``drops`` into ``split = (rejected, unusual,
    residual minus median of the unusual, detail text of the rejected)``: rejected beyond
    ``rule["bound"]`` (all of them when it is None), the others unusual."""
    rejected, unusual, far, details = split
    bound = rule.get("bound")
    samples: dict[str, list] = {}
    moments: dict[str, list] = {}
    n, sq = 0, 0.0
    stride = {d: max(1, math.ceil(sum(tables.counts[u] for u, dd, _ in tables.units if dd == d)
                                  / SAMPLE)) for _, d, _ in tables.units}
    for uid, dataset, r, total in tables.residuals(coef):
        rows = drops.get(uid)
        if rows is not None:
            dev = r[rows] - rule["median"]
            beyond = np.abs(dev) > max(bound, rule["threshold"]) if bound is not None else np.ones(len(rows), bool)
            if beyond.any():
                rejected[uid] = rows[beyond]
                details[uid] = []
            if not beyond.all():
                unusual[uid], far[uid] = rows[~beyond], dev[~beyond]
        for row in rejected.get(uid, []):
            details[uid].append(
                f"energy per atom after references {r[row]:.6g} eV, fidelity median "
                f"{rule['median']:.6g}, MAD {rule['mad']:.4g}; |r - median| > "
                f"{rule['mads']:g} x 1.4826 x MAD = {rule['threshold']:.4g} eV/atom"
                + (f" and > reference_outlier_bound = {rule['bound']:g} eV/atom" if rule.get("bound") else ""))
        keep = ~np.isnan(r)
        keep[drops.get(uid, [])] = False
        samples.setdefault(dataset, []).append(_strided(r[keep], stride[dataset]))
        m = moments.setdefault(dataset, [0, 0.0, 0.0])
        m[0] += int(keep.sum())  # count, sum, sum of squares (residuals are O(1) eV: no cancellation)
        m[1] += float(r[keep].sum())
        m[2] += float((r[keep] ** 2).sum())
        n += int(keep.sum())
        sq += float(total[keep] @ total[keep])
    groups = {d: _distribution(np.concatenate(samples[d]), *moments[d]) for d in samples}
    pooled_stride = max(1, math.ceil(sum(tables.counts.values()) / SAMPLE))
    pooled = [_strided(np.concatenate(samples[d]), max(1, pooled_stride // stride[d])) for d in samples]
    totals = np.array([moments[d] for d in samples]).sum(axis=0) if samples else (0, 0.0, 0.0)
    groups[POOLED] = _distribution(np.concatenate(pooled) if pooled else np.zeros(0), *totals)
    return groups, n, sq


def _distribution(sample: np.ndarray, n: int, s1: float, s2: float) -> dict:
    """Mean/std (exact) and quantiles (of the sample) of a group's residuals per atom."""
    if n == 0:
        return {"structures": 0}
    mean = s1 / n
    median = float(np.median(sample))
    return {
        "structures": n, "mean": mean, "std": math.sqrt(max(s2 / n - mean * mean, 0.0)),
        "median": median, "mad": float(np.median(np.abs(sample - median))),
        "p01": float(np.quantile(sample, 0.01)), "p99": float(np.quantile(sample, 0.99)),
        "min": float(sample.min()), "max": float(sample.max()),
        "clusters": two_clusters(sample),
    }


def two_clusters(sample: np.ndarray) -> dict | None:
    """The best split of a 1-D sample into two clusters (2-means), with its separation.

    Returns None for fewer than 20 values, else ``{"fractions", "centers", "separation"}``
    where separation is ``|m1 - m2| / sqrt((s1^2 + s2^2) / 2)``: about 2.7 for a normal
    distribution's own halves and 3.5 for a uniform one's, so a value above
    :data:`CLUSTER_SEPARATION` means two separate populations.
    """
    x = np.sort(sample - np.median(sample)) if len(sample) >= 20 else None
    if x is None:
        return None
    n = len(x)
    lo = max(1, math.ceil(CLUSTER_MIN_FRACTION * n))
    c1, c2 = np.cumsum(x), np.cumsum(x * x)
    k = np.arange(lo, n - lo + 1)  # left cluster x[:k]
    within = (c2[k - 1] - c1[k - 1] ** 2 / k) + (c2[-1] - c2[k - 1] - (c1[-1] - c1[k - 1]) ** 2 / (n - k))
    best = int(k[np.argmin(within)])
    left, right = x[:best], x[best:]
    spread = math.sqrt((left.var() + right.var()) / 2)
    gap = float(right.mean() - left.mean())
    shift = float(np.median(sample))
    return {"fractions": [best / n, 1 - best / n],
            "centers": [float(left.mean()) + shift, float(right.mean()) + shift],
            "separation": gap / spread if spread > 0 else math.inf}


def flag_groups(fidelity: str, groups: dict[str, dict], floor: float) -> list[str]:
    """Warnings for the groups of one fidelity: two clusters, or a median apart from the others.

    ``groups[POOLED]`` is the fidelity as a whole: a dataset's offset is its median minus
    the fidelity's (the majority's view), flagged beyond :data:`OFFSET_SCALES` scaled MADs.
    """
    warnings = []
    for dataset, g in groups.items():
        c = g.get("clusters") if dataset != POOLED else None
        if c and c["separation"] > CLUSTER_SEPARATION and abs(c["centers"][1] - c["centers"][0]) > 5 * floor:
            g.setdefault("flags", []).append("clusters")
            warnings.append(
                f"{dataset}/{fidelity}: residuals per atom form two clusters at "
                f"{c['centers'][0]:.4g} and {c['centers'][1]:.4g} eV ({c['fractions'][0]:.0%} / "
                f"{c['fractions'][1]:.0%}, separation {c['separation']:.1f}); are two levels of "
                f"theory (e.g. +U and plain) mixed under one fidelity label?")
    pooled = groups.get(POOLED)
    for dataset, g in groups.items():
        if dataset == POOLED or not g["structures"] or len(groups) < 3:
            continue  # fewer than two datasets (POOLED is one of the entries): no "others"
        spread = MAD_SCALE * max(g["mad"], pooled["mad"])
        g["offset"] = g["median"] - pooled["median"]
        if abs(g["offset"]) > max(OFFSET_SCALES * spread, 5 * floor):
            g.setdefault("flags", []).append("offset")
            warnings.append(
                f"{dataset}/{fidelity}: median residual per atom {g['median']:.4g} eV is "
                f"{g['offset']:+.4g} eV from the median of all of {fidelity} ({pooled['median']:.4g}); "
                f"different settings (pseudopotentials, +U, code) under one label?")
    return warnings


@dataclasses.dataclass
class Audit:
    """What the driver does with the fits: drop rows, write rejects, fill the manifest."""

    drops: dict[int, np.ndarray]  # unit id -> rows of its index not to write
    rejects: dict[int, list[dict]]  # unit id -> rejects.jsonl lines
    references: dict[str, dict]  # manifest "element_references"
    residuals: dict[tuple[str, str], dict]  # (dataset, fidelity) -> residual distribution
    warnings: list[str]


def audit_references(recipe, units, table_path: Callable[[int], object], load: Callable) -> Audit:
    """Fit every fidelity of a build's staged tables; see the module docstring."""
    from ase.data import chemical_symbols  # noqa: PLC0415

    audit = Audit({}, {}, {}, {}, [])
    for fid in recipe.fidelities():
        members = [(uid, recipe.sources[u.source].dataset, table_path(uid))
                   for uid, u in enumerate(units) if recipe.sources[u.source].fidelity == fid]
        fit = fit_fidelity(_Tables(members, load), recipe.reference_ridge,
                           recipe.reference_outlier_mads, recipe.reference_outlier_floor,
                           recipe.reference_outlier_bound)
        for uid, rows in fit.drops.items():
            audit.drops[uid] = rows
            frames = load(table_path(uid))["frame"][rows]
            where = {"offset": units[uid].start} if units[uid].byte_range and units[uid].start else {}
            audit.rejects[uid] = [{"file": units[uid].rel, "index": int(i), "reason": "reference_outlier",
                                   "detail": d, **where} for i, d in zip(frames, fit.details[uid])]
        audit.references[fid] = {
            "energies": {chemical_symbols[z]: float(c)
                         for z, c, ok in zip(fit.elements, fit.coef, fit.fitted) if ok},
            "rms_residual": fit.rms, "structures": fit.n, "ridge": recipe.reference_ridge,
            "units": "eV", "outliers": {**fit.rule, "rejected": int(sum(map(len, fit.drops.values())))},
        }
        if fit.unusual:
            examples = []
            for uid, rows in fit.unusual.items():
                frames = load(table_path(uid))["frame"][rows]
                examples += [{"file": units[uid].rel, "index": int(i), "residual_minus_median": float(d)}
                             for i, d in zip(frames, fit.unusual_residuals[uid])]
            examples.sort(key=lambda e: -abs(e["residual_minus_median"]))
            audit.references[fid]["outliers"]["unusual_examples"] = examples[:UNUSUAL_EXAMPLES]
            worst = examples[0]
            audit.warnings.append(
                f"{fid}: {len(examples)} record(s) lie beyond {fit.rule['threshold']:.3g} eV/atom of the "
                f"fidelity's median after references (e.g. {worst['file']} frame {worst['index']}: "
                f"{worst['residual_minus_median']:+.3g} eV/atom): kept, left out of the reference fit "
                "(isolated atoms, clusters, surfaces, hot cells?); only beyond reference_outlier_bound "
                f"= {fit.rule['bound']:g} eV/atom is a record rejected")
        audit.warnings += flag_groups(fid, fit.groups, recipe.reference_outlier_floor)
        audit.references[fid]["residual_per_atom"] = fit.groups.pop(POOLED)
        for dataset, g in fit.groups.items():
            audit.residuals[(dataset, fid)] = g
    return audit
