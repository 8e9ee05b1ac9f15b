"""Data pipeline: raw DFT files -> validated records -> sharded LMDB -> batches.

Public API: :class:`ShardedDataset` (read shards), :func:`build` (run a data build),
:func:`load_recipe`, :class:`AtomsRecord`.
"""

from data_pipeline.schema import AtomsRecord  # noqa: F401


def __getattr__(name):
    # lazy: `import data_pipeline` must stay cheap (no lmdb/ray/ase import)
    if name == "ShardedDataset":
        from data_pipeline.dataset import ShardedDataset

        return ShardedDataset
    if name == "build":
        from data_pipeline.build import build

        return build
    if name == "load_recipe":
        from data_pipeline.recipe import load_recipe

        return load_recipe
    raise AttributeError(name)


__all__ = ["AtomsRecord", "ShardedDataset", "build", "load_recipe"]
