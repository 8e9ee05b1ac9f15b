"""``mlip-pretrain release create``: a trained run as a self-describing, verifiable release.

``create`` turns a run (or one of its checkpoints) into the folder that
``pretrain/release/format.py`` describes: DeepSpeed's fp32 consolidation of any ZeRO
stage, the EMA weights when the run had EMA (elemental references kept float64),
``config.json`` (model, fidelity table with references and covered elements, how forces
are served: as the run trained them, units, provenance without local paths),
``MODEL_CARD.md`` generated from the run and its data (``card.py``), ``metrics.json`` from
``eval`` on the run's held-out ``eval.folder`` with the served forces, the robustness
report (``robustness.py``: ``robustness.json``, ``robustness.png``, a card section),
calibrated per-prediction uncertainty (``pretrain/uncertainty/fit.py``: the run's trained
ensemble, else LLPR fitted on its training data; calibrated on half of ``eval.folder`` and
scored on the other half, ``reliability.png``, a card section) and ``SHA256SUMS``.

The folder is assembled under a temporary name, registered in the MLflow model registry
(tracking on: the run's store, found where the run folder is now, or
``MLFLOW_TRACKING_URI``), and only then renamed into place: a failure at any step leaves
no release behind.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from common.atomic import write_atomic
from common.config import from_dict, to_dict
from data_pipeline.stream.dataset import ShardedDataset
from models.properties import TARGET_UNITS
from pretrain.checkpoint import trainer_state
from pretrain.release.format import (CARD, CONFIG, FORMAT, FORMAT_VERSION, METRICS, RELIABILITY, ROBUSTNESS,
                                     ROBUSTNESS_PLOT, UNITS, WEIGHTS, ReleaseError, is_release, staged, write_sums,
                                     write_weights)
from pretrain.weights import TrainedModel, checkpoint_record, load_checkpoint_model, run_folder


def create(source: str | Path, out: str | Path, name: str | None = None, license: str = "Apache-2.0",
           evaluate_held_out: bool = True, progress: bool = True, register: bool = True,
           uncertainty: str = "auto", calibration: str | Path | None = None) -> Path:
    """Write the release of ``source`` (run, checkpoints folder or step folder) to ``out``.

    ``uncertainty``: ``auto`` (the run's ensemble, else LLPR; none when the run has no
    held-out data and no ``calibration`` folder is given), ``llpr``, ``ensemble`` or ``none``."""
    from pretrain.release.card import card_text, training_summary, uncertainty_card_lines  # noqa: PLC0415
    from pretrain.release.robustness import card_lines, plot, robustness_report, summary_line  # noqa: PLC0415

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ReleaseError(f"{out}: exists and is not empty; choose a new --out (a release is never overwritten)")
    if is_release(source):
        raise ReleaseError(f"{source}: already a release; copy the folder instead")
    trained = load_checkpoint_model(source, ema=True)
    name = name or out.name
    store = _store(trained) if register else None  # checked before any work
    uq = _uncertainty(trained, uncertainty, calibration, progress)
    held_out, curves = _held_out_metrics(trained, progress, uq) if evaluate_held_out else (None, None)
    robust, robust_curves = robustness_report(trained)
    summary = training_summary(trained)
    config = release_config(trained, name, license, summary, uq)
    with staged(out) as tmp:
        write_weights(tmp, trained.potential)
        write_atomic(tmp / CONFIG, json.dumps(config, indent=1) + "\n")
        if held_out is not None:
            write_atomic(tmp / METRICS, json.dumps(held_out, indent=1) + "\n")
        write_atomic(tmp / ROBUSTNESS, json.dumps(robust, indent=1) + "\n")
        plot(robust_curves, tmp / ROBUSTNESS_PLOT)
        if curves:
            from pretrain.uncertainty.metrics import reliability_plot  # noqa: PLC0415

            reliability_plot(curves, tmp / RELIABILITY)
        sections = uncertainty_card_lines(uq, held_out) + card_lines(robust) + _study_section(trained)
        write_atomic(tmp / CARD, card_text(config, summary, held_out, sections))
        write_sums(tmp)
        version = _register(store, trained, tmp, out, name, held_out) if store is not None else None
    if version is not None:
        print(f"[release] registered in MLflow as {name!r} version {version}", flush=True)
    print(f"[release] robustness: {summary_line(robust)}", flush=True)
    return out


def release_config(trained: TrainedModel, name: str, license: str, summary: dict,
                   uncertainty: dict | None = None) -> dict:
    """``config.json``: everything needed to rebuild and trust the model, no code, no local
    paths; ``uncertainty``: what :func:`pretrain.uncertainty.fit.fit_uncertainty` fitted."""
    from pretrain.tracking import code_version  # noqa: PLC0415

    record = checkpoint_record(trained.path)
    cfg = trained.train_config or {}
    code = code_version()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "license": license,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {**to_dict(trained.model_cfg), "kernels": "auto"},
        "cutoff": trained.model_cfg.cutoff,
        "fidelities": _served_table(trained).to_json(),
        "forces": trained.forces,
        "units": UNITS,
        "weights": {"file": WEIGHTS, "ema": trained.ema, "dtype": "float32", "references_dtype": "float64",
                    "parameters": sum(p.numel() for p in trained.potential.parameters()),
                    "trained_precision": cfg.get("engine", {}).get("precision", "fp32"),
                    "zero_stage": cfg.get("engine", {}).get("zero_stage")},
        "code": {"package": code.get("package_version"), "commit": code.get("git_commit"),
                 "dirty": code.get("git_dirty")},
        "data": {"content_hash": record.get("data", {}).get("content_hash"),
                 "folder": Path(cfg.get("data", {}).get("folder") or "").name or None},
        "training": {"step": summary["step"], "checkpoint": trained.path.name},
        "uncertainty": uncertainty,
        "targets": served_targets(trained),
    }


def served_targets(trained: TrainedModel) -> list[dict]:
    """``config.json["targets"]``: each extra target, what ASE calls it, its unit, its fidelities."""
    return [{"name": t.name, "kind": t.kind, "served_as": t.served_as, "unit": TARGET_UNITS.get(t.served_as),
             "fidelities": list(t.fidelities or trained.table.names)} for t in trained.model_cfg.targets]


def _served_table(trained: TrainedModel):
    """The fidelity table with the references the model adds: the manifest's plus the
    learned shift (float64) when the run trained one, else the manifest's."""
    import dataclasses  # noqa: PLC0415

    from ase.data import atomic_numbers, chemical_symbols  # noqa: PLC0415

    if trained.potential.reference_shift is None:
        return trained.table
    refs = trained.potential.reference_energies().detach().double().cpu()
    learned = {}
    for f, fid in enumerate(trained.table.names):
        zs = sorted(set(torch.nonzero(refs[f]).flatten().tolist())
                    | {atomic_numbers[e] for e in trained.table.elements.get(fid, [])})
        learned[fid] = {chemical_symbols[z]: float(refs[f, z]) for z in zs}
    return dataclasses.replace(trained.table, references=learned)


