"""``mlip-pretrain eval MODEL DATA``: held-out errors per dataset x fidelity, and parity plots.

Every record of the shard folder is evaluated exactly once: rank ``r`` of ``W`` takes
records ``r, r + W, ...``, packs them to an atom budget and sums, per dataset x fidelity,
absolute and squared errors in float64; one all-reduce adds the ranks' sums, so the
metrics are the same on 1 rank or 8. Record fidelities map to the model's heads by
name (:meth:`common.fidelities.FidelityTable.indices`): a folder built with its own recipe,
fidelities in another order, gives the same numbers.

Columns of the sums (``COLUMNS``): structures, atoms, then for energy per atom, force
components and stress components: labelled count, sum |err|, sum err^2. The same sums
per fidelity by element, by reference force magnitude and by reference pressure
(``pretrain/strata.py``) are all-reduced with them, under ``"strata"``; the breakdown by
dataset is the ``"groups"`` rows. A model with extra targets (charges, dipoles, ...) is
scored on each per fidelity, next to the labels' spread, under ``"targets"``
(``pretrain/target_metrics.py``), with a parity plot per target.

A model with calibrated uncertainty (``models/uncertainty.py``) is also scored on how
well its predicted uncertainty matches the actual errors (``pretrain/uncertainty/metrics.py``),
per dataset x fidelity and per fidelity, under ``"uncertainty"``. Records the model was
calibrated on (the even half of the same held-out folder, :func:`pretrain.uncertainty.fit.split_held_out`)
are left out of that score: the metrics are on data the calibration never saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.progress import Progress
from data_pipeline import keys as K
from data_pipeline.batch import to_torch
from data_pipeline.stream.collate import BatchBuilder
from data_pipeline.stream.sampler import pack
from models.properties import LAYOUT
from pretrain.strata import Strata
from pretrain.target_metrics import TargetErrors, target_parity_plots

COLUMNS = ("structures", "atoms", "e_n", "e_abs", "e_sq", "f_n", "f_abs", "f_sq", "s_n", "s_abs", "s_sq")
PLOT_POINTS = 20000  # force components per fidelity kept for a parity plot


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_group() -> tuple[int, int, bool]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), gloo on CPU or
    NCCL on GPUs; ``(rank, world_size, joined here)``. A single process joins nothing."""
    import os  # noqa: PLC0415

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return (*rank_and_world(), False)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (*rank_and_world(), True)


