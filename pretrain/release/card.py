"""``MODEL_CARD.md`` of a release, generated from the run and its data, never hand-filled.

Sources: the checkpoint's ``model.json`` (fidelity table, how forces were trained, data
manifest summary with its coverage, training FLOPs per atom measured on the run's own
batches), its
trainer state (step, atoms seen per fidelity), the run's ``metrics.jsonl`` (wall time and
ranks of every job segment) and ``eval`` on the run's held-out folder. The card names no
local paths: data are named by content hash and folder name.
"""

from __future__ import annotations

import json
from pathlib import Path

from ase.data import chemical_symbols

from data_pipeline.coverage_report import LABELS, RARE_STRUCTURES, counts_text, known_limits, range_text
from pretrain.checkpoint import atoms_seen, trainer_state
from pretrain.weights import TrainedModel, checkpoint_record, run_folder


def training_summary(trained: TrainedModel) -> dict:
    """Step, ranks, device-hours, atoms seen per fidelity and training FLOPs of a run."""
    step_dir = trained.path
    state = trainer_state(step_dir)
    world = int(state.get("world_size", 1))
    seen = atoms_seen(state)
    record = checkpoint_record(step_dir)
    flops = record.get("flops") or _measured_now(trained)
    total_atoms = sum(seen.values())
    return {"step": state["step"], "world_size": world,
            "device_hours": device_seconds(run_folder(step_dir) / "metrics.jsonl", state["step"], world) / 3600,
            "atoms_seen": seen, "flops_per_atom": flops["per_atom"], "flops_basis": flops,
            "flops": flops["per_atom"] * total_atoms, "record": record,
            "coverage": training_coverage(trained, record)}


def training_coverage(trained: TrainedModel, record: dict) -> dict | None:
    """The training data's coverage (the manifest's ``coverage``): from the checkpoint's
    record of its manifest, or, for a checkpoint that predates that, from the manifest of
    its training data folder when it is still there with the same content hash; else None."""
    data = record.get("data", {})
    if data.get("coverage"):
        return data["coverage"]
    folder = ((trained.train_config or {}).get("data") or {}).get("folder")
    path = Path(folder or "") / "manifest.json"
    if folder and path.is_file():
        manifest = json.loads(path.read_text())
        if manifest.get("content_hash") == data.get("content_hash"):
            return manifest.get("coverage")
    return None


def _measured_now(trained: TrainedModel) -> dict:
    """FLOPs of a checkpoint that predates their record: measured now on the run's training
    data when it is still there."""
    from common.config import from_dict  # noqa: PLC0415
    from pretrain.config import TrainConfig  # noqa: PLC0415
    from pretrain.flops import run_flops  # noqa: PLC0415

    cfg = from_dict(TrainConfig, trained.train_config)
    if not Path(cfg.data.folder).is_dir():
        from pretrain.release.format import ReleaseError  # noqa: PLC0415

        raise ReleaseError(f"{trained.path}: the checkpoint predates its FLOPs record and its training "
                           f"data {cfg.data.folder} is not there to measure them; restore the data")
    return run_flops(cfg, trained.potential, trained.table.names)


def device_seconds(log: Path, step: int, world: int) -> float:
    """Wall seconds x ranks of the jobs that reached ``step``, from ``metrics.jsonl``: each
    job's ``elapsed_s`` restarts at 0 and its last line up to ``step`` is its length; each
    line names its job's ``world_size`` (an elastic resume changes it; logs that predate
    the field count ``world``)."""
    if not log.is_file():
        return 0.0
    total, last, ranks = 0.0, 0.0, world
    for line in log.read_text().splitlines():
        row = json.loads(line)
        if row.get("step", 0) > step:
            break
        elapsed = float(row.get("elapsed_s", 0.0))
        if elapsed < last:  # a new job started
            total += last * ranks
        last, ranks = elapsed, int(row.get("world_size", world))
    return total + last * ranks


def _mev(m: dict, key: str) -> str:
    return f"{1000 * m[key]:.2f}" if key in m else "-"


