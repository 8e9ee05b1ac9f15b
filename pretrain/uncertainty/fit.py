"""Fit LLPR on training shards and calibrate a model's uncertainty on held-out data.

LLPR (``models/uncertainty.py``): per fidelity, the covariance of the energy features
``C_E = sum_s f_s f_s^T`` (per structure), of the atoms' invariants ``C_inv = sum_a s_a
s_a^T`` and of their l = 1 features ``C_l1 = sum_a sum_m x_am x_am^T``, over a stated
sample of the training shards: at most ``max_structures`` per fidelity, evenly strided over its records (the
same sample on any number of ranks). Rank ``r`` of ``W`` takes every ``W``-th record of
the sample and runs a float64 copy of the model (float32 features would depend on how
records fall into batches at the 1e-7 level); one all-reduce adds the float64 sums, so 2
ranks give 1 rank's covariance up to the order of float64 additions.

Calibration, per fidelity: the held-out records are split in two by position within
their fidelity (even: calibration, odd: report), unless a separate calibration folder is
given (then all of the held-out folder is reported). On the calibration records:

* the shape: for forces the share of the invariant variance in ``sigma^2 = a v_inv + b
  v_l1`` (:data:`MIXES`) and for LLPR the regulariser of ``P = (C + r I)^-1``
  (:data:`REGULARISERS`, times the mean eigenvalue) with the lowest Gaussian NLL, each at
  its maximum-likelihood scale;
* the scale: split conformal at 95%, the ``ceil((n + 1) 0.95) / n`` quantile of
  ``|residual| / sigma_raw`` over the calibration items (structures; force components)
  divided by 1.96, so the 95% interval ``+-1.96 sigma`` covers 95% of new items drawn like
  the calibration ones. Errors of MLIPs are heavy-tailed: the maximum-likelihood
  (variance-matching) scale widens every interval for a few large residuals (100%
  coverage of the demo's DFT forces at 95%, measured);
* the intervals: at every level ``p`` of ``metrics.LEVELS`` the split-conformal quantile
  of ``|residual| / sigma`` (sigma now calibrated), so ``+-w(p) sigma`` covers ``p`` of
  new items at every level, not only at 95% (``Uncertainty.widths``).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common.errors import UserError
from common.progress import Progress
from data_pipeline import keys as K
from data_pipeline.batch import to_torch
from data_pipeline.stream.collate import BatchBuilder
from data_pipeline.stream.sampler import pack
from pretrain.evaluate import rank_and_world
from pretrain.uncertainty.metrics import LEVELS, Z95

#: candidate LLPR regularisers, in units of the mean eigenvalue of the covariance
REGULARISERS = (1e-8, 1e-6, 1e-4, 1e-2, 1.0)
#: candidate shares of the invariant variance in the force variance (the rest: l = 1)
MIXES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
MAX_STRUCTURES = 10000  # LLPR sample per fidelity: the covariance of H x H features settles well before


class CalibrationError(UserError, ValueError):
    """Held-out data that cannot calibrate the model (no labels for a fidelity, ...)."""


@dataclasses.dataclass
class LLPRCovariance:
    """Summed feature outer products per model fidelity (float64) and what was summed."""

    energy: torch.Tensor  # [F, H, H]
    forces_inv: torch.Tensor  # [F, C, C]
    forces: torch.Tensor  # [F, C, C], l = 1
    structures: torch.Tensor  # [F]
    atoms: torch.Tensor  # [F]


def llpr_sample(folder: str | Path, max_structures: int = MAX_STRUCTURES) -> np.ndarray:
    """Global record indices of the LLPR sample: per fidelity of ``folder``, at most
    ``max_structures`` records evenly strided over that fidelity's records."""
    from data_pipeline.stream.dataset import ShardedDataset  # noqa: PLC0415

    ds = ShardedDataset(folder)
    picked = []
    for f in np.unique(ds.fidelity_ids):
        rows = np.flatnonzero(ds.fidelity_ids == f)
        if len(rows) > max_structures:
            rows = rows[np.linspace(0, len(rows) - 1, max_structures).round().astype(np.int64)]
        picked.append(rows)
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def accumulate_llpr(potential, folder: str | Path, max_structures: int = MAX_STRUCTURES,
                    max_atoms: int = 2048, progress: bool = True) -> LLPRCovariance:
    """The LLPR covariance of ``potential`` over the sample of ``folder`` (all ranks call
    this and return the same sums)."""
    rank, world = rank_and_world()
    builder = BatchBuilder(folder, potential.cutoff, "float32", potential.fidelities)
    mine = llpr_sample(folder, max_structures)[rank::world]
    hidden, channels = potential.heads.h, potential.heads.hidden.in_features
    n_fid = len(potential.fidelities)
    potential = copy.deepcopy(potential).double()  # float64 features: the same on any batching
    c_e = torch.zeros(n_fid, hidden, hidden, dtype=torch.float64)
    c_s = torch.zeros(n_fid, channels, channels, dtype=torch.float64)
    c_f = torch.zeros(n_fid, channels, channels, dtype=torch.float64)
    counts = torch.zeros(2, n_fid, dtype=torch.float64)
    potential.eval()
    bounds = pack(builder.dataset.n_atoms[mine], max_atoms)
    with Progress(len(mine), "LLPR covariance", unit="structures", enabled=progress and rank == 0) as bar, \
            torch.no_grad():
        for a, b in zip(bounds[:-1], bounds[1:]):
            batch = to_torch(builder(mine[a:b]))
            out = potential(batch, forces=False, uncertainty="features")
            fid_g, fid_a = batch[K.FIDELITY], batch[K.FIDELITY][batch[K.BATCH]]
            f_s, x = out["energy_features"].double(), out["force_features"].double()  # [G, H], [N, m, C]
            inv = out["force_features_inv"].double()  # [N, C]
            c_e.index_add_(0, fid_g, f_s[:, :, None] * f_s[:, None, :])
            c_s.index_add_(0, fid_a, inv[:, :, None] * inv[:, None, :])
            c_f.index_add_(0, fid_a, torch.einsum("nmc,nmd->ncd", x, x))
            counts[0].index_add_(0, fid_g, torch.ones_like(fid_g, dtype=torch.float64))
            counts[1].index_add_(0, fid_a, torch.ones_like(fid_a, dtype=torch.float64))
            bar.update(b - a)
    parts = [c_e, c_s, c_f, counts]
    if world > 1:  # the one collective: every rank's sums, added
        packed = torch.cat([t.flatten() for t in parts])
        dist.all_reduce(packed)
        parts = [chunk.view_as(t) for chunk, t in zip(packed.split([t.numel() for t in parts]), parts)]
    c_e, c_s, c_f, counts = parts
    return LLPRCovariance(c_e, c_s, c_f, counts[0], counts[1])


