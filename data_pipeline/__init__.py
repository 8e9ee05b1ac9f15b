"""Data pipeline: raw DFT files -> validated records -> sharded LMDB -> batches.

Two stages, each a subpackage, on the contract they share at this root:

- :mod:`data_pipeline.build`: raw files -> shards + ``manifest.json`` (``build``,
  ``load_recipe``; ``mlip-pretrain data build``).
- :mod:`data_pipeline.stream`: shards -> batches on each rank (``ShardedDataset``,
  ``build_loader``).
- here: the data contract: the record (:mod:`~data_pipeline.schema`,
  :class:`AtomsRecord`), the shard files (:mod:`~data_pipeline.shards`), reading the
  manifest (:mod:`~data_pipeline.manifest`), the batch's key names
  (:mod:`~data_pipeline.keys`), neighbor lists (:mod:`~data_pipeline.graph`), batch
  assembly from records or ASE atoms (:mod:`~data_pipeline.batch`: training and inference
  build the same Batch) and the Ray session. Typed configs, atomic writes and progress
  live on the ground floor, ``common/``.

Nothing at this root imports a stage, and neither stage imports the other
(``tests/data_pipeline/test_layout.py`` holds the rule).
"""

from data_pipeline.schema import AtomsRecord  # noqa: F401

# names this package exported before the two stages had their own homes
_MOVED = {"ShardedDataset": "data_pipeline.stream", "load_recipe": "data_pipeline.build"}


def __getattr__(name):
    if name in _MOVED:
        raise AttributeError(f"data_pipeline.{name} lives in its stage now: "
                             f"`from {_MOVED[name]} import {name}`")
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")


__all__ = ["AtomsRecord"]