def _study_section(trained: TrainedModel) -> list[str]:
    """The card's scaling-study section when the run was a point of a study (else [])."""
    from pretrain.scaling.report import card_lines  # noqa: PLC0415

    return card_lines(trained.train_config or {})


def _uncertainty(trained: TrainedModel, method: str, calibration, progress: bool) -> dict | None:
    """Fit and calibrate the release's uncertainty (``config.json["uncertainty"]``)."""
    from pretrain.uncertainty.fit import fit_uncertainty  # noqa: PLC0415

    if method == "auto" and calibration is None and not (trained.train_config or {}).get("eval", {}).get("folder"):
        print("[release] the run has no eval.folder to calibrate on: the release carries no uncertainty "
              "(pass --calibration FOLDER to add it)", flush=True)
        method = "none"
    record = fit_uncertainty(trained, method, calibration, progress=progress)
    if record is not None:
        print(f"[release] uncertainty: {record['method']}, calibrated per fidelity on "
              f"{record['calibration']['folder']} ({record['calibration']['records']})", flush=True)
    return record


def scored_held_out(trained: TrainedModel, folder: str | Path, uq: dict | None, progress: bool) -> tuple:
    """(metrics, reliability curves) of ``eval`` on held-out ``folder``, forces as served;
    with uncertainty, scored on the records its calibration never saw and checked out of
    distribution (``pretrain/uncertainty/ood.py``). The folder is named, not located."""
    from pretrain.evaluate import evaluate  # noqa: PLC0415
    from pretrain.uncertainty.fit import split_held_out  # noqa: PLC0415
    from pretrain.uncertainty.ood import out_of_distribution  # noqa: PLC0415

    metrics = evaluate(trained.potential, folder, progress=progress, direct=trained.direct,
                       calibration=(uq or {}).get("calibration"))
    metrics.pop("points", None)
    metrics.pop("target_points", None)
    curves = metrics.pop("uncertainty_curves", None)
    metrics["data"]["folder"] = Path(folder).name
    if uq is not None and "uncertainty" in metrics:
        records = (split_held_out(folder)[1] if uq["calibration"]["records"] != "all"
                   else np.arange(len(ShardedDataset(folder))))
        metrics["uncertainty"]["out_of_distribution"] = out_of_distribution(
            trained.potential, folder, records, trained.table.elements)
    return metrics, curves