def precision(cov: torch.Tensor, relative: float) -> torch.Tensor:
    """``(C + r I)^-1`` with ``r = relative * mean eigenvalue`` (an empty C gives I / r)."""
    dim = cov.shape[-1]
    mean_eig = float(torch.diagonal(cov).sum()) / dim
    reg = relative * (mean_eig if mean_eig > 0 else 1.0)
    return torch.linalg.inv(cov + reg * torch.eye(dim, dtype=cov.dtype))


def split_held_out(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(calibration, report) record indices of a held-out folder: within each fidelity,
    records at even positions calibrate, odd ones are reported."""
    from data_pipeline.stream.dataset import ShardedDataset  # noqa: PLC0415

    ds = ShardedDataset(folder)
    cal, rep = [], []
    for f in np.unique(ds.fidelity_ids):
        rows = np.flatnonzero(ds.fidelity_ids == f)
        cal.append(rows[0::2])
        rep.append(rows[1::2])
    join = lambda parts: np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)  # noqa: E731
    return join(cal), join(rep)


def held_out_items(potential, folder: str | Path, records: np.ndarray, direct: bool = False,
                   features: bool = False, max_atoms: int = 2048, progress: bool = True) -> dict:
    """Per model fidelity id, numpy arrays of the labelled items of ``records``:
    ``e_res [S]`` (total energy, eV), ``f_res [A, 3]`` (eV/A) residuals of the prediction as
    served, and with ``features`` the LLPR features (``e_x [S, H]``, ``f_inv [A, C]``,
    ``f_x [A, m, C]``), else the model's raw variances (``e_x [S]``, ``f_inv [A]``,
    ``f_x [A]``). All ranks call this."""
    rank, world = rank_and_world()
    builder = BatchBuilder(folder, potential.cutoff, "float32", potential.fidelities)
    mine = np.asarray(records, dtype=np.int64)[rank::world]
    parts: dict[int, dict[str, list]] = {}
    potential = potential.eval()
    bounds = pack(builder.dataset.n_atoms[mine], max_atoms)
    with Progress(len(mine), "uncertainty pass", unit="structures", enabled=progress and rank == 0) as bar:
        for a, b in zip(bounds[:-1], bounds[1:]):
            batch = to_torch(builder(mine[a:b]))
            with torch.enable_grad():
                out = potential(batch, forces=True, create_graph=False, direct=direct,
                                uncertainty="features" if features else True)
            _collect(parts, out, batch, features)
            bar.update(b - a)
    items = {f: {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in p.items()} for f, p in parts.items()}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, items)
        merged: dict[int, dict] = {}
        for g in gathered:
            for f, p in g.items():
                merged.setdefault(f, {k: [] for k in p})
                for k, v in p.items():
                    merged[f][k].append(v)
        items = {f: {k: np.concatenate(v) for k, v in p.items()} for f, p in sorted(merged.items())}
    return items


def _collect(parts: dict, out: dict, batch: dict, features: bool) -> None:
    b = batch[K.BATCH]
    emask, fmask = batch[K.ENERGY_MASK].bool(), batch[K.FORCES_MASK].bool()
    e_res = (out["energy"].detach() - batch[K.ENERGY]).numpy()
    f_res = (out["forces"].detach().double() - batch[K.FORCES].double()).numpy()
    e_x = out["energy_features" if features else "energy_var"].detach().double().numpy()
    f_inv = out["force_features_inv" if features else "forces_var_inv"].detach().double().numpy()
    f_x = out["force_features" if features else "forces_var_l1"].detach().double().numpy()
    fid_g, fid_a = batch[K.FIDELITY].numpy(), batch[K.FIDELITY][b].numpy()
    graph = b.numpy()
    for f in np.unique(fid_g):
        p = parts.setdefault(int(f), {"e_res": [], "e_x": [], "f_res": [], "f_inv": [], "f_x": [], "f_graph": []})
        gs = (fid_g == f) & emask.numpy()
        p["e_res"].append(e_res[gs])
        p["e_x"].append(e_x[gs])
        atoms = (fid_a == f) & fmask.numpy()
        p["f_res"].append(f_res[atoms])
        p["f_inv"].append(f_inv[atoms])
        p["f_x"].append(f_x[atoms])
        # a structure key per atom (index of the record), so per-structure force errors can be formed
        p["f_graph"].append(batch[K.INDEX].numpy()[graph[atoms]])


def quadratic(feats: np.ndarray, precision_: np.ndarray) -> np.ndarray:
    """``f^T P f`` per row of ``feats [n, D]``, or averaged over the middle axis of ``[n, m, D]``."""
    if feats.ndim == 2:
        return np.clip(np.einsum("nc,cd,nd->n", feats, precision_, feats), 0, None)
    return np.clip(np.einsum("nmc,cd,nmd->n", feats, precision_, feats), 0, None) / feats.shape[1]


def gaussian_scale(res: np.ndarray, var: np.ndarray) -> tuple[float, float]:
    """(scale, mean NLL): the maximum-likelihood ``s`` for ``res ~ N(0, s^2 var)``
    (``res [n]`` or ``[n, 3]`` with one ``var`` per row) and the NLL per item at it."""
    v = var.reshape(-1, *([1] * (res.ndim - 1)))
    z2 = res**2 / v
    s2 = float(np.mean(z2))
    if not s2 > 0:
        return 0.0, float("nan")
    nll = 0.5 * np.mean(np.log(2 * np.pi * s2 * np.broadcast_to(v, res.shape)) + z2 / s2)
    return s2**0.5, float(nll)


def calibrate(potential, folder: str | Path, records: np.ndarray, direct: bool = False,
              covariance: LLPRCovariance | None = None, progress: bool = True) -> dict:
    """Set ``potential.uncertainty.scale`` (and for LLPR its precisions, from
    ``covariance``) per fidelity from the held-out ``records`` of ``folder``; returns
    what was fitted, per fidelity name (the release records it)."""
    unc = potential.uncertainty
    llpr = unc.method == "llpr"
    if llpr and covariance is None:
        raise ValueError("LLPR calibration needs the training covariance (accumulate_llpr)")
    items = held_out_items(potential, folder, records, direct=direct, features=llpr, progress=progress)
    fitted = {}
    for f, name in enumerate(potential.fidelities):
        p = items.get(f)
        if p is None or not len(p["e_res"]) or not len(p["f_res"]):
            continue  # no held-out labels of this fidelity: it stays uncalibrated (0)
        row = {"structures": int(len(p["e_res"])), "atoms": int(len(p["f_res"]))}
        if llpr:
            choice = {key: _best_regulariser(feats, res, cov) for key, feats, res, cov in (
                ("energy", p["e_x"], p["e_res"], covariance.energy[f]),
                ("forces_inv", p["f_inv"], p["f_res"], covariance.forces_inv[f]),
                ("forces", p["f_x"], p["f_res"], covariance.forces[f]))}
            unc.energy_precision[f] = torch.as_tensor(choice["energy"][1])
            unc.force_precision_inv[f] = torch.as_tensor(choice["forces_inv"][1])
            unc.force_precision[f] = torch.as_tensor(choice["forces"][1])
            e_var, v_inv, v_l1 = (quadratic(p["e_x"], choice["energy"][1]), quadratic(p["f_inv"], choice["forces_inv"][1]),
                                  quadratic(p["f_x"], choice["forces"][1]))
            row.update({f"regulariser_{k}": v[0] for k, v in choice.items()},
                       sample_structures=int(covariance.structures[f]), sample_atoms=int(covariance.atoms[f]))
        else:
            e_var, v_inv, v_l1 = p["e_x"], p["f_inv"], p["f_x"]
        s_e = conformal_scale(p["e_res"], e_var)
        (a, b), mix = _fit_forces(p["f_res"], v_inv, v_l1)
        unc.scale[f] = torch.tensor([s_e, a**0.5, b**0.5], dtype=unc.scale.dtype)
        unc.widths[f, 0] = torch.as_tensor(conformal_widths(p["e_res"], s_e**2 * e_var))
        unc.widths[f, 1] = torch.as_tensor(conformal_widths(p["f_res"], a * v_inv + b * v_l1))
        fitted[name] = {**row, "scale_energy": s_e, "weight_forces_inv": a, "weight_forces_l1": b,
                        "invariant_share": mix, "scale": "split conformal, 95%"}
    if not fitted:
        raise CalibrationError(f"{folder}: no held-out record with energy and force labels at any of the "
                               f"model's fidelities {potential.fidelities}; calibrate on labelled data")
    return fitted


def conformal_scale(res: np.ndarray, var: np.ndarray, level: float = 0.95) -> float:
    """``s`` with ``|res| <= 1.96 s sqrt(var)`` for the split-conformal share of the items
    (``res [n]`` or ``[n, 3]``, one ``var`` per row)."""
    z = np.abs(res / np.sqrt(np.clip(var, 1e-300, None)).reshape(-1, *([1] * (res.ndim - 1)))).reshape(-1)
    n = len(z)
    q = min(1.0, np.ceil((n + 1) * level) / n)
    return float(np.quantile(z, q, method="higher")) / Z95


def conformal_widths(res: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Half-widths, in units of ``sqrt(var)``, of the split-conformal central interval at
    each of :data:`~pretrain.uncertainty.metrics.LEVELS` (monotone in the level)."""
    z = np.abs(res / np.sqrt(np.clip(var, 1e-300, None)).reshape(-1, *([1] * (res.ndim - 1)))).reshape(-1)
    n = len(z)
    q = np.minimum(1.0, np.ceil((n + 1) * LEVELS) / n)
    return np.quantile(z, q, method="higher")


