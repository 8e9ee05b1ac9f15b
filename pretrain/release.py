"""``mlip-pretrain release create | verify``: a trained model as a self-describing release.

``create`` turns a run (or one of its checkpoints) into the folder that
``models/release_format.py`` reads: DeepSpeed's fp32 consolidation of any ZeRO stage,
the EMA weights when the run had EMA, ``config.json`` (model, fidelity table with
references and covered elements, units, provenance), ``MODEL_CARD.md`` generated from the
run and its data (``pretrain/model_card.py``), ``metrics.json`` from ``eval`` on the
run's held-out ``eval.folder`` (never the training shards) and ``SHA256SUMS``. The folder
is assembled under a temporary name and renamed, so a crash never leaves half a release.
With tracking on, the release is registered in the MLflow model registry, linked to its
training run.

``verify`` checks a release as a stranger would receive it: checksums, format, that the
model loads, physics (rotation, forces and stress vs finite differences) on structures of
the covered elements, and with ``--data`` a re-evaluation against the card's metrics.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from data_pipeline.config import from_dict, to_dict, write_atomic
from models.release_format import (CARD, CONFIG, FORMAT, FORMAT_VERSION, METRICS, UNITS, WEIGHTS,
                                   ReleaseError, check_sums, load_release, read_config, write_sums)
from pretrain.checkpoint import trainer_state
from pretrain.trained import Trained, checkpoint_record, load_trained


def create(source: str | Path, out: str | Path, name: str | None = None, license: str = "Apache-2.0",
           evaluate_held_out: bool = True, progress: bool = True) -> Path:
    """Write the release of ``source`` (run, checkpoints folder or step folder) to ``out``."""
    from safetensors.torch import save_file  # noqa: PLC0415

    from pretrain.model_card import card_text, training_summary  # noqa: PLC0415

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ReleaseError(f"{out}: exists and is not empty; choose a new --out (a release is never overwritten)")
    trained = load_trained(source, ema=True)
    if trained.kind != "checkpoint":
        raise ReleaseError(f"{source}: already a release; copy the folder instead")
    name = name or out.name
    held_out = _held_out_metrics(trained, progress) if evaluate_held_out else None
    summary = training_summary(trained)
    config = release_config(trained, name, license, summary)
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in trained.potential.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    write_atomic(tmp / CONFIG, json.dumps(config, indent=1) + "\n")
    if held_out is not None:
        write_atomic(tmp / METRICS, json.dumps(held_out, indent=1) + "\n")
    write_atomic(tmp / CARD, card_text(config, summary, held_out, _study_section(trained)))
    write_sums(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    version = _register(trained, out, name, held_out)
    if version is not None:
        print(f"[release] registered in MLflow as {name!r} version {version}", flush=True)
    return out


def release_config(trained: Trained, name: str, license: str, summary: dict) -> dict:
    """``config.json``: everything needed to rebuild and trust the model, no code."""
    from pretrain.tracking import code_version  # noqa: PLC0415

    record = checkpoint_record(trained.path)
    cfg = trained.train_config or {}
    code = code_version()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name, "license": license,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {**to_dict(trained.model_cfg), "kernels": "auto"},
        "cutoff": trained.model_cfg.cutoff,
        "fidelities": trained.table.to_json(),
        "units": UNITS,
        "weights": {"file": WEIGHTS, "ema": trained.ema, "dtype": "float32",
                    "parameters": sum(p.numel() for p in trained.potential.parameters()),
                    "trained_precision": cfg.get("engine", {}).get("precision", "fp32"),
                    "zero_stage": cfg.get("engine", {}).get("zero_stage")},
        "code": {"package": code.get("package_version"), "commit": code.get("git_commit"),
                 "dirty": code.get("git_dirty")},
        "data": {"content_hash": record.get("data", {}).get("content_hash"),
                 "folder": cfg.get("data", {}).get("folder")},
        "training": {"step": summary["step"], "checkpoint": str(trained.path.resolve())},
    }


def _study_section(trained: Trained) -> list[str]:
    """The card's scaling-study section when the run was a point of a study (else [])."""
    from pretrain.scaling.report import card_lines  # noqa: PLC0415

    return card_lines(trained.train_config or {})


