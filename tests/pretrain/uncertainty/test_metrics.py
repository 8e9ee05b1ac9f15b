"""Calibration and its scores on synthetic errors whose true noise is known."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.uncertainty.fit import conformal_scale, gaussian_scale
from pretrain.uncertainty.metrics import score, spearman


def _heteroscedastic(n: int, true_scale: float, seed: int = 0):
    """Raw sigmas spread over two decades; residuals drawn with sigma = true_scale * raw."""
    rng = np.random.default_rng(seed)
    raw = np.exp(rng.uniform(np.log(0.01), np.log(1.0), n))
    res = rng.normal(0.0, true_scale * raw[:, None], (n, 3))
    return res, raw


@pytest.mark.parametrize("true_scale", [0.3, 7.0])
def test_calibration_recovers_the_true_noise(true_scale):
    res, raw = _heteroscedastic(20000, true_scale)
    assert gaussian_scale(res, raw**2)[0] == pytest.approx(true_scale, rel=0.02)
    assert conformal_scale(res, raw**2) == pytest.approx(true_scale, rel=0.03)
    # scored on fresh draws with the fitted scale: calibrated
    fresh, fresh_raw = _heteroscedastic(20000, true_scale, seed=1)
    m = score(fresh, conformal_scale(res, raw**2) * fresh_raw)
    assert m["coverage_95"] == pytest.approx(0.95, abs=0.01)
    assert m["coverage_68"] == pytest.approx(0.6827, abs=0.015)
    assert m["miscalibration_area"] < 0.02
    assert m["spearman"] > 0.6  # the raw sigmas rank the errors
    assert m["nll"] == pytest.approx(np.mean(0.5 * np.log(2 * np.pi * (true_scale * fresh_raw) ** 2)) + 0.5, abs=0.02)


def test_scores_catch_bad_uncertainty():
    """A constant sigma ranks nothing; a sigma 3x too small covers far less than 95%."""
    res, raw = _heteroscedastic(5000, 1.0)
    flat = score(res, np.full(len(raw), raw.mean()))
    assert abs(flat["spearman"]) < 0.1 or np.isnan(flat["spearman"])
    small = score(res, raw / 3)
    assert small["coverage_95"] < 0.6 and small["miscalibration_area"] > 0.2


def test_conformal_scale_covers_heavy_tails_where_the_gaussian_scale_over_covers():
    """Student-t errors: the variance-matching scale widens every interval (over 95%), the
    conformal one covers 95% of new items."""
    rng = np.random.default_rng(2)
    raw = np.exp(rng.uniform(-2, 0, 40000))
    res = raw[:, None] * rng.standard_t(2.5, (40000, 3))
    fit, fresh = slice(0, 20000), slice(20000, None)
    gauss = score(res[fresh], gaussian_scale(res[fit], raw[fit] ** 2)[0] * raw[fresh])
    conf = score(res[fresh], conformal_scale(res[fit], raw[fit] ** 2) * raw[fresh])
    assert gauss["coverage_95"] > 0.958  # 0.961 measured
    assert conf["coverage_95"] == pytest.approx(0.95, abs=0.01)


def test_spearman_handles_ties_and_tiny_inputs():
    assert spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([10.0, 20.0, 20.0, 40.0])) == pytest.approx(0.9487, abs=1e-3)
    assert np.isnan(spearman(np.array([1.0, 2.0]), np.array([1.0, 2.0])))


def test_conformal_widths_calibrate_every_level_of_heavy_tailed_errors():
    """One scale fixes 95% only; the calibrated half-widths put every level on the diagonal."""
    from pretrain.uncertainty.fit import conformal_widths
    from pretrain.uncertainty.metrics import width

    rng = np.random.default_rng(4)
    raw = np.exp(rng.uniform(-2, 0, 40000))
    res = raw[:, None] * rng.standard_t(2.5, (40000, 3))
    fit, fresh = slice(0, 20000), slice(20000, None)
    sigma = conformal_scale(res[fit], raw[fit] ** 2) * raw
    widths = conformal_widths(res[fit], sigma[fit] ** 2)
    assert np.all(np.diff(widths) >= 0) and width(widths, 0.95) == pytest.approx(1.96, rel=0.02)
    gaussian = score(res[fresh], sigma[fresh])
    calibrated = score(res[fresh], sigma[fresh], widths)
    assert gaussian["coverage_68"] > 0.78  # +-1 sigma over-covers heavy tails
    assert calibrated["coverage_68"] == pytest.approx(0.6827, abs=0.01) and calibrated["width_68"] < 0.8
    assert calibrated["miscalibration_area"] < 0.01 < gaussian["miscalibration_area"]