def _fit_forces(res: np.ndarray, v_inv: np.ndarray, v_l1: np.ndarray) -> tuple:
    """((a, b), invariant share): the weights of ``a v_inv + b v_l1``: their ratio with the
    lowest Gaussian NLL over :data:`MIXES` (each variance normalised to mean 1 first), the
    scale split conformal (:func:`conformal_scale`)."""
    n_inv, n_l1 = max(float(v_inv.mean()), 1e-300), max(float(v_l1.mean()), 1e-300)
    best = (None, np.inf, None)
    for t in MIXES:
        var = t * v_inv / n_inv + (1 - t) * v_l1 / n_l1
        if not (var > 0).all():
            continue
        _, nll = gaussian_scale(res, var)
        if nll < best[1]:
            best = (var, nll, t)
    var, _, t = best
    if var is None:
        raise CalibrationError("force uncertainty is zero on some held-out atom for every weighting; "
                               "the model's features are degenerate there")
    scale = conformal_scale(res, var)
    return (scale**2 * t / n_inv, scale**2 * (1 - t) / n_l1), t


def _best_regulariser(feats, res, cov: torch.Tensor) -> tuple[float, np.ndarray]:
    """(regulariser, precision) with the lowest Gaussian NLL at its maximum-likelihood
    scale; each force block alone (the blocks are weighted against each other later)."""
    best = (None, None, np.inf)
    for r in REGULARISERS:
        p = precision(cov, r).numpy()
        var = np.clip(quadratic(feats, p), 1e-300, None)
        nll = gaussian_scale(res, var)[1]
        if nll < best[2]:
            best = (r, p, nll)
    return best[0], best[1]


