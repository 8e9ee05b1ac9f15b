"""``MODEL_CARD.md`` of a release, generated from the run and its data, never hand-filled.

Sources: the checkpoint's ``model.json`` (fidelity table, data manifest summary), its
trainer state (step, atoms seen per fidelity), the run's ``metrics.jsonl`` (wall time),
the model's measured FLOPs per atom (``models/info.py``) and ``eval`` on the run's
held-out folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.checkpoint import atoms_seen, trainer_state
from pretrain.trained import Trained, checkpoint_record


def training_summary(trained: Trained) -> dict:
    """Step, ranks, device-hours, atoms seen per fidelity and training FLOPs of a run."""
    from models.info import model_info  # noqa: PLC0415

    step_dir = trained.path
    state = trainer_state(step_dir)
    world = int(state.get("world_size", 1))
    seen = atoms_seen(state)
    hours = _wall_seconds(step_dir.parent.parent / "metrics.jsonl", state["step"]) * world / 3600
    flops_per_atom = model_info(trained.model_cfg)["train_flops_per_atom"]
    total_atoms = sum(seen.values())
    return {"step": state["step"], "world_size": world, "device_hours": hours,
            "atoms_seen": seen, "flops_per_atom": flops_per_atom,
            "flops": flops_per_atom * total_atoms, "record": checkpoint_record(step_dir)}


def _wall_seconds(log: Path, step: int) -> float:
    """Wall seconds of the jobs that reached ``step``, from ``metrics.jsonl`` (each job's
    ``elapsed_s`` restarts at 0; a job's last line up to ``step`` is its length)."""
    if not log.is_file():
        return 0.0
    total, last = 0.0, 0.0
    for line in log.read_text().splitlines():
        row = json.loads(line)
        if row.get("step", 0) > step:
            break
        elapsed = float(row.get("elapsed_s", 0.0))
        if elapsed < last:  # a new job started
            total += last
        last = elapsed
    return total + last


def _mev(m: dict, key: str) -> str:
    return f"{1000 * m[key]:.2f}" if key in m else "-"


def card_text(config: dict, summary: dict, held_out: dict | None, extra: list[str] = ()) -> str:
    """The card's Markdown; ``extra``: further sections' lines (a scaling study's fits),
    placed before the known limits."""
    record = summary["record"]
    model = config["model"]
    lines = [f"# {config['name']}", "",
             f"A {model['family'].upper()}-style machine-learned interatomic potential with "
             f"{config['weights']['parameters']:,} parameters and {len(config['fidelities'])} fidelity "
             f"heads ({', '.join(f['name'] for f in config['fidelities'])}), trained with mlip-pretrain "
             f"{config['code']['package']} (commit {str(config['code']['commit'])[:12]}).", "",
             f"- License: {config['license']}",
             f"- Release format: {config['format']} v{config['format_version']}; weights: "
             f"{'EMA' if config['weights']['ema'] else 'raw (the run had no EMA)'}, stored float32; "
             f"trained in {config['weights']['trained_precision']}",
             f"- Cutoff {config['cutoff']} A; units {config['units']['energy']}, {config['units']['forces']}, "
             f"{config['units']['stress']}; stress sign: {config['units']['stress_sign']}", "",
             "## Intended use", "",
             "Energies, forces and stress for atomistic simulation (relaxation, molecular dynamics) of "
             "structures like the training data, at a fidelity chosen by name: "
             "`MLIPCalculator.from_release(DIR, fidelity=NAME)`. Pick the fidelity whose level of "
             "theory you want; the model never falls back to another head.", "",
             "## Training data", "",
             f"Content hash `{str(record.get('data', {}).get('content_hash'))[:16]}...`, "
             f"{record.get('data', {}).get('records', '?')} structures.", "",
             "| dataset | fidelity | structures | atoms | elements |", "|---|---|---:|---:|---|"]
    for g in record.get("data", {}).get("groups", []):
        lines.append(f"| {g['dataset']} | {g['fidelity']} | {g['structures']} | {g['atoms']} | "
                     f"{' '.join(sorted(g.get('elements') or {}))} |")
    lines += ["", "## Held-out metrics", ""]
    lines += _metrics_lines(held_out, config)
    lines += ["", "## Training compute", "",
              f"- {summary['step']} optimizer steps on {summary['world_size']} rank(s); "
              f"{summary['device_hours']:.4f} device-hours (wall time x ranks, from metrics.jsonl)",
              f"- Atoms seen: " + ", ".join(f"{k} {v:,}" for k, v in summary["atoms_seen"].items()),
              f"- Training FLOPs: {summary['flops']:.3e} (measured {summary['flops_per_atom']:.4g} "
              "FLOP per atom for a force-loss step x atoms seen; dense ops only, a lower bound)", ""]
    lines += [*extra, "## Known limits", ""]
    covered = {f["name"]: f["elements"] for f in config["fidelities"]}
    union = sorted({e for els in covered.values() for e in els})
    for name, els in covered.items():
        absent = [e for e in union if e not in els]
        lines.append(f"- {name}: trained on {' '.join(els) or 'no elements'}"
                     + (f"; no data for {' '.join(absent)} (extrapolation, the calculator warns)" if absent else ""))
    lines.append("- Elements outside all of these were never seen; their predictions are meaningless.")
    return "\n".join(lines) + "\n"


def _metrics_lines(held_out: dict | None, config: dict) -> list[str]:
    if held_out is None:
        return ["No held-out evaluation was run (the run had no `eval.folder`, or the release "
                "was made with `--no-eval`). Metrics on training data are never reported here."]
    train_folder = config["data"].get("folder")
    same = train_folder and Path(train_folder).resolve() == Path(held_out["data"]["folder"]).resolve()
    lines = [f"`mlip-pretrain eval` on `{held_out['data']['folder']}` (content hash "
             f"`{held_out['data']['content_hash'][:16]}...`, {held_out['data']['records']} structures)"
             + (": **this is the training data, not a held-out split**" if same else ", held out from training") + ".",
             "", "| dataset | fidelity | structures | E MAE (meV/atom) | E RMSE (meV/atom) | F MAE (meV/A) "
             "| F RMSE (meV/A) | S MAE (meV/A^3) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in held_out["groups"]:
        lines.append(f"| {r['dataset']} | {r['fidelity']} | {r['structures']} | "
                     f"{_mev(r, 'energy_mae_per_atom')} | {_mev(r, 'energy_rmse_per_atom')} | "
                     f"{_mev(r, 'forces_mae')} | {_mev(r, 'forces_rmse')} | {_mev(r, 'stress_mae')} |")
    return lines
