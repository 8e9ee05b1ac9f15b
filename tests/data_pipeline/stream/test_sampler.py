"""The atom-budget sampler: packing, mixing, dealing to ranks, determinism and resume."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import ConfigError, from_dict
from data_pipeline.stream.packing import pack, split_to_multiple
from data_pipeline.stream.sampler import AtomBudgetSampler, SamplerConfig, SamplerError

KEYS = [("big", "PBE"), ("mid", "PBE"), ("small", "r2SCAN")]


def make(sizes=(600, 120, 30), data_seed=0, rank=0, world=1, n_edges=False, **cfg):
    """A sampler over synthetic metadata: groups of the given sizes, 1-60 atoms each."""
    rng = np.random.default_rng(data_seed)
    groups = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(groups)
    n_atoms = rng.integers(1, 61, len(groups))
    edges = n_atoms * rng.integers(5, 40, len(groups)) if n_edges else None
    config = SamplerConfig(**{"max_atoms": 200, **cfg})
    return AtomBudgetSampler(n_atoms, groups, KEYS[:len(sizes)], config, rank, world, edges)


def epoch_batches(s: AtomBudgetSampler) -> list[list[int]]:
    return [b.tolist() for b in s]


def test_pack_is_greedy_in_order_and_within_budget():
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 50, 500)
    bounds = pack(sizes, 120)
    expected, start, total = [0], 0, 0
    for i, n in enumerate(sizes):  # the obvious greedy loop, as reference
        if total + n > 120 and i > start:
            expected.append(i)
            start, total = i, 0
        total += n
    expected.append(len(sizes))
    assert bounds.tolist() == expected
    assert all(sizes[a:b].sum() <= 120 for a, b in zip(bounds[:-1], bounds[1:]))


def test_pack_edge_budget_and_oversize_alone():
    sizes = np.array([10, 10, 500, 10, 10, 10])
    edges = np.array([100, 900, 10, 10, 10, 10])
    assert pack(sizes, 100).tolist() == [0, 2, 3, 6]  # 500 atoms: a batch of its own
    assert pack(sizes, 100, edges, 950).tolist() == [0, 1, 2, 3, 6]


def test_split_to_multiple_touches_only_the_tail():
    bounds = np.array([0, 4, 8, 12, 16, 20, 21])
    out = split_to_multiple(bounds, 4)
    assert (len(out) - 1) % 4 == 0 and out[:3].tolist() == [0, 4, 8]
    assert set(bounds) <= set(out)
    assert split_to_multiple(np.array([0, 1, 2, 3]), 2).tolist() == [0, 1, 2, 3]  # nothing to split


def _split_reference(bounds, world):
    """The rule as first written: O(world x batches), searched over the whole list each time."""
    b = list(bounds)
    while (len(b) - 1) % world:
        counts = np.diff(b)
        for lo in (max(0, len(counts) - 2 * world), 0):
            tail = counts[lo:][::-1]
            k = len(counts) - 1 - int(np.argmax(tail))
            if counts[k] >= 2:
                break
        else:
            break
        b.insert(k + 1, (b[k] + b[k + 1]) // 2)
    return b


@pytest.mark.parametrize("seed", range(6))
def test_split_to_multiple_is_the_rule_at_any_world_size(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4 if seed % 2 else 30, int(rng.integers(1, 400)))
    if seed == 4:
        sizes[-50:] = 1  # a tail of single structures: the whole-plan fallback
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    for world in (2, 3, 8, 64, 1024):
        assert split_to_multiple(bounds, world).tolist() == _split_reference(bounds, world), world


def test_padded_slots_counted_like_their_batches():
    """Fewer structures than ranks: every slot past the plan repeats batch k % n."""
    world = 8
    samplers = [make(sizes=(3, 2), world=world, rank=r, max_atoms=1000) for r in range(world)]
    per_rank = [epoch_batches(s) for s in samplers]
    seen = [i for batches in per_rank for b in batches for i in b]
    a = samplers[0]
    for name, fid in (("PBE", (0, 1)),):
        assert a.atoms_seen[name] == int(sum(a.n_atoms[i] for i in seen if a.groups[i] in fid))
    assert a.padded_batches == world - 5


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_equal_disjoint_batches_covering_the_epoch(world):
    samplers = [make(rank=r, world=world) for r in range(world)]
    per_rank = [epoch_batches(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1  # the same number of steps on every rank
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 750  # T=1: every record exactly once, no rank overlap
    for s, batches in zip(samplers, per_rank):
        for b in batches:
            assert s.n_atoms[b].sum() <= 200 and len(b) >= 1
        assert s.epoch == 1 and s.step == 0 and s.padded_batches == 0


def test_every_atom_counted_per_fidelity_over_all_ranks():
    a, b = make(rank=0, world=2), make(rank=1, world=2)
    seen = [i for s in (a, b) for batch in s for i in batch]
    for name, fid in (("PBE", (0, 1)), ("r2SCAN", (2,))):
        expected = int(sum(a.n_atoms[i] for i in seen if a.groups[i] in fid))
        assert a.atoms_seen[name] == b.atoms_seen[name] == expected


def test_plan_is_a_function_of_seed_and_epoch():
    first = epoch_batches(make())
    assert epoch_batches(make()) == first
    s = make()
    s.set_epoch(1)
    assert epoch_batches(s) != first
    assert epoch_batches(make(seed=7)) != first


@pytest.mark.parametrize("cut", [0, 1, 5, 17])
def test_restored_sampler_yields_exactly_the_next_batches(cut):
    reference = make(world=2, rank=1, temperature=2.0)
    full = epoch_batches(reference) + epoch_batches(reference)  # two epochs
    s = make(world=2, rank=1, temperature=2.0)
    it = iter(s)
    head = [next(it).tolist() for _ in range(cut)]
    state = s.state_dict()
    restored = make(world=2, rank=1, temperature=2.0)
    restored.load_state_dict(state)
    tail = epoch_batches(restored) + epoch_batches(restored)
    assert head + tail[: len(full) - cut] == full
    assert restored.atoms_seen == reference.atoms_seen


def test_restore_refuses_other_data_config_or_world():
    state = make(world=2).state_dict()
    with pytest.raises(SamplerError, match="fingerprint"):
        make(world=2, max_atoms=300).load_state_dict(state)
    with pytest.raises(SamplerError, match="fingerprint"):
        make(world=2, seed=9).load_state_dict(state)


def _all_ranks(world: int, state: dict | None = None) -> list[AtomBudgetSampler]:
    samplers = [make(world=world, rank=r, temperature=2.0) for r in range(world)]
    for s in samplers:
        if state is not None:
            s.load_state_dict(state)
    return samplers


@pytest.mark.parametrize("before, after, cut", [(2, 1, 3), (1, 2, 7), (2, 3, 0), (3, 2, 5), (2, 1, 999)])
def test_elastic_restore_covers_the_epoch_exactly_once(before, after, cut):
    """Saved at ``before`` ranks after ``cut`` steps, continued at ``after`` ranks: the
    interrupted epoch's picks (with the repeats of cycled groups) are each seen exactly
    once over both parts; atoms_seen carries over; the next epoch is ``after``'s own."""
    reference = make(temperature=2.0)
    picks = sorted(i for b in epoch_batches(reference) for i in b)
    head = []
    first = _all_ranks(before)
    for s in first:
        it = iter(s)
        head += [i for _ in range(min(cut, s.steps_per_epoch)) for i in next(it).tolist()]
    state = first[0].state_dict()
    rest = _all_ranks(after, state)
    epoch = rest[0].epoch
    tail = [i for s in rest for b in (epoch_batches(s) if epoch == 0 else []) for i in b]
    assert sorted(head + tail) == picks
    assert rest[0].atoms_seen == reference.atoms_seen  # the whole epoch's atoms, by fidelity
    assert [epoch_batches(s) for s in rest] == [epoch_batches(s) for s in _next_epoch(after)]


