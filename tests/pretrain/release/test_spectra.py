"""The IR spectrum's signal processing on dipoles of known frequencies, and its reference
file checks (the whole command on a trained release: ``test_targets.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain.release.spectra import (CM1_PER_INV_FS, SpectrumError, active_modes, dipole_spectrum, match,
                                      read_reference, spectrum_peaks)


def _series(modes, steps=4000, dt=0.5, seed=0):
    """Dipole ``[steps + 1, 3]``: one oscillation per ``(cm^-1, amplitude, axis)``, random phases."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps + 1) * dt
    mu = np.zeros((steps + 1, 3))
    for w, a, axis in modes:
        mu[:, axis] += a * np.sin(2 * np.pi * w / CM1_PER_INV_FS * t + rng.uniform(0, 2 * np.pi))
    return mu


def test_peaks_of_known_oscillations_and_their_intensity_ratio():
    modes = [(667.0, 0.1, 0), (667.0, 0.1, 1), (2349.0, 0.05, 2)]  # a bend (degenerate) and a stretch
    wn, intensity = dipole_spectrum([_series(modes, seed=s) for s in range(3)], 0.5)
    assert wn[1] - wn[0] == pytest.approx(CM1_PER_INV_FS / (4000 * 0.5))
    peaks = spectrum_peaks(wn, intensity)
    assert [round(w) for w, _ in peaks] == pytest.approx([667, 2349], abs=2)
    # |FT[dmu/dt]|^2 ~ w^2 a^2 per component: (667 * 0.1)^2 * 2 vs (2349 * 0.05)^2
    assert peaks[0][1] / peaks[1][1] == pytest.approx(2 * (667 * 0.1) ** 2 / (2349 * 0.05) ** 2, rel=0.05)


def test_active_modes_merge_degenerate_and_drop_rotations_and_dark_modes():
    freqs = [-3.0, 0.5, 2.0, 667.0, 667.4, 1350.0, 2349.0]
    intensities = [0.0, 0.0, 0.0, 1.0, 1.0, 1e-6, 4.0]  # the symmetric stretch is dark
    assert active_modes(freqs, intensities) == [(667.0, 0.5), (2349.0, 1.0)]
    rows = match(active_modes(freqs, intensities), [660.0, 2400.0])
    assert [r["error_cm1"] for r in rows] == [-7.0, 51.0]
    rows = match(active_modes(freqs, intensities), [2400.0])  # nothing near the bend: missed, not 1733 off
    assert [r["model_cm1"] for r in rows] == [None, 2400.0]
    assert match([(1000.0, 1.0)], [])[0]["model_cm1"] is None


def test_reference_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(SpectrumError, match="x.json: not a readable JSON"):
        read_reference(bad)
    bad.write_text(json.dumps({"fidelity": "GFN2-xTB", "numbers": [8], "positions_A": [[0, 0, 0]]}))
    with pytest.raises(SpectrumError, match="x.json: no 'frequencies_cm1'"):
        read_reference(bad)
