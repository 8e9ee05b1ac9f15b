"""``mlip-pretrain release verify``: check a release as a stranger would receive it.

In order: every file against ``SHA256SUMS`` (entries confined to the folder), the format,
that the model loads from safetensors and JSON, the physics suite
(``pretrain/release/physics.py``, the same checks the tests run on every model family) in
float64 on structures of the elements each fidelity covers, and with ``--data`` a
re-evaluation of the held-out metrics against the card's, with forces served as the
release serves them. A direct-force release also gets its direct heads checked for
equivariance and a report of how far its direct forces are from ``-dE/dr`` (on the probe
structures, and on ``--data``): the size of the non-conservative part an MD run sees.
A release with uncertainty gets it checked: the record in ``config.json`` matches the
calibrated tensors, and on the probe structures of every calibrated fidelity the
uncertainties are finite, positive and unchanged by a rotation; with ``--data`` its
held-out scores are recomputed and compared with the card's.
A release with extra targets gets them checked on the probe structures of every fidelity
they were trained at: ``config.json`` lists the model's targets, charges sum to the total
charge, scalars are unchanged and dipoles turn with a rotation and flip under inversion.
Last, the robustness report (``robustness.py``: dimers, compression, hot MD) is computed
again; a fragile release fails verification unless ``allow_fragile``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from pretrain.release.format import FORMAT, METRICS, ReleaseError, check_sums, read_config
from pretrain.release.loader import load_release
from pretrain.release.physics import CheckFailed, batch_of, probe_for, run_all

METRIC_KEYS = ("energy_mae_per_atom", "forces_mae", "stress_mae")


def verify(folder: str | Path, data: str | Path | None = None, tolerance: float = 0.02,
           allow_fragile: bool = False) -> list[str]:
    """Every check of a release; returns the lines of its report. A failed check raises
    :class:`ReleaseError` naming the file or the check (a failed robustness check only
    without ``allow_fragile``)."""
    folder = Path(folder)
    report = [f"checksums: {len(check_sums(folder))} files match {folder / 'SHA256SUMS'}"]
    config = read_config(folder)
    report.append(f"config: {FORMAT} format_version {config['format_version']}, "
                  f"{len(config['fidelities'])} fidelities, {config['forces']} forces")
    trained = load_release(folder, verify=False)
    model = trained.potential
    report.append(f"model: {config['model']['family']}, {sum(p.numel() for p in model.parameters()):,} "
                  "parameters loaded from safetensors")
    report += physics_lines(model.double(), trained.table)
    report += uncertainty_lines(model, trained.table, config)
    report += target_lines(model, trained.table, config)
    if trained.direct:
        report += direct_gap_lines(model, trained.table)
    if data is not None:
        report += compare_metrics(trained, data, tolerance)
    model.float()
    return report + robustness_lines(trained, allow_fragile)


def robustness_lines(trained, allow_fragile: bool) -> list[str]:
    """The robustness report, recomputed; a fragile release raises unless ``allow_fragile``."""
    from pretrain.release.robustness import lines, robustness_failures, robustness_report, summary_line  # noqa: PLC0415

    report, _ = robustness_report(trained)
    out = [f"robustness: {line}" for line in lines(report)] + [f"robustness: {summary_line(report)}"]
    if not report["passed"] and not allow_fragile:
        worst = robustness_failures(report)[0]
        raise ReleaseError(f"robustness: the release is fragile ({summary_line(report)}; first failure {worst}); "
                           "train with model.zbl=true (a short-range repulsion prior), or pass --allow-fragile")
    return out


def physics_lines(model, table) -> list[str]:
    """The physics suite on every fidelity of a float64 model, one line each."""
    lines = []
    for f, name in enumerate(table.names):
        elements = table.elements.get(name) or ["H"]
        probe = probe_for(elements, f, (f + 1) % len(table.names))
        try:
            errors = run_all(model, probe)
        except CheckFailed as err:
            raise ReleaseError(f"physics check failed for fidelity {name!r}: {err}") from None
        shown = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
        lines.append(f"physics: {name} ({' '.join(elements)}): {shown}")
    return lines


def _probes(table, name: str, matrix) -> tuple[list, list]:
    """The probe structures of fidelity ``name`` (its elements), and copies of them whose
    positions and cells are turned by the 3x3 ``matrix`` (a rotation, or an improper one)."""
    structures = probe_for(table.elements.get(name) or ["H"], table.index(name)).structures
    turned = [a.copy() for a in structures]
    for a in turned:
        a.positions = a.positions @ matrix.T
        a.cell = a.cell.array @ matrix.T
    return structures, turned


def uncertainty_lines(model, table, config: dict) -> list[str]:
    """The uncertainty the release records: there, calibrated, finite, positive, invariant."""
    import numpy as np  # noqa: PLC0415
    from scipy.spatial.transform import Rotation  # noqa: PLC0415

    record = config.get("uncertainty")
    unc = model.uncertainty
    if record is None and unc is None:
        return ["uncertainty: none (the release says so when asked)"]
    if record is None or unc is None or record["method"] != unc.method:
        raise ReleaseError(f"config.json uncertainty {record and record['method']!r} does not match the model's "
                           f"{unc and unc.method!r}; the files are from different releases")
    calibrated = sorted(table.names[f] for f in unc.calibrated_fidelities)
    if calibrated != sorted(record["fidelities"]):
        raise ReleaseError(f"config.json calibrates {sorted(record['fidelities'])}, the weights {calibrated}")
    rot = Rotation.from_euler("zyx", [0.3, -1.1, 0.7]).as_matrix()
    lines = []
    for f in unc.calibrated_fidelities:
        name = table.names[f]
        structures, turned = _probes(table, name, rot)
        with torch.enable_grad():
            ref, rotated = (model(batch_of(model, group, f), forces=True, create_graph=False, uncertainty=True)
                            for group in (structures, turned))
        for key in ("energy_uncertainty", "forces_uncertainty"):
            a, b = ref[key].detach().numpy(), rotated[key].detach().numpy()
            if not (np.isfinite(a).all() and (a > 0).all()):
                raise ReleaseError(f"uncertainty: {name} {key} is not finite and positive on the probe structures")
            gap = float(np.max(np.abs(a - b) / a))
            if gap > 1e-6:
                raise ReleaseError(f"uncertainty: {name} {key} changes by {gap:.2e} (relative) under a rotation")
        lines.append(f"uncertainty: {name} ({record['method']}): finite, positive, rotation-invariant "
                     f"(median force sigma {float(ref['forces_uncertainty'].detach().median()):.3g} eV/A on the probe)")
    return lines


def target_lines(model, table, config: dict) -> list[str]:
    """The extra targets the release records: the model's, with their invariants holding."""
    from data_pipeline import keys as K  # noqa: PLC0415
    from scipy.spatial.transform import Rotation  # noqa: PLC0415

    heads = model.properties
    targets = heads.targets if heads is not None else []
    recorded = [(t["name"], t["kind"], t["fidelities"]) for t in config.get("targets") or []]
    if recorded != [(t.name, t.kind, list(t.fidelities or table.names)) for t in targets]:
        raise ReleaseError(f"config.json targets {recorded} do not match the model's; the files are from "
                           "different releases")
    lines = []
    for matrix in (Rotation.from_euler("zyx", [0.3, -1.1, 0.7]).as_matrix(), -torch.eye(3).numpy()):
        R = torch.tensor(matrix, dtype=torch.float64)
        for t in targets:
            for name in t.fidelities or table.names:
                f = table.index(name)
                structures, turned = _probes(table, name, matrix)
                with torch.enable_grad():
                    ref, moved = (model(batch_of(model, group, f), forces=True, create_graph=False)[K.extra(t.name)]
                                  .detach().double() for group in (structures, turned))
                expected = ref @ R.T if t.kind == "dipole" else ref
                gap = float((moved - expected).abs().max() / ref.abs().max().clamp_min(1e-12))
                if gap > 1e-6 or not torch.isfinite(ref).all():
                    what = "equivariant" if t.kind == "dipole" else "invariant"
                    raise ReleaseError(f"targets: {t.name} at {name} is not finite and {what} under "
                                       f"{'a rotation' if R.det() > 0 else 'inversion'} ({gap:.2e} relative)")
                if t.kind == "charges":
                    sums = torch.zeros(len(structures), dtype=torch.float64).index_add(
                        0, batch_of(model, structures, f)[K.BATCH], ref)
                    if float(sums.abs().max()) > 1e-9:
                        raise ReleaseError(f"targets: {t.name} at {name} sum to {float(sums.abs().max()):.2e}, not the "
                                           "total charge 0, on the probe structures")
    for t in targets:
        what = "equivariant" if t.kind == "dipole" else "invariant"
        lines.append(f"targets: {t.name} ({t.kind}, {', '.join(t.fidelities or table.names)}): finite, {what} "
                     "under rotation and inversion" + ("; sum to the total charge" if t.kind == "charges" else ""))
    return lines


