"""Delivery: the batch contract, local vs Ray equality, actor death, resume, ranks, bad shards."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from data_pipeline import keys as K
from data_pipeline.shards import ShardError
from data_pipeline.stream import StreamConfig, build_stream
from data_pipeline.stream.collate import BatchBuilder
from data_pipeline.stream.dataset import ShardedDataset
from data_pipeline.stream.sampler import AtomBudgetSampler, SamplerConfig
from tests.distributed import run_distributed

CUTOFF = 5.0


def stream_of(folder, backend="local", workers=0, rank=0, world=1, prefetch=2, **sampler):
    builder = BatchBuilder(folder, CUTOFF, float_dtype="float64")
    cfg = SamplerConfig(**{"max_atoms": 64, "temperature": 2.0, **sampler})
    s = AtomBudgetSampler.from_dataset(builder.dataset, cfg, rank, world)
    return build_stream(builder, s, StreamConfig(backend=backend, workers=workers, prefetch=prefetch))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_contract(built):
    _, folder, manifest = built
    ds = ShardedDataset(folder)
    batches = list(stream_of(folder))
    assert sum(int(b[K.N_ATOMS].sum()) for b in batches) > 0
    for b in batches:
        assert tuple(b) == K.ALL_KEYS
        n, g, e = len(b[K.NUMBERS]), len(b[K.N_ATOMS]), b[K.EDGE_INDEX].shape[1]
        assert b[K.POSITIONS].shape == (n, 3) and b[K.CELL].shape == (g, 3, 3)
        assert b[K.CELL_SHIFTS].shape == (e, 3) and b[K.FORCES_MASK].shape == (n,)
        assert int(b[K.N_ATOMS].sum()) == n <= 64 or g == 1
        assert int(b[K.N_EDGES].sum()) == e
        assert torch.equal(torch.bincount(b[K.BATCH], minlength=g), b[K.N_ATOMS])
        assert b[K.ENERGY].dtype == torch.float64 and b[K.EDGE_INDEX].dtype == torch.int64
        i, j = b[K.EDGE_INDEX]
        assert torch.equal(b[K.BATCH][i], b[K.BATCH][j])  # edges stay inside their structure
        assert torch.all(i[1:] >= i[:-1])  # sorted by centre atom
        vec = b[K.POSITIONS][j] - b[K.POSITIONS][i] + torch.einsum(
            "ek,ekl->el", b[K.CELL_SHIFTS], b[K.CELL][b[K.BATCH][i]])
        assert torch.all(vec.norm(dim=1) < CUTOFF) and torch.all(vec.norm(dim=1) > 0)
        for k, idx in enumerate(b[K.INDEX].tolist()):  # every graph is its record
            rec = ds[idx]
            atoms = b[K.BATCH] == k
            assert np.array_equal(b[K.POSITIONS][atoms].numpy(), rec["positions"])
            assert manifest["fidelities"][int(b[K.FIDELITY][k])] == rec["fidelity"]
            assert bool(b[K.ENERGY_MASK][k]) == (rec["energy"] is not None)
            if rec["energy"] is not None:
                assert float(b[K.ENERGY][k]) == rec["energy"]


def test_local_workers_deliver_the_same_batches_as_in_process(built):
    folder = built[1]
    ref = list(stream_of(folder, workers=0))
    stream = stream_of(folder, workers=2)
    got = list(stream)
    assert len(got) == len(ref) and all(same(a, b) for a, b in zip(ref, got))
    assert stream.stats()["batches"] == len(ref) and stream.stats()["wait_s"] > 0
    assert stream.sampler.epoch == 1 and stream.sampler.step == 0


def test_ray_path_equals_local_path(built, ray_local):
    folder = built[1]
    ref = list(stream_of(folder))
    stream = stream_of(folder, backend="ray", workers=2)
    try:
        got = list(stream)
        assert len(got) == len(ref) and all(same(a, b) for a, b in zip(ref, got))
        steps = stream.sampler.steps_per_epoch  # epoch 1: a new plan, the same actors
        assert len(list(stream)) == steps and stream.sampler.epoch == 2
    finally:
        stream.close()


def test_killed_actor_loses_and_duplicates_nothing(built, ray_local):
    folder = built[1]
    ref = list(stream_of(folder))
    stream = stream_of(folder, backend="ray", workers=2, prefetch=4)
    got = []
    try:
        for k, batch in enumerate(stream):
            got.append(batch)
            if k in (2, 5):  # kill an actor with batches in flight, twice
                ray_local.kill(stream.actors[k % 2], no_restart=True)
        assert stream.stats()["actor_restarts"] == 2
    finally:
        stream.close()
    assert len(got) == len(ref) and all(same(a, b) for a, b in zip(ref, got))


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_resumed_stream_yields_exactly_the_next_batches(built, ray_local, backend):
    folder = built[1]
    ref = list(stream_of(folder))
    first = stream_of(folder, backend=backend, workers=2)
    head = []
    for batch in first:
        head.append(batch)
        if len(head) == 4:
            state = first.state_dict()  # taken between batches, with more prefetched
            break
    first.close()
    resumed = stream_of(folder, backend=backend, workers=2)
    resumed.load_state_dict(state)
    tail = list(resumed)
    resumed.close()
    assert len(head) + len(tail) == len(ref)
    assert all(same(a, b) for a, b in zip(ref, head + tail))


def _rank_indices(rank: int, world: int, folder: str) -> list[list[int]]:
    """Run on each rank of a gloo group: the record indices this rank's batches hold."""
    import torch.distributed as dist

    stream = stream_of(folder, workers=1, rank=rank, world=world, temperature=1.0)
    mine = [b[K.INDEX].tolist() for b in stream]
    steps = torch.tensor([len(mine)])
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    assert steps.item() == len(mine)  # no rank waits on another at the last step
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def test_two_ranks_see_disjoint_batches_covering_the_epoch(built):
    folder, manifest = built[1], built[2]
    per_rank = run_distributed(_rank_indices, 2, str(folder))
    assert per_rank[0] == per_rank[1]  # both ranks gathered the same picture
    r0, r1 = per_rank[0]
    assert len(r0) == len(r1)
    seen = [i for batches in (r0, r1) for b in batches for i in b]
    assert sorted(seen) == list(range(manifest["records"]))  # T=1: each record once, disjoint


