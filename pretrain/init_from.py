"""``init_from``: a new run starts from a trained model (a run, a checkpoint or a release).

The caller loads the model (``launch/train.py``, through the release stage's loader, so
training never imports it); here the run's start is planned and its weights placed:

* the fidelity table is the trained model's, extended by the new data's fidelities (a new
  head each, :meth:`~common.fidelities.FidelityTable.extended`), and every per-fidelity
  row of the weights moves by name (:func:`models.potential.remap_state`);
* a pretrained fidelity keeps its references (its heads were trained on them). When the
  new data of that fidelity holds an element the pretrained model never had a reference
  for, that element would add 0 eV and every total energy with it would be off by its
  whole reference: :func:`extend_references` fits references for just those elements on
  the new data's energies, the pretrained references fixed:
  ``E - sum_old n_Z e_Z ~ sum_new n_Z e_Z`` by least squares (ridge 1e-8 relative to
  each column, as the build's fit), over up to ``max_records`` records of that fidelity.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from common.config import ConfigError
from common.fidelities import FidelityTable
from common.progress import Progress
from models.potential import remap_state

MAX_RECORDS = 200_000  # records read per fidelity; evenly spaced when there are more


@dataclasses.dataclass
class Start:
    """What a run started from a trained model begins with."""

    table: FidelityTable  # the trained model's, extended by the new data's fidelities
    init: object  # the trained model (``pretrain.weights.TrainedModel``)
    new_heads: list[str]
    fitted: dict[str, dict[str, float]]  # references fitted for elements new to a fidelity
    changed: dict[str, tuple] = dataclasses.field(default_factory=dict)  # parameter-free settings: (was, now)

    def lines(self) -> list[str]:
        """What the run prints about its start."""
        init = self.init
        out = [f"init_from {init.path} ({init.kind}, {'EMA' if init.ema else 'raw'} weights): heads "
               f"{init.table.names} mapped by name; new heads: {self.new_heads or 'none'}"]
        for fid, refs in self.fitted.items():
            out.append(f"init_from: {fid}: references of the new elements "
                       f"{', '.join(f'{e} {v:.4f} eV' for e, v in refs.items())} fitted on this data "
                       "with the pretrained ones fixed")
        for key, (was, now) in self.changed.items():
            out.append(f"init_from: the trained model had model.{key}={was}, this run has {now}: its "
                       "weights were trained with the other setting")
        return out


#: model settings without weights of their own: a run may change them, and is told it did
PARAMETER_FREE = ("zbl", "zbl_radius_scale", "cutoff", "avg_neighbors")


def plan(init, data: FidelityTable, dataset, model_cfg=None) -> Start:
    """The start of a run on ``dataset`` (its table ``data``, its model config ``model_cfg``)
    from the trained model ``init``."""
    table, new = init.table.extended(data)
    table, fitted = extend_references(table, init, dataset)
    changed = {}
    if model_cfg is not None:
        changed = {k: (getattr(init.model_cfg, k), getattr(model_cfg, k)) for k in PARAMETER_FREE
                   if getattr(init.model_cfg, k) != getattr(model_cfg, k)}
    return Start(table, init, new, fitted, changed)


def load_weights(potential: torch.nn.Module, start: Start, source: str) -> None:
    """The trained weights into ``potential`` (built from ``start.table``): per-fidelity rows
    moved by name (a new fidelity keeps its fresh head), then the fitted references; every
    other parameter must be there with its shape."""
    own = potential.state_dict()
    state = remap_state(start.init.potential.state_dict(), start.init.table, own, potential.table,
                        potential.delta)
    missing = [k for k, _ in potential.named_parameters() if k not in state]
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or wrong:
        raise ConfigError(f"init_from {source}: weights do not fit this model (missing "
                          f"{missing[:5]}, other shapes {wrong[:5]}); use the same model config")
    potential.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    apply_references(potential, potential.table, start.fitted)


def extend_references(table: FidelityTable, pretrained, dataset,
                      max_records: int = MAX_RECORDS) -> tuple[FidelityTable, dict[str, dict[str, float]]]:
    """``table`` (the pretrained one extended by the new data's) with references fitted for
    the new elements of each shared fidelity; returns ``(table, {fidelity: {element: eV}})``
    of what was fitted. ``pretrained``: the init model (``TrainedModel``), whose reference
    tensor holds the values its heads were trained with (learned ones included)."""
    fitted = {}
    for fid in table.names:
        if fid not in pretrained.table.names:
            continue  # a new head: the new data's own references, from its manifest
        fixed = reference_values(pretrained, fid)
        new = [e for e in table.elements.get(fid, []) if e not in fixed]
        if new:
            fitted[fid] = fit_new_elements(dataset, fid, fixed, new, max_records)
    refs = {n: {**table.references.get(n, {}), **fitted.get(n, {})} for n in table.names}
    return dataclasses.replace(table, references=refs), fitted


def reference_values(trained, fid: str) -> dict[str, float]:
    """``{element: eV}`` the trained model adds for ``fid``: every element it has a
    reference for or was trained on."""
    from ase.data import atomic_numbers  # noqa: PLC0415

    row = trained.potential.reference_energies().detach().double().cpu()[trained.table.index(fid)]
    elements = set(trained.table.references.get(fid, {})) | set(trained.table.elements.get(fid, []))
    return {e: float(row[atomic_numbers[e]]) for e in elements}


def fit_new_elements(dataset, fid: str, fixed: dict[str, float], new: list[str],
                     max_records: int = MAX_RECORDS) -> dict[str, float]:
    """References of ``new`` elements from the energies of ``fid``'s records in ``dataset``
    (a ``ShardedDataset``), the ``fixed`` ones held."""
    from ase.data import atomic_numbers  # noqa: PLC0415

    f = dataset.manifest["fidelities"].index(fid)
    rows = np.flatnonzero(dataset.fidelity_ids == f)
    if len(rows) > max_records:
        rows = rows[np.linspace(0, len(rows) - 1, max_records).astype(np.int64)]
    fixed_z = np.zeros(max(atomic_numbers.values()) + 1)
    for e, v in fixed.items():
        fixed_z[atomic_numbers[e]] = v
    new_z = np.array([atomic_numbers[e] for e in new])
    counts, residuals = [], []
    with Progress(len(rows), f"init_from references [{fid}]", unit="records") as bar:
        for i in rows:
            rec = dataset[int(i)]
            bar.update(1)
            if rec["energy"] is None:
                continue
            n = np.bincount(rec["numbers"], minlength=len(fixed_z))
            counts.append(n[new_z])
            residuals.append(rec["energy"] - float(n @ fixed_z))
    if not counts:
        return {e: 0.0 for e in new}
    x, r = np.asarray(counts, dtype=float), np.asarray(residuals)
    norms = np.linalg.norm(x, axis=0)
    norms[norms == 0] = 1.0
    xs = x / norms  # each column at unit norm: the ridge is relative to it
    values = np.linalg.solve(xs.T @ xs + 1e-8 * np.eye(len(new)), xs.T @ r) / norms
    return {e: float(v) for e, v in zip(new, values)}


def apply_references(potential: torch.nn.Module, table: FidelityTable, values: dict[str, dict[str, float]]) -> None:
    """Make ``potential`` add ``{fidelity: {element: eV}}`` (its float64 references, less
    any learned shift it carries for them)."""
    from ase.data import atomic_numbers  # noqa: PLC0415

    with torch.no_grad():
        for fid, refs in values.items():
            for e, v in refs.items():
                f, z = table.index(fid), atomic_numbers[e]
                shift = 0.0 if potential.reference_shift is None else float(potential.reference_shift[f, z])
                potential.references[f, z] = v - shift
