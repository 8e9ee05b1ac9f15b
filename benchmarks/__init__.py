"""Benchmarks: each ``bench_*`` module is run from the repository root as
``python -m benchmarks.bench_X``; :mod:`benchmarks.harness` is what they share.
Standard library only here: peers' interpreters import ``benchmarks.*`` too."""
