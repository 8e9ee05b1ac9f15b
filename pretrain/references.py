"""Elemental references for elements a pretrained fidelity meets for the first time.

``init_from`` keeps a pretrained fidelity's references (its heads were trained on them).
When the new data of that fidelity holds an element the pretrained model never had a
reference for, that element would add 0 eV, and every total energy with it would be off
by its whole reference. :func:`extend_references` fits references for just those
elements on the new data's energies, the pretrained references fixed:
``E - sum_old n_Z e_Z ~ sum_new n_Z e_Z`` by least squares (ridge 1e-8 relative to each
column, as the build's fit), over up to ``max_records`` records of that fidelity.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from common.fidelities import FidelityTable
from common.progress import Progress

MAX_RECORDS = 200_000  # records read per fidelity; evenly spaced when there are more


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
