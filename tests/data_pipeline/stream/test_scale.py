"""Readers and delivery at many shards and ranks: bounded open files, light pickles, one
Ray cluster per job, edge counts split over the ranks."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np

from data_pipeline import shards
from data_pipeline.stream import ShardedDataset
from tests.distributed import run_distributed


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_shard_environments_are_bounded(built, monkeypatch):
    _, out, m = built
    for reader in ShardedDataset(out).shards:
        reader.close()
    monkeypatch.setattr(shards, "MAX_OPEN_ENVS", 2)
    ds = ShardedDataset(out)
    before = _open_fds()
    energies = [ds[i]["energy"] for i in range(len(ds))] + [ds[i]["energy"] for i in range(len(ds))]
    assert len(shards._ENVS) <= 2 and _open_fds() <= before + 2
    assert len(energies) == 2 * m["records"] and all(e is not None for e in energies)
    assert ds.n_atoms.sum() == m["atoms"]  # metadata of every shard, two open at a time


def test_pickled_dataset_does_not_carry_per_record_metadata(built):
    _, out, _ = built
    ds = ShardedDataset(out)
    size = len(pickle.dumps(ds))
    assert ds.n_atoms.sum() > 0 and ds.shards[0].meta()[0]["n_records"] > 0
    assert len(pickle.dumps(ds)) == size
    copy = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(copy.n_atoms, ds.n_atoms)  # read again by the receiver


def _ray_rank(rank: int, world: int) -> tuple[str, int]:
    import ray
    import torch.distributed as dist

    from data_pipeline.raysession import connect

    os.environ.pop("RAY_ADDRESS", None)
    address = connect(world)
    nodes = len([n for n in ray.nodes() if n["Alive"]])
    dist.barrier()
    if rank:
        ray.shutdown()
    dist.barrier()  # rank 0 owns the cluster: it goes last
    ray.shutdown()
    return address, nodes


def test_ranks_of_a_job_share_one_ray_cluster():
    (a0, n0), (a1, n1) = run_distributed(_ray_rank, 2, timeout=180)
    assert a0 == a1 and n0 == n1 == 1


def _edges_rank(rank: int, world: int, folder: str) -> list[int]:
    from data_pipeline.stream.edges import edge_counts

    return edge_counts(folder, 4.0, workers=1, progress=False, rank=rank, world_size=world).tolist()


def test_edge_counts_are_split_over_ranks_and_match_one_process(built, tmp_path, monkeypatch):
    from data_pipeline.stream import edges

    _, out, _ = built
    for name in ("one", "two"):
        shutil.copytree(out, tmp_path / name, ignore=shutil.ignore_patterns("edges-*"))
    monkeypatch.setattr(edges, "CHUNK", 16)  # several chunks per rank (spawned ranks: default)
    one = edges.edge_counts(tmp_path / "one", 4.0, workers=1, progress=False).tolist()
    r0, r1 = run_distributed(_edges_rank, 2, str(tmp_path / "two"), timeout=180)
    assert r0 == r1 == one and len(one) == 110
    assert (tmp_path / "two" / "edges-cutoff4.npz").exists()  # rank 0 wrote the cache
