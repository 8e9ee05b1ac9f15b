"""The stream stage: shards -> graphs -> atom-budget, fidelity-mixed batches on each rank.

In data-flow order: :mod:`~data_pipeline.stream.dataset` (``ShardedDataset``, records by
global index), :mod:`~data_pipeline.stream.edges` (per-structure edge counts for edge budgets),
:mod:`~data_pipeline.stream.sampler` (the rank-aware, resumable batch plan),
:mod:`~data_pipeline.stream.collate` (records -> neighbor lists -> one flat Batch of
:mod:`data_pipeline.keys`, through :mod:`data_pipeline.graph` and :mod:`data_pipeline.batch`) and :mod:`~data_pipeline.stream.delivery` (a local DataLoader
or Ray actors pushing ready batches to a rank).

It reads through the shared contract at the package root (schema, shards, manifest
reading, keys, neighbor lists, batch assembly) and never imports the build stage.

Example::

    from data_pipeline.stream import ShardedDataset
    ds = ShardedDataset("shards/")
"""

_EXPORTS = {"ShardedDataset": "dataset", "BatchBuilder": "collate",
            "AtomBudgetSampler": "sampler", "SamplerConfig": "sampler",
            "StreamConfig": "delivery", "LoaderConfig": "delivery", "StreamError": "delivery",
            "build_stream": "delivery", "build_loader": "delivery", "stream_epoch": "delivery",
            "open_data": "delivery", "ReplayConfig": "delivery", "DatasetUnion": "union"}


def __getattr__(name):
    # lazy: importing one module of the stage (say the sampler) must not import all of it
    if name in _EXPORTS:
        import importlib  # noqa: PLC0415

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