def card_text(config: dict, summary: dict, held_out: dict | None, extra: list[str] = ()) -> str:
    """The card's Markdown; ``extra``: further sections' lines (a scaling study's fits),
    placed before the known limits."""
    record = summary["record"]
    model = config["model"]
    direct = config["forces"] == "direct"
    lines = [f"# {config['name']}", "",
             f"A {model['family'].upper()}-style machine-learned interatomic potential with "
             f"{config['weights']['parameters']:,} parameters and {len(config['fidelities'])} fidelity "
             f"heads ({', '.join(f['name'] for f in config['fidelities'])}), trained with mlip-pretrain "
             f"{config['code']['package']} (commit {str(config['code']['commit'])[:12]}).", "",
             f"- License: {config['license']}",
             f"- Release format: {config['format']} v{config['format_version']}; weights: "
             f"{'EMA' if config['weights']['ema'] else 'raw (the run had no EMA)'}, stored float32 "
             f"(elemental references float64); trained in {config['weights']['trained_precision']}",
             f"- Forces: **{config['forces']}**" + (
                 " (the direct force head the run trained; not the gradient of the energy, so NVE "
                 "molecular dynamics does not conserve energy: fine-tune conservatively with "
                 "`init_from=<this run>` and `engine.forces=conservative` before production MD)"
                 if direct else " (the negative gradient of the energy: conservative)"),
             f"- Cutoff {config['cutoff']} A; units {config['units']['energy']}, {config['units']['forces']}, "
             f"{config['units']['stress']}; stress sign: {config['units']['stress_sign']}",
             *fidelity_design_lines(model), "",
             "## Intended use", "",
             "Energies, forces and stress for atomistic simulation (relaxation, molecular dynamics) of "
             "structures like the training data, at a fidelity chosen by name: "
             "`MLIPCalculator.from_release(DIR, fidelity=NAME)` (`from pretrain.release import "
             "MLIPCalculator`). Pick the fidelity whose level of theory you want; the model never falls "
             "back to another head.", "",
             "## Training data", "",
             f"Content hash `{str(record.get('data', {}).get('content_hash'))[:16]}...`, "
             f"{record.get('data', {}).get('records', '?')} structures.", "",
             "| dataset | fidelity | structures | atoms | elements |", "|---|---|---:|---:|---|"]
    for g in record.get("data", {}).get("groups", []):
        lines.append(f"| {g['dataset']} | {g['fidelity']} | {g['structures']} | {g['atoms']} | "
                     f"{' '.join(sorted(g.get('elements') or {}))} |")
    lines += ["", "## Held-out metrics", ""]
    lines += metrics_lines(held_out, config)
    lines += target_card_lines(config.get("targets") or [], held_out)
    lines += forgetting_lines(record)
    basis = summary["flops_basis"]
    lines += ["", "## Training compute", "",
              f"- {summary['step']} optimizer steps on {summary['world_size']} rank(s) at the end; "
              f"{summary['device_hours']:.4f} device-hours (wall time x ranks of every job, from metrics.jsonl)",
              "- Atoms seen: " + ", ".join(f"{k} {v:,}" for k, v in summary["atoms_seen"].items()),
              f"- Training FLOPs: {summary['flops']:.3e} ({summary['flops_per_atom']:.4g} FLOP per atom "
              f"x atoms seen; measured on {basis.get('batches', '?')} of the run's own batches, "
              f"{basis.get('atoms', '?')} atoms with {basis.get('neighbors_per_atom', 0):.1f} neighbours "
              f"each, loss {basis.get('loss', '?')}; dense ops only, a lower bound)", ""]
    lines += [*extra, "## Known limits", ""]
    covered = {f["name"]: f["elements"] for f in config["fidelities"]}
    union = sorted({e for els in covered.values() for e in els})
    for name, els in covered.items():
        absent = [e for e in union if e not in els]
        lines.append(f"- {name}: trained on {' '.join(els) or 'no elements'}"
                     + (f"; no data (and no elemental reference) for {' '.join(absent)}: the calculator "
                        "refuses them at this fidelity unless `coverage='warn'`" if absent else ""))
    lines.append("- Elements outside all of these were never seen; their predictions are meaningless.")
    lines += coverage_limit_lines(summary.get("coverage"))
    return "\n".join(lines) + "\n"


_CARD_RANGES = ("nearest_distance", "pressure", "volume_per_atom")
_CARD_SHOWN = 20  # rare elements or pairs named per fidelity; the rest are counted