def _next_epoch(world: int) -> list[AtomBudgetSampler]:
    samplers = _all_ranks(world)
    for s in samplers:
        s.set_epoch(1)
    return samplers


@pytest.mark.parametrize("cfg, expected", [
    ({"temperature": 1.0}, [600 / 750, 120 / 750, 30 / 750]),
    ({"temperature": 1e9}, [1 / 3, 1 / 3, 1 / 3]),
    ({"weights": {"big": 1.0, "mid": 1.0, "r2SCAN": 2.0}}, [0.25, 0.25, 0.5]),
])
def test_mixing_proportions(cfg, expected):
    s = make(**cfg)
    assert np.allclose(s.probabilities, expected, atol=1e-6)
    counts, early = np.zeros(3), np.zeros(3)
    for _ in range(20):
        batches = list(s)
        for k, b in enumerate(batches):
            c = np.bincount(s.groups[b], minlength=3)
            counts += c
            if k < len(batches) // 4:  # groups are spread through the epoch, not in blocks
                early += c
    assert np.allclose(counts / counts.sum(), expected, atol=0.01)
    assert np.allclose(early / early.sum(), expected, atol=0.05)


def test_temperature_two_is_square_root_of_sizes():
    s = make(temperature=2.0)
    p = np.sqrt([600, 120, 30])
    assert np.allclose(s.probabilities, p / p.sum())
    batches = [i for b in s for i in b]
    assert len(batches) == 750  # an epoch is samples_per_epoch draws (default: the records)
    small = [i for i in batches if s.groups[i] == 2]
    assert len(small) > 30 and len(set(small)) == 30  # the small group is cycled


