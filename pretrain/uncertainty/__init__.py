"""Per-prediction uncertainty after training: LLPR fitting, calibration, and its metrics.

``fit.py`` accumulates the LLPR feature covariance over training shards (all ranks, one
all-reduce) and calibrates any uncertainty method per fidelity on held-out data;
``metrics.py`` scores predicted against actual errors (rank correlation, coverage,
miscalibration area, NLL) and draws the reliability diagram. The heads themselves are in
``models/uncertainty.py``.
"""