def coverage_limit_lines(coverage: dict | None) -> list[str]:
    """Known limits from the training data's coverage, per fidelity: the elements and
    element pairs in fewer than RARE_STRUCTURES structures, and the ranges of
    nearest-neighbour distance, pressure and volume per atom seen in training."""
    if not coverage:
        return ["- The training data's coverage was not recorded (its manifest predates coverage "
                "statistics): rebuild the data with `mlip-pretrain data build` to have it here."]
    units = coverage["units"]
    lines = [f"- Sparse training data (fewer than {RARE_STRUCTURES} structures; a pair counts the structures "
             "holding both elements) and the ranges seen in training, per fidelity; outside them the model "
             "extrapolates:"]
    for fid, lim in known_limits(coverage).items():
        never = f"; {lim['unseen_pairs']} pairs of its elements never in one structure" if lim["unseen_pairs"] else ""
        lines.append(f"  - {fid}: rare elements {counts_text(lim['rare_elements'], _CARD_SHOWN)}; rare element "
                     f"pairs {counts_text(lim['rare_pairs'], _CARD_SHOWN)}{never}; "
                     + "; ".join(f"{LABELS[q]} {range_text(lim, q, units)}" for q in _CARD_RANGES))
    return lines


def metrics_lines(held_out: dict | None, config: dict) -> list[str]:
    """The card's held-out metrics section (without its header)."""
    if held_out is None:
        return ["No held-out evaluation was run (the run had no `eval.folder`, or the release "
                "was made with `--no-eval`). Metrics on training data are never reported here."]
    data = held_out["data"]
    same = data["content_hash"] == config["data"].get("content_hash")
    lines = [f"`mlip-pretrain eval` on `{data['folder']}` (content hash `{data['content_hash'][:16]}...`, "
             f"{data['records']} structures)"
             + (": **this is the training data (same content hash), not a held-out split**" if same
                else ", held out from training (another content hash)") + ".",
             "", "| dataset | fidelity | structures | E MAE (meV/atom) | E RMSE (meV/atom) | F MAE (meV/A) "
             "| F RMSE (meV/A) | S MAE (meV/A^3) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in held_out["groups"]:
        lines.append(f"| {r['dataset']} | {r['fidelity']} | {r['structures']} | "
                     f"{_mev(r, 'energy_mae_per_atom')} | {_mev(r, 'energy_rmse_per_atom')} | "
                     f"{_mev(r, 'forces_mae')} | {_mev(r, 'forces_rmse')} | {_mev(r, 'stress_mae')} |")
    return lines + overlap_lines(held_out.get("leakage"), held_out.get("excluding_leaked")) \
        + strata_lines(held_out.get("strata"))


def fidelity_design_lines(model: dict) -> list[str]:
    """How the fidelities share the model: delta heads and the backbone's conditioning."""
    lines = [f"- Delta head: {fid} is learned as a correction to {base}'s prediction (its labels never "
             f"train {base}'s head)" for fid, base in (model.get("delta") or {}).items()]
    if model.get("fidelity_conditioning") == "layers":
        lines.append("- Fidelity conditioning: every layer's invariant features are scaled and shifted per fidelity")
    return lines


def forgetting_lines(record: dict) -> list[str]:
    """What a run that added fidelities to a trained model (``init_from`` with replay) did to
    the old heads: held-out errors on ``eval.replay_folder`` before its first step and after
    its last, per fidelity."""
    forgetting = record.get("forgetting") or {}
    before, after = forgetting.get("before"), forgetting.get("after")
    if not before or not after:
        return []
    replay = record.get("replay") or {}
    parts = replay.get("parts") or []
    source = (f" while replaying {100 * replay['fraction']:.0f}% of each epoch from `{parts[1]['folder']}` "
              f"(content hash `{parts[1]['content_hash'][:16]}...`)" if len(parts) > 1 else " (no replay)")
    lines = ["", "## Forgetting", "",
             f"This run started from a trained model{source}. Held-out errors of every fidelity on the "
             "replayed data's held-out split, with the starting weights and with the released ones:", "",
             "| fidelity | F MAE before (meV/A) | F MAE after (meV/A) | change | E MAE before (meV/atom) "
             "| E MAE after (meV/atom) | change |", "|---|---:|---:|---:|---:|---:|---:|"]
    fids = [k[len("replay_before/"):-len("/forces_mae")] for k in before if k.endswith("/forces_mae")]
    for fid in fids:
        row = [fid]
        for label in ("forces_mae", "energy_mae_per_atom"):
            b, a = before.get(f"replay_before/{fid}/{label}"), after.get(f"replay_after/{fid}/{label}")
            row += ["-", "-", "-"] if b is None or a is None else [
                f"{1000 * b:.2f}", f"{1000 * a:.2f}", f"{100 * (a / b - 1):+.1f}%" if b else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def target_card_lines(targets: list[dict], held_out: dict | None) -> list[str]:
    """The card's extra targets: what the calculator serves beside the energy, at which
    fidelities, and the held-out errors next to the labels' spread."""
    if not targets:
        return []
    calls = {"charges": "atoms.get_charges()", "dipole": "atoms.get_dipole_moment()",
             "magmoms": "atoms.get_magnetic_moments()"}
    lines = ["", "## Extra targets", "",
             "Learned beside the energy on the same backbone features, and served by the calculator "
             "from the same forward pass (`calc.predict` returns them too):", "",
             "| target | kind | served as | unit | trained at |", "|---|---|---|---|---|"]
    for t in targets:
        call = calls.get(t["served_as"], f"calc.get_property('{t['served_as']}', atoms)")
        lines.append(f"| {t['name']} | {t['kind']} | `{call}` | {t['unit'] or '-'} | {', '.join(t['fidelities'])} |")
    scored = (held_out or {}).get("targets") or {}
    rows = [(name, fid, r, t) for name, t in scored.items() for fid, r in t["fidelities"].items()]
    if rows:
        units = {t["name"]: t["unit"] or "" for t in targets}
        lines += ["", "Held-out errors (over components; a model predicting the mean label scores RMSE = "
                  "the labels' standard deviation):", "",
                  "| target | fidelity | items | MAE | RMSE | label RMS | label std |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for name, fid, r, _ in rows:
            u = units.get(name, "")
            lines.append(f"| {name} | {fid} | {r['items']} | {r['mae']:.4f} {u} | {r['rmse']:.4f} {u} | "
                         f"{r['ref_rms']:.4f} {u} | {r['ref_std']:.4f} {u} |")
    return lines


def overlap_lines(report: dict | None, clean: dict | None) -> list[str]:
    """How many held-out structures are also in the training data (exact and near copies,
    by fidelity; molecules by formula), and the metrics without the leaked ones."""
    if report is None:
        return ["", "Overlap with the training data: not checked (the training shards were not available)."]
    lines = ["", "### Overlap with the training data", "",
             f"Fingerprints of the {report['eval']['records']} held-out structures against the "
             f"{report['train']['records']} training structures ({report['definitions']}).", "",
             "| fidelity | held out | exact copy, same fidelity | near copy, same fidelity | "
             "exact copy, other fidelity | molecules with a formula in training |",
             "|---|---:|---:|---:|---:|---:|"]
    for f, c in report["fidelities"].items():
        mol = f"{c['molecules_formula_in_training']} / {c['molecules']}" if c["molecules"] else "-"
        lines.append(f"| {f} | {c['records']} | {c['exact_same_fidelity']} | {c['near_same_fidelity']} | "
                     f"{c['exact_other_fidelity']} | {mol} |")
    leaked = report["leaked_same_fidelity"]
    if not leaked:
        lines += ["", "No held-out structure is in the training data at its fidelity."]
        return lines
    lines += ["", f"**{leaked} held-out structures are in the training data at their fidelity**: the table "
              "above includes them. Without them (`eval --exclude-leaked`):", "",
              "| fidelity | structures | E MAE (meV/atom) | F MAE (meV/A) |", "|---|---:|---:|---:|"]
    for f, m in ((clean or {}).get("fidelities") or {}).items():
        lines.append(f"| {f} | {m['structures']} | {_mev(m, 'energy_mae_per_atom')} | {_mev(m, 'forces_mae')} |")
    return lines


def strata_lines(strata: dict | None) -> list[str]:
    """Force MAE per element and per band of reference force magnitude, per fidelity (a
    subsection of the held-out metrics; ``metrics.json["strata"]`` has the rest)."""
    if not strata:
        return []
    elements = sorted({el for s in strata.values() for el in s["elements"]},
                      key=lambda el: chemical_symbols.index(el))
    bins = next(iter(strata.values()))["force_bins"]
    lines = ["", "### Force errors by element and by force magnitude", "",
             "Force MAE (meV/A) over the force components of each element's atoms:", "",
             "| fidelity | " + " | ".join(elements) + " |", "|---|" + "---:|" * len(elements)]
    for fid, s in strata.items():
        lines.append(f"| {fid} | " + " | ".join(_mev(s["elements"].get(el, {}), "forces_mae") for el in elements)
                     + " |")
    lines += ["", "Force MAE (meV/A) of the atoms whose reference force |F| (eV/A) is in each band "
              "(atoms in brackets); the MAE relative to the band's mean |F| is in `metrics.json`:", "",
              "| fidelity | " + " | ".join(_band(r) for r in bins) + " |", "|---|" + "---:|" * len(bins)]
    for fid, s in strata.items():
        lines.append(f"| {fid} | " + " | ".join(f"{_mev(r, 'forces_mae')} ({r['atoms']})" for r in s["force_bins"])
                     + " |")
    return lines


def _band(row: dict) -> str:
    lo, hi = row["lo"], row["hi"]
    return f"{lo:g} and up" if hi is None else f"{lo:g}-{hi:g}"


METHOD_TEXT = {
    "llpr": "last-layer prediction rigidity (LLPR), fitted after training: the covariance of the energy "
            "heads' last-layer features and of each atom's backbone invariants and l = 1 features over a "
            "sample of the training data; a prediction whose features the training data did not pin down "
            "gets a large uncertainty",
    "ensemble": "a trained shallow ensemble: {members} energy and force-deviation readouts per fidelity on the "
                "shared backbone, trained with the Gaussian negative log-likelihood of the served "
                "prediction's residual; the uncertainty is their spread",
}


def uncertainty_card_lines(uq: dict | None, held_out: dict | None) -> list[str]:
    """The card's uncertainty section: method, calibration, and held-out scores per fidelity."""
    lines = ["## Uncertainty", ""]
    if uq is None:
        return lines + ["This release carries no per-prediction uncertainty; the calculator says so when "
                        "asked for `energy_uncertainty` or `forces_uncertainty`.", ""]
    cal = uq["calibration"]
    lines += [f"Method: {METHOD_TEXT[uq['method']].format(members=uq.get('members'))}.",
              f"Calibrated per fidelity on `{cal['folder']}` (content hash `{cal['content_hash'][:16]}...`, "
              f"{cal['records']}): one energy scale and two force weights, split conformal at 95% (the "
              "interval of +-1.96 sigma covers 95% of new structures drawn like the calibration ones), and "
              "the interval half-widths at every other level, split conformal too.",
              "The calculator returns `results['energy_uncertainty']` (eV, total energy) and "
              "`results['forces_uncertainty']` (eV/A per atom and Cartesian component): the 95% interval is "
              "+-1.96 of them; other levels' calibrated half-widths come from `calc.interval(level)` (the "
              "errors are heavy-tailed, so the 68% interval is narrower than +-1 sigma). "
              "`pretrain.release.UncertaintyGuard` flags or stops MD past a threshold.", ""]
    scores = (held_out or {}).get("uncertainty")
    if not scores:
        return lines + ["No held-out score of the uncertainty was run.", ""]
    lines += [f"Scored on held-out records the calibration never saw ({scores['scored']}):", "",
              "| fidelity | structures | Spearman E | Spearman F (structure) | Spearman F (atom) | F 68% interval "
              "| F coverage 68% | F coverage 95% | F miscal. area | F NLL | E coverage 95% |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fid, m in scores["fidelities"].items():
        e, f = m.get("energy", {}), m.get("forces", {})
        lines.append(f"| {fid} | {e.get('items', 0)} | {_num(e, 'spearman')} | {_num(f, 'spearman_structure')} | "
                     f"{_num(f, 'spearman')} | +-{_num(f, 'width_68')} sigma | {_pct(f, 'coverage_68')} | "
                     f"{_pct(f, 'coverage_95')} | "
                     f"{_num(f, 'miscalibration_area', 3)} | {_num(f, 'nll')} | {_pct(e, 'coverage_95')} |")
    ood = scores.get("out_of_distribution") or {}
    if ood:
        lines += ["", "Out of distribution: the median force uncertainty per atom (F) and energy uncertainty per "
                  f"atom (E) of the same held-out structures compressed to {next(iter(ood.values()))['compression']:g} "
                  "of their size, and of held-out structures with elements this fidelity never saw, over the "
                  "held-out structures as they are:",
                  "", "| fidelity | F in distribution (eV/A) | F compressed | F unseen elements | E in distribution "
                  "(eV/atom) | E compressed | E unseen elements |", "|---|---:|---:|---:|---:|---:|---:|"]
        for fid, r in ood.items():
            def x(key):
                return f"{r[key]:.1f}x" if key in r else "-"
            lines.append(f"| {fid} | {r['in_distribution']:.3f} | {x('compressed_ratio')} | {x('unseen_ratio')} | "
                         f"{r['energy_in_distribution']:.3f} | {x('energy_compressed_ratio')} | "
                         f"{x('energy_unseen_ratio')} |")
    uncal = uq.get("uncalibrated") or []
    if uncal:
        lines.append(f"\nNot calibrated (no labelled held-out data): {', '.join(uncal)}.")
    return lines + [""]


def _num(m: dict, key: str, digits: int = 2) -> str:
    v = m.get(key)
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def _pct(m: dict, key: str) -> str:
    v = m.get(key)
    return "-" if v is None else f"{100 * v:.1f}%"
