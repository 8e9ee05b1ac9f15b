"""Held-out errors of the extra targets (charges, dipoles, ...; ``models/properties.py``),
per target and fidelity, next to the spread of the labels. Called by
:func:`pretrain.evaluate.evaluate`; lands in ``metrics.json`` under ``"targets"``.

Per target and fidelity, float64 sums per rank (all-reduced with ``evaluate``'s own, so
1 rank equals 8): labelled items (atoms or structures), components, sum |err|, sum err^2,
sum y*, sum y*^2. From them: MAE and RMSE over components, and the labels' RMS and
standard deviation (``ref_rms``, ``ref_std``): an error is read against them (a model
that predicts the mean scores ``rmse = ref_std``). Only the fidelities a target was
trained at are scored. Rank 0 keeps up to :data:`PLOT_POINTS` components per target and
fidelity for the parity plots.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_pipeline import keys as K

COLUMNS = ("items", "n", "abs", "sq", "ref", "ref_sq")
PLOT_POINTS = 20000


class TargetErrors:
    """The per-rank sums of the extra targets of ``potential`` (None-safe: no targets)."""

    def __init__(self, potential, fidelities: list[str]):
        heads = getattr(potential, "properties", None)
        self.targets = list(heads.targets) if heads is not None else []
        self.fidelities = list(fidelities)  # the manifest's: evaluate's group index
        self.served = [[heads.serves(t.name, f) for f in fidelities] for t in self.targets]
        self.sums = torch.zeros(len(self.targets), len(fidelities), len(COLUMNS), dtype=torch.float64)
        self.points: dict[tuple[int, int], list] = {}

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The sums to all-reduce (in place) across ranks."""
        return (self.sums,)

    def add(self, out: dict, batch: dict, fidelity: torch.Tensor) -> None:
        """One batch; ``fidelity [G]``: each structure's index into the manifest's fidelities."""
        b = batch[K.BATCH].cpu()
        for k, t in enumerate(self.targets):
            key = K.extra(t.name)
            if key not in batch:
                continue
            served = torch.tensor(self.served[k], dtype=torch.bool)[fidelity]
            graph = batch[K.extra_mask(t.name)].cpu() & served  # [G]
            fid = fidelity if t.per == "structure" else fidelity[b]
            mask = graph if t.per == "structure" else graph[b]
            pred = out[key].detach().cpu().double().reshape(len(mask), -1)
            ref = batch[key].cpu().double().reshape(len(mask), -1)
            err, m = pred - ref, mask.double()
            cols = [m, m * ref.shape[1], err.abs().sum(1) * m, err.square().sum(1) * m,
                    ref.sum(1) * m, ref.square().sum(1) * m]
            for c, v in enumerate(cols):
                self.sums[k, :, c].index_add_(0, fid, v)
            for f in torch.unique(fid[mask]).tolist():
                kept = self.points.setdefault((k, f), [])
                room = PLOT_POINTS - sum(len(r) for r, _ in kept)
                sel = mask & (fid == f)
                if room > 0:
                    kept.append((ref[sel].reshape(-1)[:room].tolist(), pred[sel].reshape(-1)[:room].tolist()))

    def metrics(self) -> dict:
        """``{target: {"kind", "per", "fidelities": {fidelity: {items, mae, rmse, ref_rms, ref_std}}}}``."""
        out = {}
        for k, t in enumerate(self.targets):
            rows = {}
            for f, name in enumerate(self.fidelities):
                items, n, a, sq, ref, ref_sq = self.sums[k, f].tolist()
                if n > 0:
                    mean = ref / n
                    rows[name] = {"items": int(items), "mae": a / n, "rmse": (sq / n) ** 0.5,
                                  "ref_rms": (ref_sq / n) ** 0.5,
                                  "ref_std": max(ref_sq / n - mean * mean, 0.0) ** 0.5}
            out[t.name] = {"kind": t.kind, "per": t.per, "served_as": t.served_as, "fidelities": rows}
        return out

    def gathered_points(self, gathered: list[dict]) -> dict:
        """Rank 0's parity points of every rank (``gathered``: each rank's :attr:`points`)."""
        merged: dict[tuple[int, int], list] = {}
        for points in gathered:
            for key, parts in points.items():
                merged.setdefault(key, []).extend(parts)
        return {(self.targets[k].name, self.fidelities[f]): parts for (k, f), parts in merged.items()}


def target_table(metrics: dict) -> str:
    """The printed table: one line per target and fidelity ('' without targets)."""
    targets = metrics.get("targets") or {}
    if not targets:
        return ""
    from models.properties import TARGET_UNITS  # noqa: PLC0415

    lines = [f"{'target':<12} {'fidelity':<18} {'items':>7} {'MAE':>9} {'RMSE':>9} {'label RMS':>9} "
             f"{'label std':>9}  unit"]
    for name, t in targets.items():
        unit = TARGET_UNITS.get(t["served_as"], "")
        for fid, r in t["fidelities"].items():
            lines.append(f"{name[:12]:<12} {fid[:18]:<18} {r['items']:>7} {r['mae']:9.4f} {r['rmse']:9.4f} "
                         f"{r['ref_rms']:9.4f} {r['ref_std']:9.4f}  {unit}")
    return "\n".join(lines)


def target_parity_plots(points: dict, metrics: dict, out: Path) -> list[Path]:
    """One PNG per target: a panel per fidelity, predicted vs reference components."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from pretrain.evaluate import _slug, parity_panel  # noqa: PLC0415
    from models.properties import TARGET_UNITS  # noqa: PLC0415

    written = []
    for name, t in (metrics.get("targets") or {}).items():
        fids = [f for f in t["fidelities"] if points.get((name, f))]
        if not fids:
            continue
        unit = TARGET_UNITS.get(t["served_as"], "")
        fig, axes = plt.subplots(1, len(fids), figsize=(4.3 * len(fids), 4.2), squeeze=False)
        for ax, fid in zip(axes[0], fids):
            ref = np.concatenate([np.asarray(r, float) for r, _ in points[(name, fid)]])
            pred = np.concatenate([np.asarray(p, float) for _, p in points[(name, fid)]])
            parity_panel(ax, ref, pred)
            r = t["fidelities"][fid]
            ax.set(xlabel=f"reference {name} ({unit})", ylabel=f"predicted {name} ({unit})",
                   title=f"{fid}: MAE {r['mae']:.4f}, label std {r['ref_std']:.3f}")
        fig.tight_layout()
        path = out / f"parity-{_slug(name)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
