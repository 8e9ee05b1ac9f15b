"""Our sampler's plan for ``bench_train.py``, read without training: steps per epoch at an
atom budget, the budget that gives a wanted number of steps, and how far the busier of
the ranks' batches is above their mean (a synchronous step waits for it).

One :class:`Plan` opens the shard folder once; every figure comes from
``AtomBudgetSampler``'s own plan (metadata only, no record decoded).
"""

from __future__ import annotations

from pathlib import Path


class Plan:
    """The sampler plans of ``shards`` with ``seed`` (edges counted at ``cutoff``)."""

    def __init__(self, shards: Path, seed: int, cutoff: float):
        from data_pipeline.stream.dataset import ShardedDataset  # noqa: PLC0415

        self.ds, self.seed, self.cutoff = ShardedDataset(shards), seed, cutoff

    def sampler(self, max_atoms: int, world: int = 1, **cfg):
        from data_pipeline.stream.sampler import AtomBudgetSampler, SamplerConfig  # noqa: PLC0415

        return AtomBudgetSampler.from_dataset(
            self.ds, SamplerConfig(max_atoms=max_atoms, seed=self.seed, **cfg), 0, world)

    def steps_per_epoch(self, max_atoms: int) -> int:
        """Steps of one epoch for one rank at this atom budget."""
        return self.sampler(max_atoms).steps_per_epoch

    def match_budget(self, steps: int) -> int:
        """The atom budget closest to giving ``steps`` steps per epoch (bisection)."""
        lo, hi = 80, 100_000  # steps_per_epoch does not grow with the budget
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self.steps_per_epoch(mid) <= steps else (mid, hi)
        return min((lo, hi), key=lambda m: abs(self.steps_per_epoch(m) - steps))

    def imbalance(self, max_atoms: int, first: int, steps: int, samples_per_epoch: int,
                  world: int = 2) -> dict:
        """Over steps ``first..steps-1`` of a ``world``-rank run: how far the busier rank's
        batch is above the ranks' mean, in edges and in atoms."""
        from data_pipeline.stream.edges import edge_counts  # noqa: PLC0415

        edges = edge_counts(self.ds, self.cutoff, workers=1, progress=False)
        s = self.sampler(max_atoms, world, samples_per_epoch=samples_per_epoch)
        out = {}
        for name, per in (("edges", edges), ("atoms", self.ds.n_atoms)):
            top = mean = 0.0
            for step in range(first, steps):
                s.set_epoch(step // s.steps_per_epoch)
                load = [per[s.batch(step % s.steps_per_epoch, r)].sum() for r in range(world)]
                top, mean = top + max(load), mean + sum(load) / world
            out[name] = top / mean - 1
        return out
