"""Delivery of ready batches to one training rank: a local DataLoader or Ray actors.

Both paths walk the same plan: the sampler's batches for this rank, from its saved step
to the end of the epoch, built by :class:`~data_pipeline.stream.collate.BatchBuilder`. They
yield the same batches in the same order, and advance the sampler only when a batch is
handed to the consumer (never when it is prefetched), so a checkpoint taken between two
batches resumes exactly.

- :class:`LocalStream`: a ``torch.utils.data.DataLoader`` whose workers build whole
  batches (one item = one batch), for single-machine runs and tests.
- :class:`RayStream`: ``workers`` Ray actors, which may sit on any node of the cluster
  (CPU-only nodes included), build batches while the trainer computes; at most
  ``prefetch`` batches are in flight per rank, so memory stays bounded. An actor that
  dies is replaced and its unfinished batches are rebuilt by the replacement; batches
  are yielded strictly by step, so each planned batch is delivered exactly once.

Both count the seconds the consumer waited for data (``wait_s``), the figure that says
whether the input pipeline keeps up.

Example::

    builder = BatchBuilder("shards/", cutoff=6.0)
    sampler = AtomBudgetSampler.from_dataset(builder.dataset, SamplerConfig(max_atoms=2048),
                                             rank, world_size)
    stream = build_stream(builder, sampler, StreamConfig(backend="ray", workers=4))
    for batch in stream:          # one epoch; again for the next
        ...
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Iterator, Literal

from common.config import ConfigError
from common.errors import UserError
from data_pipeline.batch import to_torch
from data_pipeline.stream.collate import BatchBuilder
from data_pipeline.stream.sampler import AtomBudgetSampler, SamplerConfig

MAX_ATTEMPTS = 3  # actor deaths one batch may cause before the stream gives up


class StreamError(UserError, RuntimeError):
    """Batches cannot be delivered (a batch keeps killing the actors that build it)."""


@dataclasses.dataclass
class StreamConfig:
    """How batches reach a training rank."""

    backend: Literal["local", "ray"] = "local"
    """``local``: DataLoader worker processes; ``ray``: Ray actors (``RAY_ADDRESS`` or local)."""
    workers: int = 2
    """DataLoader workers or Ray actors per rank; 0 (local only) builds in the trainer."""
    prefetch: int = 4
    """Batches in flight per rank (Ray), or per worker (DataLoader)."""

    def validate(self) -> None:
        """Reject worker counts the backend cannot use."""
        if self.workers < 0 or (self.backend == "ray" and self.workers < 1):
            raise ConfigError(f"workers: got {self.workers}, expected >= 1 for ray, >= 0 for local")
        if self.prefetch < 1:
            raise ConfigError(f"prefetch: got {self.prefetch}, expected >= 1")


@dataclasses.dataclass
class ReplayConfig:
    """Replay of earlier training data beside ``data.folder`` (:mod:`~data_pipeline.stream.union`):
    a run that adds a fidelity to a trained model keeps its old heads from forgetting."""

    folder: str | None = None
    """Shard folder of the data to replay (the pretraining run's own shards: read in place,
    never copied); null: no replay."""
    fraction: float = 0.2
    """Share of every epoch's structures drawn from it (exact to one structure); the rest
    come from ``data.folder``, whose records an epoch then visits once on average."""

    def validate(self) -> None:
        """Reject a share that leaves no room for the new data."""
        if not 0 <= self.fraction < 1:
            raise ConfigError(f"replay.fraction: got {self.fraction}, expected within [0, 1)")


@dataclasses.dataclass
class LoaderConfig:
    """One shard folder streamed to the training ranks: graphs, sampling and delivery."""

    folder: str
    """Shard folder written by ``mlip-pretrain data build``."""
    cutoff: float = 6.0
    """Neighbor-list cutoff in Angstrom (the model's)."""
    float_dtype: Literal["float32", "float64"] = "float32"
    """Dtype of positions, cell, shifts, forces and stress in a batch."""
    verify: bool = False
    """Check every shard's SHA-256 against the manifest before streaming (ranks split it)."""
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    """Mixing, atom/edge budgets and seed."""
    stream: StreamConfig = dataclasses.field(default_factory=StreamConfig)
    """Local DataLoader or Ray actors, workers and prefetch."""
    replay: ReplayConfig = dataclasses.field(default_factory=ReplayConfig)
    """A second shard folder mixed in at a fixed share of every epoch (replay)."""

    def validate(self) -> None:
        """Reject a cutoff that cannot make a graph."""
        if not self.cutoff > 0:
            raise ConfigError(f"cutoff: got {self.cutoff}, expected > 0 Angstrom")


def build_loader(cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                 progress: bool = True, fidelities: list[str] | None = None,
                 extras: dict[str, tuple[str, list[int]]] | None = None) -> "_Stream":
    """The stream of ``rank``'s batches over ``cfg.folder`` (edge counts computed when a
    ``max_edges`` budget needs them, split over the ranks: a collective then).
    ``fidelities``: the model's fidelity table; batch fidelity ids index it by name.
    ``extras``: the record extras batches carry (:class:`BatchBuilder`)."""
    dataset = open_data(cfg)
    builder = BatchBuilder(dataset, cfg.cutoff, cfg.float_dtype, fidelities, extras)
    if cfg.verify:
        dataset.verify(rank, world_size, progress=progress and rank == 0)
    n_edges = None
    if cfg.sampler.max_edges is not None:
        import numpy as np  # noqa: PLC0415

        from data_pipeline.stream.edges import edge_counts  # noqa: PLC0415

        parts = getattr(dataset, "parts", [dataset])  # each folder keeps its own cache
        n_edges = np.concatenate([edge_counts(p, cfg.cutoff, progress=progress and rank == 0,
                                              rank=rank, world_size=world_size) for p in parts])
    shares = None if cfg.replay.folder is None else [1 - cfg.replay.fraction, cfg.replay.fraction]
    sampler = AtomBudgetSampler.from_dataset(dataset, cfg.sampler, rank, world_size, n_edges, shares)
    return build_stream(builder, sampler, cfg.stream)


def open_data(cfg: LoaderConfig):
    """The records ``cfg`` streams: ``cfg.folder``'s, or with replay the union of it and the
    replay folder (:class:`~data_pipeline.stream.union.DatasetUnion`)."""
    from data_pipeline.stream.dataset import ShardedDataset  # noqa: PLC0415

    main = ShardedDataset(cfg.folder)
    if cfg.replay.folder is None:
        return main
    from data_pipeline.stream.union import DatasetUnion  # noqa: PLC0415

    return DatasetUnion([main, ShardedDataset(cfg.replay.folder)])


class _Stream:
    """What both paths share: the walk over the sampler's plan and the wait clock."""

    def __init__(self, builder: BatchBuilder, sampler: AtomBudgetSampler, cfg: StreamConfig):
        self.builder, self.sampler, self.cfg = builder, sampler, cfg
        self.wait_s = 0.0
        self.batches = 0

    def _plan(self) -> tuple[int, list]:
        """(first step, this rank's batch indices from that step to the epoch's end)."""
        s = self.sampler
        return s.step, [s.batch(k) for k in range(s.step, s.steps_per_epoch)]

    def _deliver(self, batch: dict, waited: float) -> dict:
        self.wait_s += waited
        self.batches += 1
        self.sampler.advance()
        return to_torch(batch)

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch - self.sampler.step

    def state_dict(self) -> dict:
        """The sampler's state: where the next batch comes from."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved sampler state."""
        self.sampler.load_state_dict(state)

    def stats(self) -> dict[str, float]:
        """Seconds waited for data and batches delivered so far."""
        return {"wait_s": self.wait_s, "batches": self.batches}

    def close(self) -> None:
        """Release workers (no-op for the local path)."""


class _PlanItems:
    """Map-style dataset whose item ``k`` is the ``k``-th batch of a plan (worker side)."""

    def __init__(self, builder: BatchBuilder, plan: list):
        self.builder, self.plan = builder, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict:
        # tensors, not numpy: the DataLoader moves tensors through shared memory, while
        # numpy arrays would be pickled through a pipe (~3 ms per 6 MiB batch)
        return to_torch(self.builder(self.plan[k]))


def _worker_init(_: int) -> None:
    import torch  # noqa: PLC0415

    torch.set_num_threads(1)  # N workers x all cores of threads would oversubscribe the node


class LocalStream(_Stream):
    """Batches from a torch DataLoader whose workers each build whole batches."""

    def __iter__(self) -> Iterator[dict]:
        from torch.utils.data import DataLoader  # noqa: PLC0415

        _, plan = self._plan()
        workers = self.cfg.workers
        loader = DataLoader(
            _PlanItems(self.builder, plan), batch_size=None, shuffle=False,
            num_workers=workers, collate_fn=_identity, worker_init_fn=_worker_init if workers else None,
            prefetch_factor=self.cfg.prefetch if workers else None,
        )
        it = iter(loader)
        for _ in range(len(plan)):
            t0 = time.perf_counter()
            batch = next(it)
            yield self._deliver(batch, time.perf_counter() - t0)
        self.sampler.set_epoch(self.sampler.epoch + 1)


def _identity(x: Any) -> Any:
    return x


class RayStream(_Stream):
    """Batches built by Ray actors with bounded prefetch; dead actors are replaced."""

    def __init__(self, builder: BatchBuilder, sampler: AtomBudgetSampler, cfg: StreamConfig):
        super().__init__(builder, sampler, cfg)
        import ray  # noqa: PLC0415 - seconds to import; only the Ray path pays

        from data_pipeline.raysession import connect  # noqa: PLC0415

        connect(sampler.world_size)  # every rank of the job joins the same cluster
        self._ray = ray
        self._actor_cls = ray.remote(num_cpus=1, max_restarts=0)(_BatchActor)
        self._builder_ref = ray.put(builder)
        self.actors = [self._spawn() for _ in range(cfg.workers)]
        self.actor_restarts = 0

    def _spawn(self):
        return self._actor_cls.options(scheduling_strategy="SPREAD").remote(self._builder_ref)

    def __iter__(self) -> Iterator[dict]:
        from ray.exceptions import RayActorError  # noqa: PLC0415

        start, plan = self._plan()
        pending: dict[int, tuple[Any, int, Any]] = {}  # plan slot -> (ref, actor slot, actor)
        submitted = 0
        for k in range(len(plan)):
            while submitted < len(plan) and submitted - k < self.cfg.prefetch:
                pending[submitted] = self._submit(submitted, start, plan[submitted])
                submitted += 1
            t0 = time.perf_counter()
            for attempt in range(MAX_ATTEMPTS + 1):
                ref, slot, actor = pending[k]
                try:
                    batch = self._ray.get(ref)
                    break
                except RayActorError as err:
                    if attempt == MAX_ATTEMPTS:
                        raise StreamError(
                            f"step {start + k} of epoch {self.sampler.epoch} (records "
                            f"{plan[k].tolist()[:8]}...): {MAX_ATTEMPTS + 1} actors died building "
                            f"it; the last error: {err}") from None
                    self._replace(slot, actor, pending, start, plan)
            del pending[k]
            yield self._deliver(batch, time.perf_counter() - t0)
        self.sampler.set_epoch(self.sampler.epoch + 1)

    def _submit(self, k: int, start: int, indices) -> tuple[Any, int, Any]:
        slot = (start + k) % len(self.actors)
        actor = self.actors[slot]
        return actor.build.remote(indices), slot, actor

    def _replace(self, slot: int, dead, pending: dict, start: int, plan: list) -> None:
        """Start a new actor in ``slot`` (once per death) and rebuild its unfinished batches."""
        if self.actors[slot] is dead:
            self._ray.kill(dead)  # it may only be unreachable: make sure it is gone
            self.actors[slot] = self._spawn()
            self.actor_restarts += 1
        for k, (_, s, actor) in list(pending.items()):
            if s == slot and actor is dead:
                pending[k] = self._submit(k, start, plan[k])

    def stats(self) -> dict[str, float]:
        """Seconds waited, batches delivered and actors replaced so far."""
        return {**super().stats(), "actor_restarts": self.actor_restarts}

    def close(self) -> None:
        """Stop this rank's actors."""
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []


class _BatchActor:
    """Ray actor holding one :class:`BatchBuilder` (its shards open once, in the actor)."""

    def __init__(self, builder: BatchBuilder):
        self.builder = builder

    def build(self, indices) -> dict:
        return self.builder(indices)

    def pid(self) -> int:
        return os.getpid()


def build_stream(builder: BatchBuilder, sampler: AtomBudgetSampler, cfg: StreamConfig) -> _Stream:
    """The stream ``cfg.backend`` names."""
    return (RayStream if cfg.backend == "ray" else LocalStream)(builder, sampler, cfg)


def stream_epoch(stream: _Stream, progress: bool = True) -> dict[str, Any]:
    """Drain one epoch of ``stream`` and measure it: structures, atoms and edges per second,
    the fraction of the time spent waiting for data, atoms per fidelity (all ranks)."""
    from common.progress import Progress  # noqa: PLC0415
    from data_pipeline import keys as K  # noqa: PLC0415

    epoch, wait0 = stream.sampler.epoch, stream.wait_s
    totals = {"structures": 0, "atoms": 0, "edges": 0}
    t0 = time.perf_counter()
    with Progress(len(stream), f"epoch {epoch}", unit="batches", enabled=progress) as bar:
        for batch in stream:
            totals["structures"] += len(batch[K.N_ATOMS])
            totals["atoms"] += len(batch[K.NUMBERS])
            totals["edges"] += batch[K.EDGE_INDEX].shape[1]
            bar.update(1, structures=totals["structures"])
    seconds = time.perf_counter() - t0
    return {"epoch": epoch, "batches": bar.done, **totals, "seconds": round(seconds, 3),
            "structures_per_s": round(totals["structures"] / seconds, 1),
            "edges_per_s": round(totals["edges"] / seconds, 1),
            "wait_fraction": round((stream.wait_s - wait0) / seconds, 3),
            "atoms_seen": dict(stream.sampler.atoms_seen)}