def evaluate(potential, folder: str | Path, max_atoms: int = 2048, progress: bool = True,
             device: torch.device | str = "cpu", dtype: str = "float32", direct: bool = False,
             calibration: dict | None = None, exclude: np.ndarray | None = None) -> dict:
    """Metrics of ``potential`` on every record of ``folder`` (all ranks call this; every
    rank returns the same metrics, rank 0 also the points of its parity plots).

    ``direct``: forces (and stress, where the model has a head for it) from the direct
    heads, as a direct-force run trained, validated and serves them (``TrainedModel.direct``).
    ``calibration``: what the model's uncertainty was calibrated on (a release's
    ``config.json["uncertainty"]["calibration"]``): when it is this folder's held-out
    split, the calibration half is left out of the uncertainty score.
    ``exclude``: bool per record of ``folder``; those are not evaluated (``--exclude-leaked``:
    the records :func:`data_pipeline.leakage.leakage` found in the training data)."""
    rank, world = rank_and_world()
    heads = getattr(potential, "properties", None)
    extras = {t.name: LAYOUT[t.kind] for t in heads.targets} if heads is not None else None
    builder = BatchBuilder(folder, potential.cutoff, dtype, potential.fidelities, extras)
    ds, manifest = builder.dataset, builder.dataset.manifest
    scored = _uncertainty_records(potential, folder, manifest, calibration)
    groups = [(d, f) for d in manifest["datasets"] for f in manifest["fidelities"]]
    group_of = (ds.dataset_ids * len(manifest["fidelities"]) + ds.fidelity_ids)
    mine = np.arange(rank, len(ds), world, dtype=np.int64)
    if exclude is not None:
        mine = mine[~np.asarray(exclude, bool)[mine]]
    bounds = pack(ds.n_atoms[mine], max_atoms)
    sums = torch.zeros(len(groups), len(COLUMNS), dtype=torch.float64)
    strata = Strata(len(manifest["fidelities"]))
    targets = TargetErrors(potential, manifest["fidelities"])
    points: dict[str, list] = {f: [] for f in manifest["fidelities"]}
    uq: dict[int, list] = {}  # group -> [(e_res, e_sigma, f_res, f_sigma, f_graph)] of scored records
    potential = potential.to(device).eval()
    with Progress(len(mine), "eval", unit="structures", enabled=progress and rank == 0) as bar:
        for a, b in zip(bounds[:-1], bounds[1:]):
            idx = mine[a:b]
            batch = {k: v.to(device) for k, v in to_torch(builder(idx)).items()}
            stress = bool(batch[K.STRESS_MASK].any())
            with torch.enable_grad():
                out = potential(batch, forces=True, stress=stress, create_graph=False, direct=direct,
                                uncertainty=scored is not None)
            group, res = torch.as_tensor(group_of[idx]), _residuals(out, batch)
            _accumulate(sums, points, out, batch, res, group, groups)
            strata.add(batch, group % len(manifest["fidelities"]), res["e_err"], res["f_err"], res["s_err"])
            targets.add(out, batch, group % len(manifest["fidelities"]))
            if scored is not None:
                _uncertainty_items(uq, out, batch, group_of[idx], scored)
            bar.update(len(idx))
    if world > 1:
        for t in (sums, *strata.tensors, *targets.tensors):
            dist.all_reduce(t)
        gathered = [None] * world
        dist.all_gather_object(gathered, (points, uq, targets.points))
        points = {f: sum((g[0][f] for g in gathered), []) for f in points}
        uq = {k: sum((g[1].get(k, []) for g in gathered), []) for k in set().union(*(g[1] for g in gathered))}
        target_points = targets.gathered_points([g[2] for g in gathered])
    else:
        target_points = targets.gathered_points([targets.points])
    metrics = {"groups": _group_rows(sums, groups), "fidelities": _fidelity_rows(sums, groups),
               "strata": strata.metrics(manifest["fidelities"]), "targets": targets.metrics(),
               "data": {"folder": str(Path(folder).resolve()), "content_hash": manifest["content_hash"],
                        "records": len(ds), "excluded": int(np.sum(exclude)) if exclude is not None else 0},
               "points": points if rank == 0 else None,
               "target_points": target_points if rank == 0 else None}
    if scored is not None:
        widths = _widths(potential)
        metrics["uncertainty"] = _uncertainty_scores(uq, groups, calibration, manifest, widths)
        metrics["uncertainty_curves"] = _curves(uq, groups, widths) if rank == 0 else None
    return metrics


def _uncertainty_records(potential, folder, manifest: dict, calibration: dict | None) -> np.ndarray | None:
    """Boolean mask of the records whose uncertainty is scored (None: no calibrated uncertainty)."""
    unc = getattr(potential, "uncertainty", None)
    if unc is None or not unc.calibrated_fidelities:
        return None
    from data_pipeline.stream.dataset import ShardedDataset  # noqa: PLC0415
    from pretrain.uncertainty.fit import split_held_out  # noqa: PLC0415

    keep = np.ones(len(ShardedDataset(folder)), dtype=bool)
    if calibration and calibration.get("content_hash") == manifest["content_hash"] \
            and calibration.get("records") == "even positions per fidelity":
        keep[split_held_out(folder)[0]] = False
    return keep