def fit_uncertainty(trained, method: str = "auto", calibration_folder: str | Path | None = None,
                    max_structures: int = MAX_STRUCTURES, progress: bool = True,
                    train_folder: str | Path | None = None, held_out: str | Path | None = None) -> dict | None:
    """Give ``trained`` (a :class:`~pretrain.weights.TrainedModel`) calibrated uncertainty
    and return what a release records of it (None: ``method="none"``).

    ``method``: ``auto`` (the trained ensemble where the model has one, else LLPR),
    ``llpr``, ``ensemble`` or ``none``. LLPR reads ``train_folder``, else the run's training
    ``data.folder``; calibration reads all of ``calibration_folder``, else the even half of
    ``held_out``, else of the run's ``eval.folder``.
    """
    import dataclasses as dc  # noqa: PLC0415

    from data_pipeline.manifest import read_manifest  # noqa: PLC0415

    if method not in ("auto", "llpr", "ensemble", "none"):
        raise ValueError(f"uncertainty: got {method!r}, expected auto, llpr, ensemble or none")
    potential, own = trained.potential, trained.model_cfg.uncertainty
    if method == "none":
        potential.uncertainty = None
        trained.model_cfg = dc.replace(trained.model_cfg, uncertainty="none")
        return None
    if method == "auto":
        method = "ensemble" if own == "ensemble" else "llpr"
    if method == "ensemble" and own != "ensemble":
        raise CalibrationError(f"{trained.path}: the run trained no ensemble (model.uncertainty: ensemble); "
                               "use --uncertainty llpr (post hoc, any model)")
    cfg = trained.train_config or {}
    if calibration_folder is None:
        calibration_folder = held_out or cfg.get("eval", {}).get("folder")
        if not calibration_folder:
            raise CalibrationError(f"{trained.path}: the run has no eval.folder to calibrate its uncertainty on; "
                                   "pass a held-out calibration folder, or --uncertainty none")
        halves = True
    else:
        halves = False
    if not Path(calibration_folder).is_dir():
        raise CalibrationError(f"calibration folder {calibration_folder} is not there; restore it or pass another")
    record = {"method": method, "calibration": {
        "folder": Path(calibration_folder).name, "content_hash": read_manifest(calibration_folder)["content_hash"],
        "records": "even positions per fidelity" if halves else "all"}}
    covariance = None
    if method == "llpr":
        if own != "llpr" or potential.uncertainty is None:
            potential.attach_uncertainty("llpr")
        train = train_folder or cfg.get("data", {}).get("folder")
        if not train or not Path(train).is_dir():
            raise CalibrationError(f"LLPR needs the run's training data.folder ({train}); restore it, "
                                   "or pass --uncertainty none")
        covariance = accumulate_llpr(potential, train, max_structures, progress=progress)
        record["llpr_sample"] = {"folder": Path(train).name, "max_structures_per_fidelity": max_structures,
                                 "content_hash": read_manifest(train)["content_hash"]}
    else:
        record["members"] = int(potential.uncertainty.energy_members.shape[1])
    records = (split_held_out(calibration_folder)[0] if halves
               else np.arange(len(BatchBuilder(calibration_folder, potential.cutoff).dataset)))
    record["fidelities"] = calibrate(potential, calibration_folder, records, direct=trained.direct,
                                     covariance=covariance, progress=progress)
    record["uncalibrated"] = [n for n in potential.fidelities if n not in record["fidelities"]]
    trained.model_cfg = dc.replace(trained.model_cfg, uncertainty=method)
    return record
