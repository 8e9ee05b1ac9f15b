"""The ``fix external`` callback: LAMMPS's atoms in, the release's energy, forces and
virial out, every step (and every minimiser iteration).

Each rank holds its own atoms (LAMMPS's domain decomposition). The model needs the whole
system (message passing reaches layers x cutoff), so every rank gathers every atom's
tag, type and position (one ``allgather``), orders them by tag, evaluates the release on
the whole system, and keeps the forces of its own atoms; the global energy and virial are
set identically on every rank (``fix external`` takes them per rank, not summed). The
model's work is therefore repeated on every rank: ranks give LAMMPS's own parts (other
fixes, computes, output) their usual parallelism and the same trajectory as one rank, not
a faster model.

The cell is LAMMPS's box ``[[lx, 0, 0], [xy, ly, 0], [xz, yz, lz]]`` with positions taken
from ``boxlo``; periodicity per direction from the ``boundary`` command. The virial is
``-dE/d(strain)`` of the model (any boundary: a molecule in a non-periodic box has one
too), in LAMMPS's order xx yy zz xy xz yz, so ``thermo press`` and ``fix npt`` see the
model's stress.
"""

from __future__ import annotations

import time

import numpy as np

from lammps_glue.translate import FIX_ID


class ReleaseForces:
    """Callable for ``lammps.set_fix_external_callback``; ``predictor`` is a release's
    :class:`~pretrain.release.predict.Predictor`, ``numbers`` the atomic number of each
    atom type (type 1 first)."""

    def __init__(self, lmp, predictor, numbers: list[int], comm):
        self.lmp, self.predictor, self.comm = lmp, predictor, comm
        self.numbers = np.asarray([0, *numbers], dtype=np.int64)  # types count from 1
        self.calls, self.model_s, self.glue_s = 0, 0.0, 0.0
        self.error: tuple[int, Exception] | None = None

    def structure(self, nlocal: int, tag, x):
        """``(atoms, local tags' rows in it)``: the whole system as ASE atoms in tag order."""
        from ase import Atoms  # noqa: PLC0415

        tag = np.array(tag[:nlocal], dtype=np.int64)
        pos = np.array(x[:nlocal], dtype=np.float64)
        types = np.array(self.lmp.numpy.extract_atom("type")[:nlocal], dtype=np.int64)
        if self.comm.size > 1:
            tags_all = np.concatenate(self.comm.allgather(tag))
            pos_all = np.concatenate(self.comm.allgather(pos))
            types_all = np.concatenate(self.comm.allgather(types))
        else:
            tags_all, pos_all, types_all = tag, pos, types
        order = np.argsort(tags_all, kind="stable")
        tags_all, pos_all, types_all = tags_all[order], pos_all[order], types_all[order]
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        lo, hi = np.asarray(boxlo), np.asarray(boxhi)
        cell = np.array([[hi[0] - lo[0], 0.0, 0.0], [xy, hi[1] - lo[1], 0.0], [xz, yz, hi[2] - lo[2]]])
        if types_all.max() >= len(self.numbers):
            raise RuntimeError(f"atom type {types_all.max()} has no element: pair_coeff * * names "
                               f"{len(self.numbers) - 1} element(s), one per atom type")
        atoms = Atoms(numbers=self.numbers[types_all], positions=pos_all - lo, cell=cell,
                      pbc=[bool(p) for p in periodicity])
        rows = np.searchsorted(tags_all, tag)
        return atoms, rows

    def __call__(self, caller, step, nlocal, tag, x, f):
        """LAMMPS ignores an exception raised in a callback (it would go on with stale
        forces): the first error is kept with its step, the forces are zeroed and the
        run is stopped (a forced timeout also skips the input's later runs);
        :func:`~lammps_glue.run.run_lammps` raises it when LAMMPS returns."""
        if self.error is not None:
            f[:nlocal] = 0.0
            self.lmp.force_timeout()
            return
        try:
            self._evaluate(step, nlocal, tag, x, f)
        except Exception as err:  # noqa: BLE001 - every error must stop the run, not be dropped
            self.error = (int(step), err)
            f[:nlocal] = 0.0
            self.lmp.force_timeout()

    def _evaluate(self, step, nlocal, tag, x, f):
        t0 = time.perf_counter()
        atoms, rows = self.structure(nlocal, tag, x)
        t1 = time.perf_counter()
        out = self.predictor.run([atoms], stress=True)
        t2 = time.perf_counter()
        f[:nlocal] = out["forces"][rows]
        energy = float(out["energy"][0])
        s = -np.asarray(out["stress"][0], dtype=np.float64) * atoms.cell.volume  # ASE Voigt: xx yy zz yz xz xy
        self.lmp.fix_external_set_energy_global(FIX_ID, energy)
        self.lmp.fix_external_set_virial_global(FIX_ID, [s[0], s[1], s[2], s[5], s[4], s[3]])
        self.calls += 1
        self.model_s += t2 - t1
        self.glue_s += (t1 - t0) + (time.perf_counter() - t2)