def _uncertainty_items(uq: dict, out: dict, batch: dict, group: np.ndarray, scored: np.ndarray) -> None:
    """Add one batch's residuals and predicted uncertainties per group (scored records only)."""
    index = batch[K.INDEX].cpu().numpy()
    b = batch[K.BATCH].cpu().numpy()
    emask = batch[K.ENERGY_MASK].cpu().numpy().astype(bool) & scored[index]
    fmask = batch[K.FORCES_MASK].cpu().numpy().astype(bool) & scored[index][b]
    e_res = (out["energy"].detach().cpu() - batch[K.ENERGY].cpu()).numpy()
    f_res = (out["forces"].detach().cpu().double() - batch[K.FORCES].cpu().double()).numpy()
    e_sig = out["energy_uncertainty"].detach().cpu().double().numpy()
    f_sig = out["forces_uncertainty"].detach().cpu().double().numpy()
    for g in np.unique(group):
        gs, atoms = emask & (group == g), fmask & (group == g)[b]
        uq.setdefault(int(g), []).append((e_res[gs], e_sig[gs], f_res[atoms], f_sig[atoms], index[b[atoms]]))


def _joined(parts: list) -> tuple:
    return tuple(np.concatenate([p[k] for p in parts]) if parts else np.zeros(0) for k in range(5))


def _widths(potential) -> dict[str, tuple]:
    """Per fidelity name, the calibrated interval tables (energy, forces), or Nones."""
    unc = potential.uncertainty
    table = unc.widths.detach().cpu().numpy()
    return {name: (table[f, 0], table[f, 1]) if table[f].any() else (None, None)
            for f, name in enumerate(potential.fidelities)}


def _by_fidelity(uq: dict, groups: list) -> dict[str, list]:
    """The scored items of every dataset x fidelity group, joined per fidelity."""
    by_fid: dict[str, list] = {}
    for g, parts in uq.items():
        by_fid.setdefault(groups[g][1], []).extend(parts)
    return by_fid


def _uncertainty_scores(uq: dict, groups: list, calibration: dict | None, manifest: dict, widths: dict) -> dict:
    from pretrain.uncertainty.metrics import uncertainty_report  # noqa: PLC0415

    rows = [{"dataset": groups[g][0], "fidelity": groups[g][1],
             **uncertainty_report(*_joined(parts), widths=widths[groups[g][1]])}
            for g, parts in sorted(uq.items())]
    by_fid = _by_fidelity(uq, groups)
    split = (calibration or {}).get("content_hash") == manifest["content_hash"]
    return {"groups": rows, "fidelities": {f: uncertainty_report(*_joined(p), widths=widths[f])
                                           for f, p in by_fid.items()},
            "scored": "odd positions per fidelity (the even ones calibrated)" if split else "all records"}


def _curves(uq: dict, groups: list, widths: dict) -> dict:
    out = {}
    for fid, parts in _by_fidelity(uq, groups).items():
        e_res, e_sig, f_res, f_sig, _ = _joined(parts)
        out[fid] = {"energy": (e_res, e_sig, widths[fid][0]), "forces": (f_res, f_sig, widths[fid][1])}
    return out


def _residuals(out: dict, batch: dict) -> dict:
    """One batch's errors on the CPU in float64, zero where unlabelled: ``e_pred``, ``e_ref``,
    ``e_err`` energy per atom [G], ``f_err`` [N, 3], ``s_err`` [G, 6] (None: the model served
    no stress)."""
    n = batch[K.N_ATOMS].cpu().double()
    e_pred, e_ref = out["energy"].detach().cpu() / n, batch[K.ENERGY].cpu() / n
    fmask, smask = batch[K.FORCES_MASK].cpu(), batch[K.STRESS_MASK].cpu().double()
    f_err = (out["forces"].detach().cpu().double() - batch[K.FORCES].cpu().double()) * fmask[:, None]
    s_err = ((out["stress"].detach().cpu().double() - batch[K.STRESS].cpu().double()) * smask[:, None]
             if "stress" in out else None)
    return {"e_pred": e_pred, "e_ref": e_ref, "e_err": (e_pred - e_ref) * batch[K.ENERGY_MASK].cpu().double(),
            "f_err": f_err, "s_err": s_err}


