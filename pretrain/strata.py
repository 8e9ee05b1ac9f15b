"""Held-out errors broken down by strata, per fidelity: by element, by the magnitude of
the reference force, by the reference pressure (the breakdown by dataset is ``eval``'s
group rows). Called by :func:`pretrain.evaluate.evaluate`; lands in ``metrics.json`` under
``"strata"``.

Like the group sums, every stratum is a float64 sum of counts, |err| and err^2 per rank;
``evaluate`` all-reduces :attr:`Strata.tensors` with its own sums, so the numbers are the
same on 1 rank or 8 (up to the order of float64 additions).

Definitions (fixed, so two evaluations compare bin by bin):

- element Z: force MAE / RMSE over the force components of the atoms of Z; energy MAE /
  RMSE per atom over the structures that contain Z (a structure of Cu and Ni counts once
  for Cu and once for Ni, with its whole per-atom energy error).
- force bin: atoms with a force label, binned by the norm of their reference force
  |F_ref| (eV/A, :data:`FORCE_EDGES`, ``lo <= |F_ref| < hi``): atoms, force MAE / RMSE over
  their components, mean |F_ref| and ``forces_mae_relative`` = force MAE / mean |F_ref|
  (a component MAE over a mean norm: a model that predicts zero forces scores about 0.5
  on it, not 1, for forces pointing every way alike).
- pressure bin: structures with a stress label, binned by the reference pressure
  P = -(sxx + syy + szz) / 3 (stress in eV/A^3 with the ASE sign, positive under tension,
  so P > 0 is compression), edges in GPa (:data:`PRESSURE_EDGES_GPA`): structures, energy
  MAE per atom, force MAE, stress MAE (eV/A^3, over the 6 Voigt components).

Errors are in eV, eV/A and eV/A^3 as in the group rows; an unbounded bin edge is ``None``
in JSON (strict JSON has no infinity).
"""

from __future__ import annotations

import math

import torch

from data_pipeline import keys as K

N_Z = 119  # atomic numbers 0..118 (the builder rejects anything else)
FORCE_EDGES = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, math.inf)  # eV/A, |F_ref| of an atom
PRESSURE_EDGES_GPA = (-math.inf, -10.0, -1.0, 1.0, 10.0, 100.0, math.inf)
GPA_PER_EV_A3 = 160.21766208  # 1 eV/A^3 in GPa

ELEMENT_COLUMNS = ("atoms", "f_n", "f_abs", "f_sq", "structures", "e_n", "e_abs", "e_sq")
FORCE_BIN_COLUMNS = ("atoms", "f_n", "f_abs", "f_sq", "ref_norm")
PRESSURE_BIN_COLUMNS = ("structures", "e_n", "e_abs", "e_sq", "f_n", "f_abs", "f_sq", "s_n", "s_abs", "s_sq")


