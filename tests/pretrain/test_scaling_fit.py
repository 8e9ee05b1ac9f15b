"""Power-law fits on synthetic loss tables with known exponents and noise: the truth lies
within the bootstrap intervals, the frontier follows, bad designs are warned about."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.scaling import report
from pretrain.scaling.fit import fit_law, frontier, pareto

REPS = 100


def noisy(y, sigma, seed):
    return y * np.exp(np.random.default_rng(seed).normal(0, sigma, len(y)))


@pytest.mark.parametrize("seed", [0, 1])
def test_single_law_recovers_exponent_and_offset_within_intervals(seed):
    n = np.geomspace(1e4, 1e8, 9)
    fit = fit_law("L(N)", n, noisy(3.0 * n ** -0.35 + 0.02, 0.03, seed), REPS, seed)
    lo, hi = fit.ci["alpha"]
    assert lo <= 0.35 <= hi and hi - lo < 0.2
    assert fit.ci["c"][0] <= 0.02 <= fit.ci["c"][1]
    assert fit.warnings == [] and len(fit.samples) == REPS
    assert abs(fit.predict(np.array([1e6]))[0] / (3.0 * 1e6 ** -0.35 + 0.02) - 1) < 0.05
    low, high = fit.band(n)
    assert np.all(low <= high) and np.all(low <= fit.predict(n) * 1.001)


def test_an_outlier_barely_moves_the_robust_fit():
    n = np.geomspace(1e4, 1e8, 10)
    y = noisy(2.0 * n ** -0.5 + 0.01, 0.02, 3)
    y[4] *= 3.0  # one diverged run
    fit = fit_law("L(N)", n, y, REPS)
    assert fit.ci["alpha"][0] <= 0.5 <= fit.ci["alpha"][1]


def test_joint_law_and_compute_optimal_allocation():
    ns, ds = np.meshgrid(np.geomspace(1e4, 1e7, 5), np.geomspace(1e5, 1e8, 4))
    x = np.stack([ns.ravel(), ds.ravel()], 1)
    truth = dict(E=0.01, A=2.0, alpha=0.3, B=5.0, beta=0.45)
    y = noisy(truth["E"] + truth["A"] * x[:, 0] ** -0.3 + truth["B"] * x[:, 1] ** -0.45, 0.02, 4)
    fit = fit_law("L(N,D)", x, y, REPS)
    for k in ("alpha", "beta", "E"):
        assert fit.ci[k][0] <= truth[k] <= fit.ci[k][1], (k, fit.ci[k])
    f = frontier(fit, 6.0, np.geomspace(1e12, 1e16, 5))
    assert f["N_exponent_ci95"][0] <= 0.45 / 0.75 <= f["N_exponent_ci95"][1]
    assert abs(f["N_exponent"] + f["D_exponent"] - 1) < 1e-12
    n_opt, c = np.array(f["N_opt"]), np.array(f["C"])
    assert np.allclose(6.0 * n_opt * np.array(f["D_opt"]), c)  # C = k N D on the frontier
    # N* really minimises the fitted loss at fixed compute
    for ci, ni in zip(c, n_opt):
        grid = ni * np.geomspace(0.3, 3, 41)
        losses = fit.predict(np.stack([grid, ci / (6.0 * grid)], 1))
        assert abs(np.argmin(losses) - 20) <= 1


def test_warnings_for_too_few_points_flat_data_and_wide_bands():
    n = np.geomspace(1e3, 1e5, 3)
    few = fit_law("L(N)", n, 1.0 * n ** -0.3 + 0.1, REPS)
    assert any("3 points for 3 parameters" in w for w in few.warnings)
    flat = fit_law("L(N)", np.geomspace(1e3, 1e6, 8), noisy(np.full(8, 0.5), 0.05, 5), REPS)
    assert any("at its bound" in w or "wider than its value" in w for w in flat.warnings)


def test_pareto_keeps_points_better_than_every_cheaper_one():
    c = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y = np.array([0.9, 0.95, 0.5, 0.6, 0.4])
    assert pareto(c, y).tolist() == [0, 2, 4]


def _rows():
    """A 4 x 3 grid (sizes x data) at one budget, plus a smaller budget, with known laws."""
    rows, rng = [], np.random.default_rng(7)
    for budget in (50, 100):
        for n in (1e3, 4e3, 1.6e4, 6.4e4):
            for d in (1e4, 1e5, 1e6):
                y = 0.02 + 3 * n ** -0.4 + 8 * d ** -0.35 + (0.05 if budget == 50 else 0)
                metrics = {f"val/{fid}/forces_mae": float(s * y * np.exp(rng.normal(0, 0.02)))
                           for fid, s in (("PBE", 1.0), ("r2SCAN", 2.0))}
                rows.append({"point": f"n{n:g}-d{d:g}-{budget}", "N": n, "D": d, "C": 1e3 * n * budget,
                             "flops_per_atom": 1e3 * n, "budget": float(budget), "metrics": metrics})
    return rows


def test_study_analysis_selects_points_per_law_and_writes_json_and_plots(tmp_path):
    from pretrain.scaling import plots

    rows = _rows()
    results = report.analyse(rows, "val/<fidelity>/forces_mae", reps=10)
    assert set(results) == {"PBE", "r2SCAN"}
    r = results["PBE"]
    assert len(r["fits"]["L(N)"].y) == 4 and set(r["fits"]["L(N)"].x) == {1e3, 4e3, 1.6e4, 6.4e4}
    assert len(r["fits"]["L(D)"].y) == 3 and any("3 points" in w for w in r["fits"]["L(D)"].warnings)
    assert len(r["fits"]["L(N,D)"].y) == 12  # only the largest budget
    assert r["fits"]["L(N,D)"].ci["alpha"][0] <= 0.4 <= r["fits"]["L(N,D)"].ci["alpha"][1]
    doc = report.to_json(results, {"points": len(rows)})
    json.dumps(doc)  # plain data
    assert doc["fidelities"]["r2SCAN"]["frontier"]["k_flops_per_atom_per_parameter"] == 1e3
    text = report.table(results)
    assert "L(N,D)" in text and "r2SCAN" in text and "warning [PBE] L(D)" in text
    assert report.metrics_of(results)["fit/PBE/L_ND/alpha"] > 0
    two_d = [row for row in rows if row["D"] != 1e6]
    one = report.analyse(two_d, "val/PBE/forces_mae", reps=10)
    assert list(one) == ["PBE"] and "2 distinct point(s)" in one["PBE"]["skipped"]["L(D)"]
    pbe = {"PBE": results["PBE"]}  # one row of panels: plotting costs seconds per fidelity
    for path in (plots.plot_fits(pbe, tmp_path), plots.plot_frontier(pbe, tmp_path)):
        assert path.stat().st_size > 20_000
    with pytest.raises(ValueError, match="no point logged"):
        report.analyse(rows, "val/{fidelity}/nothing", reps=10)


def test_card_section_of_a_study_point(tmp_path):
    rows = _rows()
    fit = tmp_path / "fit" / "fit.json"
    tags = {"scale.study": "s", "scale.point": rows[0]["point"], "scale.N": "1000", "scale.D": "10000",
            "scale.fit": str(fit)}
    assert "not been fitted yet" in "\n".join(report.card_lines({"tracking": {"tags": tags}}))
    results = report.analyse(rows, "val/PBE/forces_mae", reps=10)
    fit.parent.mkdir()
    fit.write_text(json.dumps(report.to_json(results, {"points": len(rows)})))
    text = "\n".join(report.card_lines({"tracking": {"tags": tags}}))
    alpha = results["PBE"]["fits"]["L(N)"].params["alpha"]
    assert "## Scaling study" in text and f"alpha {alpha:.3g}" in text and "N* ~ C^a" in text
    assert "1,000 parameters" in text and report.card_lines({"tracking": {"tags": None}}) == []
