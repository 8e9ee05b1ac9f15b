"""The build stage: raw files -> validated records -> N LMDB shards + ``manifest.json``.

In data-flow order: :mod:`~data_pipeline.build.recipe` (what to read and how),
:mod:`~data_pipeline.build.sources` (work units and the readers of each format),
:mod:`~data_pipeline.build.validate` (with :mod:`~data_pipeline.build.screen`, its
batch shortcut) and :mod:`~data_pipeline.build.units` (a raw frame becomes an
:class:`~data_pipeline.schema.AtomsRecord` in the schema's units, or a reject), :mod:`~data_pipeline.build.convert` (a Ray task per work unit),
:mod:`~data_pipeline.build.stats` and :mod:`~data_pipeline.build.audit` (per-group
statistics, elemental references), :mod:`~data_pipeline.build.duplicates` and
:mod:`~data_pipeline.build.duplicate_report` (copies, label conflicts and pairing across
fidelities, from the records' fingerprints), :mod:`~data_pipeline.build.assemble` (the manifest's
contents) and :mod:`~data_pipeline.build.driver` (the whole build, as Ray tasks).

It writes through the shared contract at the package root (schema, shards, manifest
format) and never imports the stream stage.
"""

_EXPORTS = {"build": "driver", "BuildError": "driver", "report": "driver", "load_recipe": "recipe"}


def __getattr__(name):
    # lazy: importing one module of the stage must not import all of it (ase, Ray tasks)
    if name in _EXPORTS:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