def corrupted_copy(folder, tmp_path, damage):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    shard = sorted(copy.glob("shard-*.lmdb"))[1]
    damage(shard)
    return copy, shard.name


def test_truncated_shard_is_named_at_open(built, tmp_path):
    def truncate(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    copy, name = corrupted_copy(built[1], tmp_path, truncate)
    with pytest.raises(ShardError, match=rf"{name}: \d+ bytes, the manifest says \d+"):
        ShardedDataset(copy)


def test_checksum_mismatch_is_named(built, tmp_path):
    def flip(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 0xFF
        path.write_bytes(bytes(data))

    copy, name = corrupted_copy(built[1], tmp_path, flip)
    ds = ShardedDataset(copy)  # same size: passes the cheap check
    assert ds.verify(rank=0, world_size=2) == 2  # rank 0 checks shards 0 and 2: intact
    with pytest.raises(ShardError, match=rf"{name}: sha256 .* does not match the manifest"):
        ds.verify(rank=1, world_size=2)


def test_foreign_file_in_place_of_a_shard_is_named(built, tmp_path):
    def garbage(path):
        path.write_bytes(b"not lmdb" * (path.stat().st_size // 8))

    copy, name = corrupted_copy(built[1], tmp_path, garbage)
    ds = ShardedDataset(copy, check_sizes=False)
    with pytest.raises(ShardError, match=name):
        _ = ds.n_atoms


def test_edge_counts_are_exact_cached_and_budget_batches(built, tmp_path):
    from common.config import from_dict
    from data_pipeline.stream import LoaderConfig, build_loader
    from data_pipeline.stream.edges import edge_counts

    folder = tmp_path / "copy"
    shutil.copytree(built[1], folder)
    counts = edge_counts(folder, CUTOFF, workers=2, progress=False)
    builder = BatchBuilder(folder, CUTOFF)
    for i in range(0, len(counts), 7):
        assert counts[i] == builder([i])[K.N_EDGES][0]
    assert (folder / f"edges-cutoff{CUTOFF:g}.npz").is_file()
    assert np.array_equal(edge_counts(folder, CUTOFF, workers=1, progress=False), counts)
    cfg = from_dict(LoaderConfig, {"folder": str(folder), "cutoff": CUTOFF, "verify": True,
                                   "sampler": {"max_atoms": 10_000, "max_edges": 3000}})
    batches = list(build_loader(cfg, progress=False))
    assert sum(len(b[K.N_ATOMS]) for b in batches) == len(counts)
    assert all(b[K.EDGE_INDEX].shape[1] <= 3000 or len(b[K.N_ATOMS]) == 1 for b in batches)


def test_cli_verify_and_stream(built, capsys):
    from launch.cli import main

    folder = str(built[1])
    assert main(["data", "verify", folder]) == 0
    assert main(["data", "stream", folder, "cutoff=4", "sampler.max_atoms=64", "stream.workers=0"]) == 0
    assert "110 structures" in capsys.readouterr().out
    assert main(["data", "stream", folder, "sampler.max_atoms=8", "sampler.oversize=error"]) == 2
    assert "exceed the batch budget" in capsys.readouterr().err
    assert main(["data", "stream", folder, "sampler.bogus=1"]) == 2