def direct_gap_lines(model, table) -> list[str]:
    """How far the direct head's forces are from ``-dE/dr``, per fidelity (probe structures)."""
    lines = []
    for f, name in enumerate(table.names):
        probe = probe_for(table.elements.get(name) or ["H"], f)
        batch = batch_of(model, probe.structures, f)
        with torch.enable_grad():
            direct = model(batch, forces=True, create_graph=False, direct=True)["forces"].detach()
            conservative = model(batch, forces=True, create_graph=False)["forces"].detach()
        gap = (direct - conservative).abs()
        scale = float(conservative.abs().mean().clamp_min(1e-12))
        lines.append(f"direct vs conservative forces: {name}: MAE {float(gap.mean()):.4g} eV/A, "
                     f"max {float(gap.max()):.4g} eV/A ({float(gap.mean()) / scale:.2f} of the mean "
                     "|-dE/dr|); served: direct (NVE energy is not conserved)")
    return lines


def compare_metrics(trained, data, tolerance: float) -> list[str]:
    """Re-evaluate ``data`` with the release's served forces; every metric must be within
    ``tolerance`` (relative) of ``metrics.json``."""
    from pretrain.evaluate import evaluate  # noqa: PLC0415

    card = trained.path / METRICS
    if not card.is_file():
        raise ReleaseError(f"{card}: missing, so there is nothing to compare --data with "
                           "(the release was made without held-out data)")
    expected = json.loads(card.read_text())
    model = trained.potential.float()
    calibration = (trained.release_config.get("uncertainty") or {}).get("calibration")
    got = evaluate(model, data, progress=False, direct=trained.direct, calibration=calibration)
    if got["data"]["content_hash"] != expected["data"]["content_hash"]:
        raise ReleaseError(f"--data {data}: content hash {got['data']['content_hash'][:12]} is not the "
                           f"card's held-out data ({expected['data']['content_hash'][:12]}); pass that folder")
    lines = []
    for fid, ref in expected["fidelities"].items():
        for key in METRIC_KEYS:
            if key not in ref:
                continue
            new = got["fidelities"][fid][key]
            rel = abs(new - ref[key]) / max(abs(ref[key]), 1e-12)
            if rel > tolerance:
                raise ReleaseError(f"{card}: {fid} {key} re-evaluated {new:.6g}, card {ref[key]:.6g} "
                                   f"({100 * rel:.2f}% > {100 * tolerance:.2f}%)")
            lines.append(f"metrics: {fid} {key} {new:.6g} vs card {ref[key]:.6g} ({100 * rel:.3f}%)")
    for fid, ref in (expected.get("uncertainty") or {}).get("fidelities", {}).items():
        new = got["uncertainty"]["fidelities"][fid]["forces"]
        for key in ("coverage_95", "spearman_structure"):
            if key in ref["forces"] and abs(new[key] - ref["forces"][key]) > tolerance:
                raise ReleaseError(f"{card}: {fid} forces {key} of the uncertainty re-evaluated {new[key]:.4f}, "
                                   f"card {ref['forces'][key]:.4f}")
        lines.append(f"uncertainty: {fid} forces coverage_95 {new['coverage_95']:.4f} vs card "
                     f"{ref['forces']['coverage_95']:.4f}")
    if trained.direct:
        other = evaluate(model, data, progress=False, direct=False)
        for fid, m in other["fidelities"].items():
            if "forces_mae" in m:
                lines.append(f"metrics: {fid} forces_mae of -dE/dr {m['forces_mae']:.6g} (served direct: "
                             f"{got['fidelities'][fid]['forces_mae']:.6g})")
    return lines


def verify_command(folder: str, data: str | None, tolerance: float, allow_fragile: bool = False) -> int:
    """``release verify``: prints the report; 0 when every check passes, 1 otherwise."""
    try:
        for line in verify(folder, data, tolerance, allow_fragile):
            print(f"[verify] ok  {line}")
    except ReleaseError as err:
        print(f"[verify] FAILED: {err}", file=sys.stderr)
        return 1
    print(f"[verify] {folder}: every check passed")
    return 0