def test_weights_must_match_every_group_once():
    with pytest.raises(SamplerError, match="no key matches group 'small/r2SCAN'"):
        make(weights={"PBE": 1.0})
    with pytest.raises(SamplerError, match="all match group 'big/PBE'"):
        make(weights={"PBE": 1.0, "big": 1.0, "r2SCAN": 1.0})


def test_oversize_structure_gets_own_batch_or_error():
    s = make(max_atoms=30)
    batches = epoch_batches(s)
    assert sorted(i for b in batches for i in b) == list(range(750))  # nothing dropped
    assert all(len(b) == 1 for b in batches if s.n_atoms[b].sum() > 30)
    with pytest.raises(SamplerError, match=r"exceed the batch budget .* first record \d+ with \d+ atoms"):
        make(max_atoms=30, oversize="error")


def test_edge_budget():
    s = make(n_edges=True, max_edges=1500, max_atoms=10_000)
    for b in s:
        assert s.n_edges[b].sum() <= 1500 or len(b) == 1
    with pytest.raises(SamplerError, match="no per-record edge counts"):
        make(max_edges=100)


def test_no_shuffle_visits_records_in_order():
    batches = epoch_batches(make(shuffle=False, world=1))
    assert [i for b in batches for i in b] == list(range(750))


def test_config_validation():
    with pytest.raises(ConfigError, match="max_atoms"):
        from_dict(SamplerConfig, {"max_atoms": 0})
    with pytest.raises(ConfigError, match="temperature"):
        from_dict(SamplerConfig, {"temperature": 0})
    with pytest.raises(ConfigError, match="oversize"):
        from_dict(SamplerConfig, {"oversize": "drop"})


def test_subset_fraction_is_seeded_nested_per_group_and_counted_exactly():
    from data_pipeline.stream.sampler import subset_mask

    full = make(shuffle=False)
    half = make(subset_fraction=0.5, subset_seed=4)
    quarter = make(subset_fraction=0.25, subset_seed=4)
    for s, fraction in ((half, 0.5), (quarter, 0.25)):
        for g, size in enumerate((600, 120, 30)):  # each group keeps ceil(fraction * size)
            assert int((s.active & (s.groups == g)).sum()) == int(np.ceil(fraction * size))
        drawn = np.concatenate([b for b in s])
        assert s.active[drawn].all() and len(drawn) == int(s.active.sum())
        atoms = {f: int(s.n_atoms[s.active & np.isin(s.groups, [g for g, k in enumerate(KEYS) if k[1] == f])].sum())
                 for f in ("PBE", "r2SCAN")}
        assert s.distinct_atoms == atoms
    assert not (quarter.active & ~half.active).any()  # nested in the fraction
    assert full.active.all() and sum(full.distinct_atoms.values()) == int(full.n_atoms.sum())
    other = subset_mask(half.groups, 0.5, seed=5)
    assert (other != half.active).any() and (subset_mask(half.groups, 0.5, 4) == half.active).all()
    # the eval path (no shuffle) visits the subset in order, and resume refuses another subset
    ordered = make(subset_fraction=0.5, subset_seed=4, shuffle=False)
    assert np.concatenate([b for b in ordered]).tolist() == np.flatnonzero(ordered.active).tolist()
    with pytest.raises(SamplerError, match="fingerprint"):
        make(subset_fraction=0.5, subset_seed=5).load_state_dict(half.state_dict())
    with pytest.raises(ConfigError, match="subset_fraction"):
        from_dict(SamplerConfig, {"subset_fraction": 0.0})