def _accumulate(sums, points, out, batch, res, group, groups) -> None:
    """Add one batch's error sums (``res``: :func:`_residuals`) per group, and its parity
    points per fidelity."""
    b, n = batch[K.BATCH].cpu(), batch[K.N_ATOMS].cpu().double()
    e_pred, e_ref, e_err, f_err = res["e_pred"], res["e_ref"], res["e_err"], res["f_err"]
    emask = batch[K.ENERGY_MASK].cpu().double()
    cols = [torch.ones_like(n), n, emask, e_err.abs(), e_err.square()]
    fmask = batch[K.FORCES_MASK].cpu()
    per_graph = lambda v: torch.zeros(len(n), dtype=torch.float64).index_add_(0, b, v)  # noqa: E731
    cols += [per_graph(3 * fmask.double()), per_graph(f_err.abs().sum(1)), per_graph(f_err.square().sum(1))]
    if res["s_err"] is not None:
        s_err = res["s_err"]
        cols += [6 * batch[K.STRESS_MASK].cpu().double(), s_err.abs().sum(1), s_err.square().sum(1)]
    else:
        cols += [torch.zeros_like(n)] * 3
    sums.index_add_(0, group, torch.stack(cols, dim=1))
    for g in torch.unique(group).tolist():
        fid = groups[g][1]
        sel = (group == g) & (emask > 0)
        atom_sel = (group == g)[b] & fmask
        pts = points[fid]
        kept = sum(len(p[2]) for p in pts)
        forces = out["forces"].detach().cpu()[atom_sel].reshape(-1).tolist()
        ref_f = batch[K.FORCES].cpu()[atom_sel].reshape(-1).tolist()
        room = max(0, PLOT_POINTS - kept)
        pts.append((e_ref[sel].tolist(), e_pred[sel].tolist(), ref_f[:room], forces[:room]))


def _metrics(row: list[float]) -> dict:
    c = dict(zip(COLUMNS, row))
    out = {"structures": int(c["structures"]), "atoms": int(c["atoms"])}
    if c["e_n"]:
        out["energy_mae_per_atom"] = c["e_abs"] / c["e_n"]
        out["energy_rmse_per_atom"] = (c["e_sq"] / c["e_n"]) ** 0.5
    if c["f_n"]:
        out["forces_mae"] = c["f_abs"] / c["f_n"]
        out["forces_rmse"] = (c["f_sq"] / c["f_n"]) ** 0.5
    if c["s_n"]:
        out["stress_mae"] = c["s_abs"] / c["s_n"]
    return out


def _group_rows(sums, groups) -> list[dict]:
    return [{"dataset": d, "fidelity": f, **_metrics(sums[g].tolist())}
            for g, (d, f) in enumerate(groups) if sums[g, 0] > 0]


def _fidelity_rows(sums, groups) -> dict[str, dict]:
    names = sorted({f for _, f in groups}, key=[f for _, f in groups].index)
    out = {}
    for name in names:
        rows = [g for g, (_, f) in enumerate(groups) if f == name]
        total = sums[rows].sum(0)
        if total[0] > 0:
            out[name] = _metrics(total.tolist())
    return out


