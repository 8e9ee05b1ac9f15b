"""Replay: a second shard folder read in place beside the training data, at a fixed share of
every epoch (``data.replay``: the sampler draws it from the original shards, nothing is copied)."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.stream.sampler import AtomBudgetSampler, SamplerConfig, SamplerError


def _epoch(samplers: list[AtomBudgetSampler]) -> np.ndarray:
    """Every record the ranks draw in one epoch."""
    return np.concatenate([b for s in samplers for b in s])


@pytest.mark.parametrize("world", [1, 2])
def test_replay_draws_the_requested_fraction_of_the_old_data(built, coverage_built, world):
    from data_pipeline.stream.dataset import ShardedDataset
    from data_pipeline.stream.union import DatasetUnion

    new, old = ShardedDataset(coverage_built[1]), ShardedDataset(built[1])
    union = DatasetUnion([new, old])
    n_new = len(new)
    assert len(union) == n_new + len(old) and union.part_ids.tolist() == [0] * n_new + [1] * len(old)
    assert union.manifest["fidelities"] == ["EMT", "EMT-b", "EMT-asap"]  # the new data's first
    assert union[n_new + 3]["source_id"] == old[3]["source_id"]  # read from the old shards in place
    names = union.manifest["fidelities"]
    assert [names[f] for f in union.fidelity_ids[n_new:]] == [old.manifest["fidelities"][f] for f in old.fidelity_ids]
    old_fids = np.bincount(old.fidelity_ids, minlength=2) / len(old)
    for fraction in (0.0, 0.3, 0.75):
        samplers = [AtomBudgetSampler.from_dataset(union, SamplerConfig(max_atoms=96, seed=4), r, world,
                                                   shares=[1 - fraction, fraction]) for r in range(world)]
        seen_old, first = set(), None
        for _ in range(3):
            picks = _epoch(samplers)
            total = int(np.ceil(n_new / (1 - fraction) - 1e-9))  # one pass over the new data on average
            replayed = picks[picks >= n_new]
            assert len(picks) == total
            assert abs(len(replayed) - fraction * total) < 1  # exact to one structure
            assert len(np.unique(picks[picks < n_new])) == min(n_new, total - len(replayed))
            seen_old.update(replayed.tolist())
            first = len(seen_old) if first is None else first
            if fraction:  # the old data in its own proportions (temperature 1)
                share = np.bincount(union.fidelity_ids[replayed], minlength=3)[[0, 2]] / len(replayed)
                assert np.abs(share - old_fids).max() < 2 / len(replayed) + 1e-9
        if fraction:  # each epoch draws other old records, until all were replayed
            assert len(seen_old) > first or len(seen_old) == len(old)


def test_replay_shares_are_checked(built):
    from data_pipeline.stream.dataset import ShardedDataset
    from data_pipeline.stream.union import DatasetUnion

    union = DatasetUnion([ShardedDataset(built[1]), ShardedDataset(built[1])])
    with pytest.raises(SamplerError, match="summing to 1"):
        AtomBudgetSampler.from_dataset(union, SamplerConfig(), shares=[0.5, 0.4])


def test_replay_fraction_is_validated():
    from common.config import ConfigError, from_dict
    from data_pipeline.stream.delivery import LoaderConfig

    with pytest.raises(ConfigError, match="replay.fraction"):
        from_dict(LoaderConfig, {"folder": "x", "replay": {"folder": "y", "fraction": 1.0}})