def _held_out_metrics(trained: TrainedModel, progress: bool, uq: dict | None) -> tuple:
    """:func:`scored_held_out` on the run's ``eval.folder`` ((None, None) without one)."""
    folder = (trained.train_config or {}).get("eval", {}).get("folder")
    if not folder:
        print("[release] the run has no eval.folder: the card reports no held-out metrics", flush=True)
        return None, None
    if not Path(folder).is_dir():
        raise ReleaseError(f"eval.folder {folder} of the run is not there; restore it, or pass --no-eval")
    metrics, curves = scored_held_out(trained, folder, uq, progress)
    _overlap(trained, folder, metrics, progress)
    training_hash = checkpoint_record(trained.path).get("data", {}).get("content_hash")
    if metrics["data"]["content_hash"] == training_hash:
        print(f"[release] eval.folder {folder} holds the training data (same content hash): the card "
              "will say so", flush=True)
    return metrics, curves


def _overlap(trained: TrainedModel, folder, metrics: dict, progress: bool) -> None:
    """The held-out folder's overlap with the training data into ``metrics["leakage"]``, and,
    when some held-out structures are training structures, the metrics without them."""
    from pretrain.evaluate import evaluate  # noqa: PLC0415
    from pretrain.overlap import held_out_overlap  # noqa: PLC0415

    report = held_out_overlap(trained, folder, progress=progress)
    if report is None:
        return
    leaked = report.pop("leaked")
    metrics["leakage"] = report
    if leaked.any():
        print(f"[release] {int(leaked.sum())} held-out structures are in the training data at their "
              "fidelity: the card says so and gives the metrics without them", flush=True)
        clean = evaluate(trained.potential, folder, progress=progress, direct=trained.direct, exclude=leaked)
        metrics["excluding_leaked"] = {"fidelities": clean["fidelities"], "groups": clean["groups"]}


def _store(trained: TrainedModel):
    """The MLflow store a release of this run is registered in (None: tracking off), found
    where the run folder is now, or at ``tracking.uri`` / ``MLFLOW_TRACKING_URI``."""
    from pretrain.config import TrainConfig  # noqa: PLC0415
    from pretrain.tracking import release_store  # noqa: PLC0415

    cfg = from_dict(TrainConfig, trained.train_config)
    if not cfg.tracking.enabled:
        return None
    run = run_folder(trained.path)
    if not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")) and not (run / "mlflow.db").is_file():
        raise ReleaseError(f"{run}: the run tracked to its own MLflow store, and {run / 'mlflow.db'} is "
                           "not there; point MLFLOW_TRACKING_URI at the store the run used, or pass "
                           "--no-register")
    return release_store(cfg.tracking, run, trainer_state(trained.path).get("run_id"))


def _register(store, trained: TrainedModel, staged: Path, out: Path, name: str, held_out: dict | None) -> str:
    """Register the staged release in ``store`` with the card's metrics as tags."""
    from pretrain.tracking import register_release  # noqa: PLC0415

    tags = {"release.folder": str(out.resolve()), "release.format_version": FORMAT_VERSION,
            "release.forces": trained.forces}
    for fid, m in (held_out or {}).get("fidelities", {}).items():
        for key in ("energy_mae_per_atom", "forces_mae", "stress_mae"):
            if key in m:
                tags[f"heldout.{fid}.{key}"] = f"{m[key]:.6g}"
    return register_release(store, staged, name, tags)