class Strata:
    """The per-rank sums of every stratum of ``n_fidelities`` fidelities (the manifest's)."""

    def __init__(self, n_fidelities: int):
        f64 = dict(dtype=torch.float64)
        self.elements = torch.zeros(n_fidelities, N_Z, len(ELEMENT_COLUMNS), **f64)
        self.force_bins = torch.zeros(n_fidelities, len(FORCE_EDGES) - 1, len(FORCE_BIN_COLUMNS), **f64)
        self.pressure_bins = torch.zeros(n_fidelities, len(PRESSURE_EDGES_GPA) - 1, len(PRESSURE_BIN_COLUMNS), **f64)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The sums to all-reduce (in place) across ranks."""
        return self.elements, self.force_bins, self.pressure_bins

    def add(self, batch: dict, fidelity: torch.Tensor, e_err: torch.Tensor, f_err: torch.Tensor,
            s_err: torch.Tensor | None) -> None:
        """Add one batch (on the CPU). ``fidelity`` [G]: manifest fidelity index of each graph;
        ``e_err`` [G] per-atom energy error, ``f_err`` [N, 3], ``s_err`` [G, 6] or None (the
        model served no stress), each float64 and zero where unlabelled."""
        b, z = batch[K.BATCH].cpu(), batch[K.NUMBERS].cpu().long()
        emask, smask = batch[K.ENERGY_MASK].cpu().double(), batch[K.STRESS_MASK].cpu().double()
        fmask = batch[K.FORCES_MASK].cpu().double()
        f_abs, f_sq = f_err.abs().sum(1), f_err.square().sum(1)  # [N]
        self._add_elements(b, z, fidelity, fmask, f_abs, f_sq, emask, e_err)
        ref_norm = batch[K.FORCES].cpu().double().norm(dim=1)  # [N], 0 where unlabelled
        atom_cols = torch.stack([fmask, 3 * fmask, f_abs, f_sq, ref_norm * fmask], dim=1)
        _add_binned(self.force_bins, fidelity[b], _bin(ref_norm, FORCE_EDGES), atom_cols)
        per_graph = lambda v: torch.zeros(len(emask), dtype=torch.float64).index_add_(0, b, v)  # noqa: E731
        stress = batch[K.STRESS].cpu().double()
        pressure = -stress[:, :3].sum(1) / 3 * GPA_PER_EV_A3  # [G], GPa
        s_cols = ([6 * smask, s_err.abs().sum(1), s_err.square().sum(1)] if s_err is not None
                  else [torch.zeros_like(smask)] * 3)
        cols = torch.stack([smask, emask, e_err.abs(), e_err.square(), per_graph(3 * fmask),
                            per_graph(f_abs), per_graph(f_sq), *s_cols], dim=1) * smask[:, None]
        _add_binned(self.pressure_bins, fidelity, _bin(pressure, PRESSURE_EDGES_GPA), cols)

    def _add_elements(self, b, z, fidelity, fmask, f_abs, f_sq, emask, e_err) -> None:
        flat = self.elements.view(-1, len(ELEMENT_COLUMNS))  # [n_fid * N_Z, columns]
        atom_cols = torch.stack([torch.ones_like(fmask), 3 * fmask, f_abs, f_sq], dim=1)
        flat[:, :4].index_add_(0, fidelity[b] * N_Z + z, atom_cols)
        # each (structure, element) pair once: the structure's energy error counts for each of its elements
        pairs = torch.unique(b * N_Z + z)
        g, zz = pairs // N_Z, pairs % N_Z
        graph_cols = torch.stack([torch.ones_like(emask), emask, e_err.abs(), e_err.square()], dim=1)[g]
        flat[:, 4:].index_add_(0, fidelity[g] * N_Z + zz, graph_cols)

    def metrics(self, names: list[str]) -> dict[str, dict]:
        """Per fidelity name (with any structure): elements, force bins and pressure bins."""
        from ase.data import chemical_symbols  # noqa: PLC0415

        out = {}
        for f, name in enumerate(names):
            if not self.elements[f, :, 0].any():
                continue
            elements = {chemical_symbols[z]: _element_row(self.elements[f, z].tolist())
                        for z in range(N_Z) if self.elements[f, z, 0] > 0}
            out[name] = {"elements": elements,
                         "force_bins": [_force_bin_row(lo, hi, self.force_bins[f, k].tolist())
                                        for k, (lo, hi) in enumerate(zip(FORCE_EDGES[:-1], FORCE_EDGES[1:]))],
                         "pressure_bins": [_pressure_bin_row(lo, hi, self.pressure_bins[f, k].tolist())
                                           for k, (lo, hi) in enumerate(zip(PRESSURE_EDGES_GPA[:-1],
                                                                            PRESSURE_EDGES_GPA[1:]))]}
        return out


def _bin(values: torch.Tensor, edges: tuple[float, ...]) -> torch.Tensor:
    """Bin index of each value, ``edges[k] <= v < edges[k + 1]``."""
    inner = torch.tensor(edges[1:-1], dtype=values.dtype)
    return torch.bucketize(values, inner, right=True)


def _add_binned(sums: torch.Tensor, fidelity: torch.Tensor, bins: torch.Tensor, cols: torch.Tensor) -> None:
    """``sums[fidelity, bin] += cols`` row by row (``sums`` [n_fid, n_bins, columns])."""
    sums.view(-1, sums.shape[-1]).index_add_(0, fidelity * sums.shape[1] + bins, cols)


def _edge(x: float) -> float | None:
    return None if math.isinf(x) else x


def _errors(c: dict, prefix: str, key: str, rmse: bool = True) -> dict:
    """``{key}_mae`` (and ``_rmse``) from the sums ``{prefix}_n/_abs/_sq``, when labelled."""
    n = c[f"{prefix}_n"]
    if not n:
        return {}
    out = {f"{key}_mae": c[f"{prefix}_abs"] / n}
    if rmse:
        out[f"{key}_rmse"] = (c[f"{prefix}_sq"] / n) ** 0.5
    return out


def _element_row(row: list[float]) -> dict:
    c = dict(zip(ELEMENT_COLUMNS, row))
    energy = {f"{k}_per_atom": v for k, v in _errors(c, "e", "energy").items()}
    return {"atoms": int(c["atoms"]), "structures": int(c["structures"]), **_errors(c, "f", "forces"), **energy}


def _force_bin_row(lo: float, hi: float, row: list[float]) -> dict:
    c = dict(zip(FORCE_BIN_COLUMNS, row))
    out = {"lo": _edge(lo), "hi": _edge(hi), "atoms": int(c["atoms"]), **_errors(c, "f", "forces")}
    if c["atoms"]:
        out["mean_ref_force"] = c["ref_norm"] / c["atoms"]
        if out["mean_ref_force"] > 0:
            out["forces_mae_relative"] = out["forces_mae"] / out["mean_ref_force"]
    return out


def _pressure_bin_row(lo: float, hi: float, row: list[float]) -> dict:
    c = dict(zip(PRESSURE_BIN_COLUMNS, row))
    energy = {f"{k}_per_atom": v for k, v in _errors(c, "e", "energy", rmse=False).items()}
    return {"lo": _edge(lo), "hi": _edge(hi), "structures": int(c["structures"]), **energy,
            **_errors(c, "f", "forces", rmse=False), **_errors(c, "s", "stress", rmse=False)}


def _mev(m: dict, key: str) -> str:
    return f"{1000 * m[key]:.1f}" if key in m else "-"


def _range(row: dict) -> str:
    lo, hi = row["lo"], row["hi"]
    return f"<{hi:g}" if lo is None else f">={lo:g}" if hi is None else f"{lo:g}..{hi:g}"


def strata_table(metrics: dict) -> str:
    """The printed breakdown, per fidelity: by element, by |F_ref|, by pressure; errors in meV."""
    lines = []
    for fid, s in (metrics.get("strata") or {}).items():
        lines += [f"strata of {fid} (meV/atom, meV/A, meV/A3):",
                  f"  {'element':<10} {'atoms':>7} {'F MAE':>8} {'F RMSE':>8} {'structs':>7} {'E MAE':>8}"]
        lines += [f"  {el:<10} {r['atoms']:>7} {_mev(r, 'forces_mae'):>8} {_mev(r, 'forces_rmse'):>8} "
                  f"{r['structures']:>7} {_mev(r, 'energy_mae_per_atom'):>8}" for el, r in s["elements"].items()]
        lines.append(f"  {'|F_ref| eV/A':<12} {'atoms':>7} {'F MAE':>8} {'F RMSE':>8} {'F MAE/|F_ref|':>13}")
        for r in s["force_bins"]:
            rel = f"{r['forces_mae_relative']:.3f}" if "forces_mae_relative" in r else "-"
            lines.append(f"  {_range(r):<12} {r['atoms']:>7} {_mev(r, 'forces_mae'):>8} "
                         f"{_mev(r, 'forces_rmse'):>8} {rel:>13}")
        lines.append(f"  {'P GPa':<12} {'structs':>7} {'E MAE':>8} {'F MAE':>8} {'S MAE':>8}")
        lines += [f"  {_range(r):<12} {r['structures']:>7} {_mev(r, 'energy_mae_per_atom'):>8} "
                  f"{_mev(r, 'forces_mae'):>8} {_mev(r, 'stress_mae'):>8}" for r in s["pressure_bins"]]
    return "\n".join(lines)
