"""``mlip-pretrain lammps IN --release DIR --fidelity NAME``: an ordinary LAMMPS input run
with a release standing for ``pair_style mlip``.

Example (``units metal``; any box, boundary, ``run``, ``minimize``, ``fix nvt/npt``)::

    units metal
    atom_style atomic
    read_data cu_ni.data
    pair_style mlip
    pair_coeff * * Cu Ni
    velocity all create 600 1
    fix 1 all npt temp 600 600 0.1 iso 0 0 1.0
    run 1000

``mpirun -n N mlip-pretrain lammps ...`` runs LAMMPS on N ranks (every rank evaluates the
whole system: :mod:`lammps_glue.bridge`). LAMMPS writes ``log.lammps`` (``--log``) and its
screen output as ``lmp -in`` would.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common.errors import UserError
from lammps_glue.translate import FIX_ID, LammpsInputError, translate


class LammpsRunError(UserError):
    """LAMMPS stopped on an error in the input (its message, and the input's name)."""


def run_lammps(input_path: str | Path, release: str | Path, fidelity: str, dtype: str = "float64",
               device: str = "cpu", charge: int = 0, spin: int = 0, log: str | Path = "log.lammps",
               screen: bool = True, variables: dict | None = None) -> dict:
    """Run the input; returns ``{"calls", "model_s", "glue_s", "ranks", "elements", "seconds"}``
    (the callback's force calls and where their time went, on this rank)."""
    from ase.data import atomic_numbers  # noqa: PLC0415

    from lammps_glue.bridge import ReleaseForces  # noqa: PLC0415
    from lammps_glue.library import mpi_world, open_lammps  # noqa: PLC0415
    from pretrain.release.loader import load_release  # noqa: PLC0415
    from pretrain.release.predict import Predictor  # noqa: PLC0415

    t0 = time.perf_counter()
    comm = mpi_world()
    trained = load_release(release)
    predictor = Predictor(trained, fidelity, device, dtype, "error", charge, spin)
    parts = translate(input_path, float(trained.potential.cutoff))
    missing = sorted(set(parts.elements) - set(trained.table.elements.get(predictor.fidelity) or parts.elements))
    if missing:
        raise LammpsInputError(f"{input_path}: pair_coeff names {', '.join(missing)}, which fidelity "
                               f"{predictor.fidelity!r} of {release} was not trained on (it covers "
                               f"{' '.join(trained.table.elements[predictor.fidelity])})")
    args = ["-log", str(log)] + ([] if screen else ["-screen", "none"])
    for name, value in (variables or {}).items():
        args += ["-var", str(name), str(value)]
    lmp = open_lammps(args, comm)
    bridge = ReleaseForces(lmp, predictor, [atomic_numbers[e] for e in parts.elements], comm)
    try:
        with tempfile.TemporaryDirectory(prefix="mlip-lammps-") as tmp:
            first, rest = Path(tmp) / "setup.in", Path(tmp) / "run.in"
            first.write_text("\n".join(parts.before) + "\n")
            rest.write_text("\n".join(parts.after) + "\n")
            _file(lmp, first, input_path, bridge)
            units = lmp.extract_global("units")
            if units != "metal":
                raise LammpsInputError(f"{input_path}: `units {units}`: the release speaks eV and A; write "
                                       "`units metal` (LAMMPS converts nothing for a fix external)")
            types = int(lmp.extract_global("ntypes"))
            if types != len(parts.elements):
                raise LammpsInputError(f"{input_path}: the box has {types} atom type(s) but `pair_coeff * *` "
                                       f"names {len(parts.elements)} element(s) ({' '.join(parts.elements)}); "
                                       "name one element per atom type, in type order")
            lmp.set_fix_external_callback(FIX_ID, bridge, None)
            _file(lmp, rest, input_path, bridge)
    finally:
        lmp.close()
    return {"calls": bridge.calls, "model_s": bridge.model_s, "glue_s": bridge.glue_s, "ranks": comm.size,
            "rank": comm.rank, "elements": parts.elements, "seconds": time.perf_counter() - t0}


def _file(lmp, part: Path, input_path, bridge) -> None:
    """Run one part of the translated input; LAMMPS's errors, and an error of the
    release's force call (which stopped the run), name the user's input."""
    try:
        lmp.file(str(part))
    except Exception as err:  # LAMMPS raises its own exception class with the error text
        if isinstance(err, UserError):
            raise
        raise LammpsRunError(f"{input_path}: LAMMPS stopped: {str(err).strip()}") from err
    if bridge.error is not None:
        step, err = bridge.error
        raise LammpsRunError(f"{input_path}: the release's force call failed at step {step} "
                             f"({type(err).__name__}: {err}); LAMMPS stopped the run there and skipped "
                             "the rest of the input") from err


def lammps_command(args) -> int:
    """The CLI entry: run, then one summary line on rank 0."""
    out = run_lammps(args.input, args.release, args.fidelity, args.dtype, args.device, args.charge,
                     args.spin, args.log, variables=dict(v.split("=", 1) for v in args.var or []))
    if out["rank"] == 0 and out["calls"]:
        print(f"[lammps] {out['calls']} force calls on {out['ranks']} rank(s): model "
              f"{1000 * out['model_s'] / out['calls']:.2f} ms/call, glue {1e6 * out['glue_s'] / out['calls']:.0f} "
              f"us/call; {out['seconds']:.1f} s in all", flush=True)
    return 0