def _held_out_metrics(trained: Trained, progress: bool) -> dict | None:
    """``eval`` of the release weights on the run's ``eval.folder`` (None without one)."""
    from pretrain.evaluate import evaluate  # noqa: PLC0415

    folder = (trained.train_config or {}).get("eval", {}).get("folder")
    if not folder:
        print("[release] the run has no eval.folder: the card reports no held-out metrics", flush=True)
        return None
    if not Path(folder).is_dir():
        raise ReleaseError(f"eval.folder {folder} of the run is not there; restore it, or pass --no-eval")
    if Path(folder).resolve() == Path((trained.train_config or {}).get("data", {}).get("folder", "")).resolve():
        print(f"[release] eval.folder {folder} is the training data: the card will say so", flush=True)
    metrics = evaluate(trained.potential, folder, progress=progress)
    metrics.pop("points", None)
    return metrics


def _register(trained: Trained, folder: Path, name: str, held_out: dict | None) -> str | None:
    from pretrain.config import TrainConfig  # noqa: PLC0415
    from pretrain.tracking import register_release  # noqa: PLC0415

    cfg = from_dict(TrainConfig, trained.train_config)
    if not cfg.tracking.enabled:
        return None
    state = trainer_state(trained.path)
    tags = {"release.folder": str(folder.resolve()), "release.format_version": FORMAT_VERSION}
    for fid, m in (held_out or {}).get("fidelities", {}).items():
        for key in ("energy_mae_per_atom", "forces_mae", "stress_mae"):
            if key in m:
                tags[f"heldout.{fid}.{key}"] = f"{m[key]:.6g}"
    return register_release(cfg.tracking, cfg.out, state.get("run_id"), folder, name, tags)


# --- verify ------------------------------------------------------------------------------
def verify(folder: str | Path, data: str | Path | None = None, tolerance: float = 0.02) -> list[str]:
    """Every check of a release; returns the lines of its report. A failed check raises
    :class:`ReleaseError` naming the file or the check."""
    from models.physics_checks import release_checks  # noqa: PLC0415

    folder = Path(folder)
    report = [f"checksums: {len(check_sums(folder))} files match {folder / 'SHA256SUMS'}"]
    config = read_config(folder)
    report.append(f"config: {FORMAT} format_version {config['format_version']}, "
                  f"{len(config['fidelities'])} fidelities")
    model, config = load_release(folder, verify=False)
    report.append(f"model: {config['model']['family']}, {sum(p.numel() for p in model.parameters()):,} "
                  "parameters loaded from safetensors")
    report += release_checks(model.double(), config)
    if data is not None:
        report += _compare_metrics(model.float(), folder, data, tolerance)
    return report


def _compare_metrics(model, folder: Path, data, tolerance: float) -> list[str]:
    from pretrain.evaluate import evaluate  # noqa: PLC0415

    card = folder / METRICS
    if not card.is_file():
        raise ReleaseError(f"{card}: missing, so there is nothing to compare --data with "
                           "(the release was made without held-out data)")
    expected = json.loads(card.read_text())
    got = evaluate(model, data, progress=False)
    if got["data"]["content_hash"] != expected["data"]["content_hash"]:
        raise ReleaseError(f"--data {data}: content hash {got['data']['content_hash'][:12]} is not the "
                           f"card's held-out data ({expected['data']['content_hash'][:12]}); pass that folder")
    lines = []
    for fid, ref in expected["fidelities"].items():
        for key in ("energy_mae_per_atom", "forces_mae", "stress_mae"):
            if key not in ref:
                continue
            new = got["fidelities"][fid][key]
            rel = abs(new - ref[key]) / max(abs(ref[key]), 1e-12)
            if rel > tolerance:
                raise ReleaseError(f"{card}: {fid} {key} re-evaluated {new:.6g}, card {ref[key]:.6g} "
                                   f"({100 * rel:.2f}% > {100 * tolerance:.2f}%)")
            lines.append(f"metrics: {fid} {key} {new:.6g} vs card {ref[key]:.6g} ({100 * rel:.3f}%)")
    return lines


def verify_command(folder: str, data: str | None, tolerance: float) -> int:
    """``release verify``: prints the report; 0 when every check passes, 1 otherwise."""
    try:
        for line in verify(folder, data, tolerance):
            print(f"[verify] ok  {line}")
    except ReleaseError as err:
        print(f"[verify] FAILED: {err}", file=sys.stderr)
        return 1
    print(f"[verify] {folder}: every check passed")
    return 0