def table(metrics: dict) -> str:
    """The printed table: one line per dataset x fidelity, errors in meV."""
    head = (f"{'dataset':<16} {'fidelity':<18} {'structs':>7} {'atoms':>8} {'E MAE':>8} {'E RMSE':>8} "
            f"{'F MAE':>8} {'F RMSE':>8} {'S MAE':>8}")
    units = f"{'':<16} {'':<18} {'':>7} {'':>8} {'meV/atom':>8} {'meV/atom':>8} {'meV/A':>8} {'meV/A':>8} {'meV/A3':>8}"
    lines = [head, units]
    for r in metrics["groups"]:
        def cell(key):
            return f"{1000 * r[key]:8.2f}" if key in r else f"{'-':>8}"
        lines.append(f"{r['dataset'][:16]:<16} {r['fidelity'][:18]:<18} {r['structures']:>7} {r['atoms']:>8} "
                     f"{cell('energy_mae_per_atom')} {cell('energy_rmse_per_atom')} {cell('forces_mae')} "
                     f"{cell('forces_rmse')} {cell('stress_mae')}")
    return "\n".join(lines)


def uncertainty_table(scores: dict) -> str:
    """The printed uncertainty score: one line per dataset x fidelity."""
    lines = [f"uncertainty, scored on {scores['scored']}:",
             f"{'dataset':<16} {'fidelity':<18} {'rho E':>6} {'rho F/s':>7} {'rho F/a':>7} {'F cov68':>7} "
             f"{'F cov95':>7} {'F area':>6} {'F NLL':>6}"]
    for r in scores["groups"]:
        e, f = r.get("energy", {}), r.get("forces", {})
        cell = lambda m, k, w=7, d=2: f"{m[k]:{w}.{d}f}" if k in m and m[k] == m[k] else f"{'-':>{w}}"  # noqa: E731
        lines.append(f"{r['dataset'][:16]:<16} {r['fidelity'][:18]:<18} {cell(e, 'spearman', 6)} "
                     f"{cell(f, 'spearman_structure')} {cell(f, 'spearman')} {cell(f, 'coverage_68')} "
                     f"{cell(f, 'coverage_95')} {cell(f, 'miscalibration_area', 6, 3)} {cell(f, 'nll', 6)}")
    return "\n".join(lines)


def parity_plots(points: dict, metrics: dict, out: Path) -> list[Path]:
    """One PNG per fidelity: energy per atom and force components, predicted vs reference."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    written = []
    for fid, parts in points.items():
        if not parts:
            continue
        cols = [np.concatenate([np.asarray(p[k], dtype=float) for p in parts]) for k in range(4)]
        m = metrics["fidelities"].get(fid, {})
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
        for ax, ref, pred, what, key, unit in (
                (axes[0], cols[0], cols[1], "energy per atom (eV/atom)", "energy_mae_per_atom", "meV/atom"),
                (axes[1], cols[2], cols[3], "force components (eV/A)", "forces_mae", "meV/A")):
            if len(ref):
                parity_panel(ax, ref, pred)
            mae = f"MAE {1000 * m[key]:.1f} {unit}" if key in m else "no labels"
            ax.set(xlabel=f"reference {what}", ylabel=f"predicted {what}", title=f"{fid}: {mae}")
        fig.tight_layout()
        path = out / f"parity-{_slug(fid)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def parity_panel(ax, ref: np.ndarray, pred: np.ndarray) -> None:
    """Predicted vs reference points on ``ax``, with the line y = x across their range."""
    lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1)
    ax.scatter(ref, pred, s=4, alpha=0.5, edgecolors="none")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def write_outputs(metrics: dict, source: dict, out: Path) -> list[Path]:
    """``metrics.json`` (without the plot points) and the parity plots, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    from common.atomic import write_atomic  # noqa: PLC0415

    saved = {k: v for k, v in metrics.items() if k not in ("points", "target_points", "uncertainty_curves")}
    write_atomic(out / "metrics.json", json.dumps({"model": source, **saved}, indent=1) + "\n")
    written = [out / "metrics.json"] + parity_plots(metrics["points"] or {}, metrics, out)
    written += target_parity_plots(metrics.get("target_points") or {}, metrics, out)
    if metrics.get("uncertainty_curves"):
        from pretrain.uncertainty.metrics import reliability_plot  # noqa: PLC0415

        written.append(reliability_plot(metrics["uncertainty_curves"], out / "reliability.png"))
    return written
